"""Where each stage reads and writes, relative to the project root.

dvc.yaml names the same paths; keep the two in step.
"""
import re
from pathlib import Path

PARAMS = Path("params.yaml")
DEMO_ROOT = Path("data/demo")
DEMO_LABELS = "test_labels.csv"          # inside a data root: split,file,label of test images
PREPARED = Path("data/prepared")         # train.csv, val.csv, query.csv, gallery.csv, skipped.csv
CROPPED = Path("data/cropped")           # data.crop face: each manifest image's face crop, same relative path
CROP_REPORT = CROPPED / "crop_report.csv"  # split,path,face,score,box,angle of every image (face 0: kept whole)
REPOSITORY = Path("repository")
PARAMS_CHECKED = REPOSITORY / "params_checked.txt"  # stages/check_params.py: params.yaml passed
METRICS = REPOSITORY / "metrics"
TRAINING_METRICS_CSV = METRICS / "training_metrics.csv"
VAL_QUERY_SCORES = METRICS / "val_query_scores.json"  # each epoch's points per val query
TRAIN_LIVE = METRICS / "train"           # dvclive: metrics.json and plots/metrics/*.tsv
RETRIEVAL_METRICS = METRICS / "retrieval.json"
RETRIEVAL_PLOT = METRICS / "retrieval_by_epoch.csv"
SUBMISSION_METRICS = METRICS / "submission.json"
CHECKPOINTS = REPOSITORY / "checkpoints"  # weights_epoch_X.pth: enough to resume training
ALL_WEIGHTS = REPOSITORY / "all_weights"  # model_epoch_X.pt: what inference needs
EMBEDDINGS = REPOSITORY / "embeddings"    # epoch_X.npz: query, gallery, query_names, gallery_names
RESULTS = REPOSITORY / "results"          # retrieval_results_epoch_X.json
PICTURES = RESULTS / "pictures"           # epoch_X.png
SUBMISSION_CSV = REPOSITORY / "submission_accuracy.csv"
# Where versions before issue 28 kept the submission history, in git: merged into the user's
# history (clipcore.submit.history.history_path) when present.
LEGACY_SUBMISSION_HISTORY = REPOSITORY / "submission_history.csv"
BEST = REPOSITORY / "best"                # the val-picked epoch (clipcore/report/best.py), a DVC artifact
BEST_MODEL = BEST / "model.pt"
BEST_RESULTS = BEST / "retrieval_results.json"
BEST_SUMMARY = BEST / "summary.json"
REPORT = REPOSITORY / "report.html"       # one self-contained page per run (clipcore/report/page.py)


def image_root(crop: str, root: str | Path) -> Path:
    """Where the stages that read pixels (train, embed, report) find the manifests' images: the
    crop stage's face crops (data.crop face) or data.root itself; both hold the manifest paths."""
    return CROPPED if crop == "face" else Path(root)


def checkpoint_path(epoch: int) -> Path:
    return CHECKPOINTS / f"weights_epoch_{epoch}.pth"


def model_path(epoch: int) -> Path:
    return ALL_WEIGHTS / f"model_epoch_{epoch}.pt"


def embeddings_path(epoch: int) -> Path:
    return EMBEDDINGS / f"epoch_{epoch}.npz"


def results_path(epoch: int) -> Path:
    return RESULTS / f"retrieval_results_epoch_{epoch}.json"


def picture_path(epoch: int) -> Path:
    return PICTURES / f"epoch_{epoch}.png"


def epoch_of(path: Path) -> int:
    """The X in any of the per-epoch file names above."""
    stem = Path(path).stem
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: no epoch number in the file name") from None


def epoch_files(folder: Path, pattern: str) -> list[Path]:
    """Per-epoch files in a folder, sorted by epoch number (not by name: 10 after 9). Only names
    ending in _<number>: a stray `model_epoch_1 (copy).pt` is no epoch's file."""
    return sorted((p for p in Path(folder).glob(pattern) if re.fullmatch(r".*_\d+", p.stem)),
                  key=epoch_of)
