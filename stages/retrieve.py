"""Rank the gallery for every query with each epoch's embeddings; measure where labels are known."""
from pathlib import Path

from clipcore import paths
from clipcore.params import load_params
from clipcore.retrieve.retrieval import retrieve_all
from clipcore.stage import run_stage


def main() -> None:
    params = load_params()
    report = retrieve_all(params.retrieve, Path(params.data.root), paths.PREPARED)
    print(report.summary())


if __name__ == "__main__":
    run_stage(main)
