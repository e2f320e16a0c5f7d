"""A copy of this project in a temporary git repo, and the real git and dvc commands the
pipeline tests run in it (tests/pipeline, tests/report and tests/submit import these)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, with_overrides, write_params

# The tiny random-init model, 2 epochs, no loader workers: the whole pipeline in seconds.
SMOKE = {"model.name": "tiny", "model.pretrained": "none", "train.epochs": 2,
         "train.num_workers": 0, "embed.num_workers": 0}


def run(cwd: Path, *args: str, fails: bool = False) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert (done.returncode != 0) == fails, f"{' '.join(args)}: exit {done.returncode}:\n" \
                                            f"{output[-4000:]}"
    return output


def dvc(cwd: Path, *args: str, fails: bool = False) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args, fails=fails)


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", *args)


def set_params(project: Path, values: dict) -> None:
    """Change keys of the project's params.yaml, as `dvc exp run -S` would."""
    params = with_overrides(yaml.safe_load((project / "params.yaml").read_text()), values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_project(dest: Path) -> None:
    """The code and pipeline git would carry (tracked or not ignored), without the workspace's
    params, outputs and lock file (tests never depend on them): the tests' own params instead."""
    listed = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard").split("\n")
    for name in filter(None, listed):
        source, top = REPO / name, name.split("/")[0]
        output = top in {"data", "repository"} and source.name not in {"README.md", ".gitignore"}
        if (source.is_file() and top not in {"tests", "bench"} and not output
                and name not in {"dvc.lock", "params.yaml"}):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    write_params(dest)


def new_project(root: Path, params: dict) -> Path:
    """The project copied into root as a git repo whose first commit holds these params (dvc
    exp and dvclive need a commit)."""
    copy_project(root)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "clipcore test")
    git(root, "config", "user.email", "test@clipcore.invalid")
    set_params(root, params)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "baseline params")
    return root
