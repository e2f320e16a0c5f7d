"""dvc.yaml's deps name every clipcore module a stage runs: a change to one must rerun the stage
(and a module it no longer runs must not). A hand-kept list drifts as modules split."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).parents[1]
# No pipeline logic: their changes show up as params or as a failing run (dvc.yaml's header).
NOT_DEPS = {"errors", "params", "paths", "stage"}


def _imported_clipcore_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "clipcore":
                names |= {alias.name for alias in node.names}
            elif node.module.startswith("clipcore."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("clipcore.")}
    return {n for n in names if (REPO / "clipcore" / f"{n}.py").exists()}


def _modules_run_by(script: Path) -> set[str]:
    seen, todo = set(), _imported_clipcore_modules(script)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= _imported_clipcore_modules(REPO / "clipcore" / f"{name}.py")
    return seen - NOT_DEPS


def test_every_stage_depends_on_exactly_the_clipcore_modules_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    wrong = {}
    for name, stage in stages.items():
        script = REPO / "stages" / f"{stage['cmd'].split('-m stages.')[1].split()[0]}.py"
        declared = {Path(d).stem for d in stage["deps"]
                    if d.startswith("clipcore/") and d.endswith(".py")}
        run = _modules_run_by(script)
        if run != declared:
            wrong[name] = {"missing": sorted(run - declared), "not run": sorted(declared - run)}
    assert wrong == {}, "dvc.yaml deps differ from the modules each stage runs"
