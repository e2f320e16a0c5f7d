"""The house's layout (docs/layout.md): clipcore's packages import only the packages below them,
no two packages import each other, and no module outgrows a quick read."""
from __future__ import annotations

import ast
from pathlib import Path

CLIPCORE = Path(__file__).parents[1] / "clipcore"
MAX_LINES = 350
FOUNDATIONS = {"errors", "files", "params", "params_parsing", "paths", "stage"}
# What each package may import besides the foundations (docs/layout.md draws the same picture).
MAY_IMPORT = {
    "data": set(),
    "demo": set(),
    "crop": {"data"},
    "ranking": set(),
    "model": {"data"},
    "train": {"data", "ranking", "model"},
    "retrieve": {"data", "ranking", "model"},
    "submit": {"data", "ranking"},
    "inference": {"data", "crop", "ranking", "model", "retrieve"},
    "report": {"data", "ranking", "model", "retrieve", "submit"},
}


def _unit(path: Path) -> str:
    """A module's place: its package, a foundation's name, or a command's name."""
    return path.relative_to(CLIPCORE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipcore."):
            units.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "clipcore":
            units |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            units |= {a.name.split(".")[1] for a in node.names if a.name.startswith("clipcore.")}
    return units


def _modules():
    return sorted(p for p in CLIPCORE.rglob("*.py") if p.name != "__init__.py" or p.parent != CLIPCORE)


def test_every_package_is_placed_in_the_layout():
    units = {_unit(p) for p in _modules()}
    commands = {u for u in units if (CLIPCORE / f"{u}.py").is_file()} - FOUNDATIONS
    packages = units - FOUNDATIONS - commands
    assert packages == set(MAY_IMPORT), "a new package needs its place in MAY_IMPORT and docs/layout.md"


def test_packages_import_only_what_lies_below_them():
    against = []
    for path in _modules():
        unit = _unit(path)
        if unit in FOUNDATIONS:
            allowed = FOUNDATIONS
        elif unit in MAY_IMPORT:
            allowed = FOUNDATIONS | MAY_IMPORT[unit] | {unit}
        else:  # a command (python -m clipcore.<name>) may use anything; nothing imports it
            continue
        against += [f"{path.relative_to(CLIPCORE)} imports clipcore.{u}"
                    for u in sorted(_imported_units(path) - allowed)]
    assert against == []


def test_no_import_cycle_between_packages():
    # MAY_IMPORT itself must be a hierarchy: with the test above, the code then has no cycle.
    def reaches(start: str, goal: str, seen=()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,)))
                   for n in MAY_IMPORT[start])
    assert [p for p in MAY_IMPORT if reaches(p, p)] == []


def test_no_module_over_350_lines():
    long = {str(p.relative_to(CLIPCORE)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
