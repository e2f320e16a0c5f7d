"""Write repository/report.html from the metrics, the best epoch's files and the test images."""
from clipcore import paths
from clipcore.params import load_params
from clipcore.report.page import committed_params, write_report
from clipcore.stage import run_stage


def main() -> None:
    params = load_params()
    images = paths.image_root(params.data.crop, params.data.root)  # data.crop face: the crops
    path = write_report(params.report, images, paths.PREPARED, committed_params())
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB): open it in a browser")


if __name__ == "__main__":
    run_stage(main)
