"""Check every image under data.root and write the train/val/query/gallery manifests."""
from pathlib import Path

from clipcore import paths
from clipcore.data.manifests import prepare
from clipcore.params import load_params
from clipcore.stage import run_stage


def main() -> None:
    params = load_params()
    report = prepare(Path(params.data.root), paths.PREPARED, params.data, params.seed)
    print(report.summary())


if __name__ == "__main__":
    run_stage(main)
