"""`--help` on every stage script and every command says what it does (and, for a stage, what it
reads and writes) and does nothing else: no stage runs, no file is written."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_params

REPO = Path(__file__).resolve().parents[2]
STAGES = sorted(f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")
COMMANDS = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "clipcore").rglob("*.py")
    if 'if __name__ == "__main__"' in p.read_text())


def _run(module: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=folder, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def _what_it_does(module: str) -> str:
    """The first sentence of the module's docstring, whitespace as argparse may wrap it."""
    doc = ast.get_docstring(ast.parse(REPO.joinpath(*module.split(".")).with_suffix(".py")
                                      .read_text()))
    return " ".join(doc.split(".\n")[0].split())


def test_every_stage_and_command_is_found():
    assert "stages.train" in STAGES and len(STAGES) >= 8
    assert {"clipcore.index", "clipcore.query", "clipcore.serve", "clipcore.export"} <= set(COMMANDS)


@pytest.mark.parametrize("module", STAGES + COMMANDS)
def test_help_says_what_it_does_and_writes_nothing(module, tmp_path):
    # A params.yaml a stage could run with: --help must still run nothing.
    write_params(tmp_path, {"model.name": "tiny", "model.pretrained": "none"})
    done = _run(module, tmp_path, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python -m {module}")
    assert _what_it_does(module) in " ".join(done.stdout.split())
    if module.startswith("stages."):
        assert "reads:" in done.stdout and "writes:" in done.stdout
        assert f"dvc repro {module.split('.')[1]}" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_stage_refuses_an_argument_it_does_not_take(tmp_path):
    write_params(tmp_path)
    done = _run("stages.demo", tmp_path, "--epochs", "3")
    assert done.returncode == 2
    assert "unrecognized arguments: --epochs 3" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
