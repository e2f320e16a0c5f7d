"""Wall time of the whole demo pipeline (tiny model) and of a no-op `dvc repro` after it.

Runs in a throw-away clone of this repository's last commit:
    python bench/bench_dvc.py
Goal: a no-op `dvc repro` under 3 s.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = {"model": {"name": "tiny", "pretrained": "none"}}


def timed(cwd: Path, *args: str) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
        params = yaml.safe_load((project / "params.yaml").read_text())
        for section, values in SMOKE.items():
            params[section].update(values)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dvc = [sys.executable, "-m", "dvc", "repro"]
        full = timed(project, *dvc)
        noop = [timed(project, *dvc) for _ in range(3)]
        print(f"whole demo pipeline, tiny model, {params['train']['epochs']} epochs: {full:.1f} s")
        print(f"no-op dvc repro: best {min(noop):.2f} s, mean {sum(noop) / 3:.2f} s "
              f"(goal < 3 s); no-op / full = {min(noop) / full:.3f}")


if __name__ == "__main__":
    main()
