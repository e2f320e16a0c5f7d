"""The stages a training machine runs work without dvc and dvclive installed (the GPU machine
has neither): demo, prepare, train, embed and retrieve, run as `python -m stages.X`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import write_params

from clipcore import paths

REPO = Path(__file__).resolve().parents[2]
# `import dvc` / `import dvclive` then fail as they do where the packages are not installed.
WITHOUT_DVC = """
import runpy, sys
sys.modules.update({"dvc": None, "dvclive": None})
sys.argv = ["stage"]
for stage in ["stages.demo", "stages.prepare", "stages.train", "stages.embed", "stages.retrieve"]:
    runpy.run_module(stage, run_name="__main__")
"""


def test_training_stages_run_without_dvc_or_dvclive(tmp_path):
    write_params(tmp_path, {"model.name": "tiny", "model.pretrained": "none", "train.epochs": 1,
                            "train.num_workers": 0, "embed.num_workers": 0})
    done = subprocess.run([sys.executable, "-c", WITHOUT_DVC], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dvclive is not installed" in done.stderr
    assert list(pd.read_csv(tmp_path / paths.TRAINING_METRICS_CSV)["epoch"]) == [0, 1]
    assert (tmp_path / paths.results_path(1)).is_file()
