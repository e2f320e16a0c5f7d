"""The device and the loader workers a run uses: train.device said once (and why auto chose the
CPU), cuda without CUDA refused before any process starts, and num_workers auto from the cores
and the device."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_params

from clipcore.errors import ClipcoreError
from clipcore.model import distributed
from clipcore.model.features import loader_workers

REPO = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def test_tests_compare_cpu_fp32_numbers(params_factory):
    assert params_factory().train.device == "cpu"


@NO_CUDA
def test_auto_says_it_runs_on_the_cpu_and_why(capsys):
    world = distributed.join("auto")
    assert world.device == torch.device("cpu")
    line = capsys.readouterr().out.strip()
    # This machine's torch is built with CUDA and finds no driver: the reason is CUDA's own.
    assert line.startswith("device: cpu, fp32 (train.device auto: ")
    assert ("no usable CUDA GPU: " in line) == (torch.version.cuda is not None)
    distributed.join("cpu")
    assert capsys.readouterr().out.strip() == "device: cpu, fp32"


@NO_CUDA
def test_cuda_without_cuda_stops_before_torchrun_starts(tmp_path):
    write_params(tmp_path, {"train.device": "cuda", "train.processes": 2})
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.device is cuda but ")


@pytest.mark.parametrize(("device", "cores", "processes", "workers"), [
    ("cpu", 2, 1, 0),    # a worker would take a core the model runs on
    ("cpu", 16, 1, 4),
    ("cpu", 16, 8, 0),
    ("cuda", 2, 1, 1),   # one core left to the main process that feeds the GPU
    ("cuda", 16, 1, 15),
    ("cuda", 16, 4, 3),  # the node's cores shared by its processes
])
def test_auto_workers_follow_the_cores_per_process_and_the_device(
        monkeypatch, device, cores, processes, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert loader_workers("auto", torch.device(device)) == workers
    assert loader_workers(3, torch.device(device)) == 3


@pytest.mark.parametrize("value", ["many", -1, 1.5])
def test_num_workers_is_a_count_or_auto(params_factory, value):
    assert params_factory({"train.num_workers": "auto"}).train.num_workers == "auto"
    with pytest.raises(ClipcoreError, match=r"'embed.num_workers' must be"):
        params_factory({"embed.num_workers": value})
