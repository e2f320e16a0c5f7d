"""The metric names that README.md and docs/*.md quote (`best_on_server.accuracy`, `epochs.3`,
...) and the names a run's metrics files hold (`dvc metrics show --json`), epoch numbers as N:
tests/pipeline/test_workflow.py checks the first against the second on its real run."""
from __future__ import annotations

import re

from conftest import REPO

from clipcore.params import dotted

# A dotted name whose first part is a top-level key of the metrics files (best_on_server,
# best_on_test, epochs; and best, their name before), not a file name such as best.py.
QUOTED = re.compile(r"(?<![\w./-])((?:best\w*|epochs)(?:\.\w+)+)")
FILE_SUFFIXES = (".py", ".json", ".csv", ".pt", ".pth", ".md", ".yaml", ".html", ".png", ".tsv")


def generic(name: str) -> str:
    """`epochs.10.score` -> `epochs.N.score`: the docs quote epochs a short run has not got."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "N", name)


def quoted_metric_names() -> dict[str, list[str]]:
    """Each metric name the README and docs/ pages quote, with the pages that quote it."""
    found: dict[str, list[str]] = {}
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for name in QUOTED.findall(page.read_text(encoding="utf-8")):
            if not name.endswith(FILE_SUFFIXES):
                found.setdefault(name, []).append(page.name)
    return found


def shown_metric_names(show: dict) -> set[str]:
    """Every metric of `dvc metrics show --json` output, epochs as N."""
    return {generic(name) for workspace in show.values()
            for metrics in workspace["data"].values() for name in dotted(metrics["data"])}
