"""dvc.yaml's deps cover every clipcore module a stage runs, so that a change to one reruns the
stage, and name nothing it does not run, so that no change reruns it for nothing. The rule
(dvc.yaml's header): a package folder where the stage runs all of it, single modules otherwise."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).parents[2]
CLIPCORE = REPO / "clipcore"
# No pipeline logic: their changes show up as params or as a failing run (dvc.yaml's header).
NOT_DEPS = {CLIPCORE / f"{name}.py" for name in ("errors", "params", "params_parsing", "paths", "stage")}
# ...but in the stage that checks params.yaml against the schema: the schema is its logic.
SCHEMA = {CLIPCORE / "params.py", CLIPCORE / "params_parsing.py"}


def _module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """The clipcore module files `path` imports, each package's __init__ on the way included."""
    dotted = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipcore"):
            dotted.add(node.module)
            dotted |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import mod`
        elif isinstance(node, ast.Import):
            dotted |= {a.name for a in node.names if a.name.startswith("clipcore.")}
    files = set()
    for name in dotted:
        parts = name.split(".")
        for end in range(2, len(parts) + 1):  # clipcore.train.losses: train/__init__, losses/__init__
            found = _module_file(".".join(parts[:end]))
            if found:
                files.add(found)
    return files


def _run_by(script: Path) -> set[Path]:
    seen, todo = set(), _imports(script)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo |= _imports(path)
    return seen - (NOT_DEPS - SCHEMA if script.stem == "check_params" else NOT_DEPS)


def _only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _stages():
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        script = REPO / "stages" / f"{stage['cmd'].split('-m stages.')[1].split()[0]}.py"
        declared = [REPO / d for d in stage["deps"] if d.startswith("clipcore/")]
        yield name, _run_by(script), declared


def test_deps_cover_every_module_a_stage_runs():
    missing = {}
    for name, run, declared in _stages():
        covered = {p for d in declared for p in ([d] if d.is_file() else d.rglob("*.py"))}
        uncovered = {p for p in run - covered if not _only_a_docstring(p)}
        if uncovered:
            missing[name] = sorted(str(p.relative_to(REPO)) for p in uncovered)
    assert missing == {}, "a change to these modules would not rerun the stage"


def test_deps_name_only_what_a_stage_runs():
    extra = {}
    for name, run, declared in _stages():
        for dep in declared:
            if dep.is_dir():
                # A folder is a dep only where the stage runs all of its modules.
                unused = [p for p in dep.rglob("*.py") if p not in run]
            else:
                unused = [dep] if dep.suffix == ".py" and dep not in run else []
            if unused:
                extra[name] = sorted(str(p.relative_to(REPO)) for p in unused)
    assert extra == {}, "a change to these would rerun the stage for nothing"


def test_train_has_at_most_nine_deps():
    # Nine since the crop stage: data/cropped holds train's pixels when data.crop is face.
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert len(train["deps"]) <= 9, train["deps"]
