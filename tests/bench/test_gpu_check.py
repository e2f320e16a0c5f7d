"""bench/gpu_check.py in its reduced form on this CPU (--quick: the tiny model, three digits, a
few photos): every check runs and lands in summary.json with its log; and a machine whose
torch has no usable CUDA stops at once with one line when CUDA is required."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
NAMES = ["train frozen, bf16 against fp32", "train unfrozen, bf16 against fp32",
         "embed frozen, bf16 against fp32", "embed unfrozen, bf16 against fp32",
         "two processes against one", "resume unfrozen",
         "speed: GPU only", "speed: loader only", "speed: pipeline"]


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's reduced form")
def test_quick_run_keeps_every_check_and_its_log(tmp_path):
    out = tmp_path / "gpu_check"
    done = gpu_check("--quick", "--no-require-cuda", "--out", str(out), cwd=tmp_path)
    print(done.stdout, done.stderr[-2000:])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["name"]: c for c in summary["checks"]}
    assert list(checks) == NAMES and summary["failed"] == 0 and summary["quick"]
    assert summary["gpus"] == 0 and summary["device"].startswith("cpu")
    # The CPU has no bf16: the fp32 runner (autocast off) must give the stage's numbers exactly.
    for name in NAMES[:2]:
        assert checks[name]["verdict"] == "PASS"
        assert max(checks[name]["values"].values()) == 0.0
    for name in NAMES[2:4]:
        assert checks[name]["values"]["lowest_cosine"] > 0.9999
    assert checks["two processes against one"]["verdict"] == "SKIP"
    assert checks["resume unfrozen"]["verdict"] == "PASS"
    assert "optimizer state tensors" in checks["resume unfrozen"]["numbers"]
    rates = {**checks["speed: GPU only"]["values"]["train"],
             **checks["speed: loader only"]["values"], **checks["speed: pipeline"]["values"]}
    assert set(checks["speed: loader only"]["values"]) == {
        f"{size} 0 workers {kind}" for size in ("250x250", "1024x768")
        for kind in ("float32", "uint8")}
    assert all(rate > 0 for rate in rates.values())
    assert "unfrozen train against GPU only at batch 8" in checks["speed: pipeline"]["numbers"]
    logs = {p.name for p in (out / "logs").iterdir()}
    assert {"cpu_plain_frozen_1_train.log", "cpu_fp32_unfrozen_1_embed.log",
            "1_train_frozen.log", "9_speed_pipeline.log"} <= logs
    assert "epoch 2/2" in (out / "logs" / "cpu_plain_unfrozen_1_resumed_train.log").read_text()
    # The verdict lines on the console, one per check.
    assert [line.split(" (")[0].split(" ", 1)[1] for line in done.stdout.splitlines()
            if line.split(" ")[0] in ("PASS", "FAIL", "INFO", "SKIP")] == NAMES


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without usable CUDA")
def test_required_cuda_missing_stops_at_once_with_one_line(tmp_path):
    done = gpu_check("--require-cuda", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: CUDA required but not usable")
    assert not (tmp_path / "out").exists()  # nothing started


def test_help_describes_every_check_and_option(tmp_path):
    done = gpu_check("--help", cwd=tmp_path)
    assert done.returncode == 0
    for words in ("--out", "--require-cuda", "--quick", "nvidia-smi", "resume", "loader only",
                  "GPU only", "uint8", "Without CUDA"):
        assert words in done.stdout


def test_stage_runs_keep_the_callers_python_path(monkeypatch):
    """On the GPU machine the carried wheels are on PYTHONPATH (docs/gpu.md): the stage
    subprocesses must see them after the repository, not instead of it."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from gpu.runs import python_path
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert python_path() == f"{REPO}{os.pathsep}/tmp/site"
    monkeypatch.delenv("PYTHONPATH")
    assert python_path() == str(REPO)
