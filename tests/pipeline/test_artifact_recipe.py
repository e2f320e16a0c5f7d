"""The README's recipe for the best model as a DVC artifact, run line by line with real git and
dvc in a temporary repo that pushes to a bare git "origin" and a local-folder DVC remote, then
fetched with `dvc artifacts get` from origin, as another machine would. The project's own
`artifacts:` entry is used; a one-stage pipeline stands in for the run (its model file is a few
bytes), so the test takes seconds."""
from __future__ import annotations

import re

import yaml
from dvc_project import REPO, dvc, git, run

README_REMOTE = "/mnt/shared/clipcore-cache"
README_REPO = "<repo url or path>"


def readme_recipe() -> list[str]:
    """The commands of the README's bash block that tags best-model, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "best-model@" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def a_finished_run(tmp_path):
    """A git + DVC project (pushed once to a bare origin) whose `best` stage wrote
    repository/best, declared as the project's dvc.yaml declares the artifact."""
    origin, project = tmp_path / "origin.git", tmp_path / "project"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "-q", str(origin), str(project))
    git(project, "config", "user.name", "clipcore test")
    git(project, "config", "user.email", "test@clipcore.invalid")
    dvc(project, "init", "-q")
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    write = ("import pathlib; p = pathlib.Path('repository/best'); p.mkdir(parents=True); "
             "(p / 'model.pt').write_text('the val-picked model')")
    (project / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"best": {"cmd": f'python -c "{write}"', "outs": ["repository/best"]}},
        "artifacts": artifacts}))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "project")
    git(project, "push", "-q", "-u", "origin", "main")
    dvc(project, "repro")
    return origin, project


def test_the_readmes_artifact_recipe_works_from_another_clone(tmp_path):
    origin, project = a_finished_run(tmp_path)
    remote = tmp_path / "dvc-remote"
    for line in readme_recipe():
        line = line.replace(README_REMOTE, str(remote)).replace(README_REPO, str(origin))
        line = line.replace("-o best", f"-o {tmp_path / 'fetched'}")
        run(project, "bash", "-c", line)
    assert (tmp_path / "fetched" / "model.pt").read_text() == "the val-picked model"
