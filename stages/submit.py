"""Submit every epoch's retrieval results (or score them locally) and record the accuracies."""
from clipcore import paths
from clipcore.params import load_params
from clipcore.stage import run_stage
from clipcore.submit.history import history_path
from clipcore.submit.submission import submit_all


def main() -> None:
    params = load_params()
    outcomes = submit_all(params.submit, paths.RESULTS, paths.PREPARED, paths.SUBMISSION_CSV,
                          paths.SUBMISSION_METRICS, history_path(),
                          legacy_history=paths.LEGACY_SUBMISSION_HISTORY)
    print(f"recorded {len(outcomes)} epochs in {paths.SUBMISSION_CSV}")


if __name__ == "__main__":
    run_stage(main)
