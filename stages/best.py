"""Keep the val-picked epoch in repository/best/: its model file, results and a summary."""
from clipcore import paths
from clipcore.params import load_params
from clipcore.report.best import write_best
from clipcore.report.versus_base import verdict
from clipcore.stage import run_stage


def main() -> None:
    summary = write_best(load_params(), paths.PREPARED)
    val = summary["val"]["score"]
    measured = "no val metrics" if val is None else f"val score {val:.1f}"
    if summary["test"] is not None:
        measured += f", test score {summary['test']['score']:.1f}"
    print(f"best epoch {summary['epoch']} ({summary['picked_by']}; {measured}): "
          f"model, results and summary.json in {paths.BEST}")
    print(verdict(summary["versus_base"]))


if __name__ == "__main__":
    run_stage(main)
