"""Check all of params.yaml against clipcore/params.py's schema (unknown keys at any level, with a
"did you mean", missing keys, types, ranges) before any stage works. dvc.yaml makes it the first
stage and gives it params.yaml itself as a dependency: any edit of the file, even a key no stage
reads, reruns it, and a bad key stops `dvc repro` here."""
from clipcore import paths
from clipcore.files import write_text_atomic
from clipcore.params import load_params
from clipcore.stage import run_stage

# The same text whatever the params: an edit that passes reruns no stage after this one.
CHECKED = "params.yaml matches clipcore/params.py's schema\n"


def main() -> None:
    load_params(paths.PARAMS)
    write_text_atomic(paths.PARAMS_CHECKED, CHECKED)
    print(f"{paths.PARAMS}: every key known and valid")


if __name__ == "__main__":
    run_stage(main)
