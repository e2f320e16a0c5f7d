"""Which validation predicts the test (issue 29 item 4): how well each protocol's val score ranks
a run's epochs on test, on the generated domain with the file names hidden from `auto`.

bench_accuracy's harness (its generated domain, base pretrained on other identities, class split,
open set). Each seed trains one run (the protocol changes no training step); then every epoch's
model embeds the val, training and test images once, and each protocol scores the same
embeddings with the trainer's own validation_metrics:

- `class-mixed`: today's (held-out identities query each other, both renderings);
- `photo_*`: data.val_queries photo_* (the file names tell the renderings);
- `auto`: data.val_queries auto, the masks the trainer itself draws (a query-vs-gallery classifier
  of the unlabelled test images on base features; it never sees a name);
- each `+ train_others` / `+ test_gallery`: data.val_distractors.

Printed: auto's accuracy against the true photo_/render_ names (val and training images), and per
protocol Spearman's rho of val vs test score over the epochs of a run (mean over seeds, 95% t
interval), and the test score at the epoch it picks minus epoch 0's.

    OMP_NUM_THREADS=1 python bench/bench_validation.py [--seeds 5] [--epochs 6]
        [--modes unfrozen] [--quick]
"""
from __future__ import annotations

import argparse
import warnings
import contextlib
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import (MODES, QUICK, Sizes, bench_params, mean_ci,  # noqa: E402
                            setup_domain)

from clipcore import paths  # noqa: E402
from clipcore.report import compare  # noqa: E402
from clipcore.data.manifests import read_manifest  # noqa: E402
from clipcore.demo.domain import rendering_of  # noqa: E402
from clipcore.ranking.measures import metrics_for_indices  # noqa: E402
from clipcore.ranking.search import top_k  # noqa: E402
from clipcore.retrieve.embedding import embed_all  # noqa: E402
from clipcore.train.training import Trainer, train  # noqa: E402
from clipcore.train.validation import query_rows, validation_metrics  # noqa: E402

QUERIES = ("class-mixed", "photo_*", "auto")
DISTRACTORS = ("none", "train_others", "test_gallery")


def protocols() -> list[tuple[str, str]]:
    return [(queries, distractors) for queries in QUERIES for distractors in DISTRACTORS]


def label(protocol: tuple[str, str]) -> str:
    queries, distractors = protocol
    return queries if distractors == "none" else f"{queries} + {distractors}"


def everything(prepared: Path, out: Path) -> dict[str, slice]:
    """Manifests that make embed_all embed val, train and test query images as "query" and the
    test gallery as "gallery"; returns each part's rows in "query"."""
    out.mkdir(parents=True, exist_ok=True)
    parts = [read_manifest(prepared, split) for split in ("val", "train", "query")]
    pd.concat(parts).to_csv(out / "query.csv", index=False)
    read_manifest(prepared, "gallery").to_csv(out / "gallery.csv", index=False)
    ends = np.cumsum([0] + [len(p) for p in parts])
    return {name: slice(ends[i], ends[i + 1]) for i, name in enumerate(("val", "train", "query"))}


def masks_of(overrides: dict, root: Path, prepared: Path) -> dict[str, tuple]:
    """Each query protocol's (val, train) masks: none, the names', the trainer's auto."""
    val = read_manifest(prepared, "val")["path"].tolist()
    train_paths = read_manifest(prepared, "train")["path"].tolist()
    auto = Trainer(bench_params({**overrides, "data.val_queries": "auto"}),
                   root, prepared).plan.masks
    return {"class-mixed": (None, None),
            "photo_*": (query_rows(val, "photo_*"), query_rows(train_paths, "photo_*")),
            "auto": auto}


def run_seed(work: Path, root: Path, overrides: dict) -> dict:
    """One training run; per protocol its val scores by epoch, the test scores by epoch, and
    auto's agreement with the names."""
    params = bench_params(overrides)
    prepared = root / "prepared"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with contextlib.chdir(work):
        history = train(params, root, prepared)
        rows = everything(prepared, work / "everything")
        embed_all(params, root, work / "everything")
        masks = masks_of(overrides, root, prepared)
        frames = {s: read_manifest(prepared, s) for s in ("val", "train", "query", "gallery")}
        labels = {s: frame["label"].to_numpy() for s, frame in frames.items()}
        classes = {name: i for i, name in enumerate(sorted(set(labels["val"]) | set(labels["train"])))}
        val_labels = np.array([classes[x] for x in labels["val"]])
        train_labels = np.array([classes[x] for x in labels["train"]])
        val_scores = {label(p): {} for p in protocols()}
        test_scores = {}
        for file in paths.epoch_files(paths.EMBEDDINGS, "epoch_*.npz"):
            epoch = paths.epoch_of(file)
            with np.load(file) as saved:
                query, gallery = saved["query"], saved["gallery"]
            val, trained, test_query = (query[rows[s]] for s in ("val", "train", "query"))
            test_scores[epoch] = metrics_for_indices(
                labels["query"], labels["gallery"], top_k(test_query, gallery, 10, "cosine"))["score"]
            for queries, distractors in protocols():
                val_mask, train_mask = masks[queries]
                extra = {"none": None, "test_gallery": gallery,
                         "train_others": trained if train_mask is None else trained[~train_mask]}
                measures = validation_metrics(val, val_labels, params.train.val_top_k,
                                              trained, train_labels, val_mask, train_mask,
                                              distractors=extra[distractors])
                val_scores[label((queries, distractors))][epoch] = measures["score"]
    truth = {s: np.array([rendering_of(p) == "photo" for p in frames[s]["path"]])
             for s in ("val", "train")}
    check = max(abs(row["score"] - val_scores["class-mixed"][row["epoch"]]) for row in history)
    return {"val": val_scores, "test": test_scores, "mixed_vs_trainer": check,
            "auto_accuracy": {s: float(np.mean(masks["auto"][i] == truth[s]))
                              for i, s in enumerate(("val", "train"))},
            "val_images": len(val_labels), "gallery_sizes": _gallery_sizes(masks, rows, frames)}


def _gallery_sizes(masks, rows, frames) -> dict[str, int]:
    val_gallery = len(frames["val"]) - int(np.sum(masks["photo_*"][0]))
    return {"photo_* val gallery": val_gallery, "train_others": len(frames["train"]),
            "test_gallery": len(frames["gallery"])}


def spearman(val: dict, test: dict) -> float:
    epochs = sorted(test)
    with warnings.catch_warnings():  # a constant val score: no rho, counted as 0 below
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = stats.spearmanr([val[e] for e in epochs], [test[e] for e in epochs]).statistic
    return float(rho) if np.isfinite(rho) else 0.0  # a constant val score ranks nothing


def rho_ci(values) -> str:
    """mean_ci with two decimals: a rho lives in [-1, 1]."""
    mean, half = compare.mean_ci([float(v) for v in values])
    return f"{mean:+.2f}" + ("" if half is None else f" ± {half:.2f}")


def report(mode: str, runs: list[dict]) -> None:
    print(f"\n## {mode}: {len(runs)} seeds, epochs 0-{max(runs[0]['test'])}; val images "
          f"{runs[0]['val_images']}; {runs[0]['gallery_sizes']}")
    print("auto vs the true names (share of images it calls right): val "
          f"{mean_ci([100 * r['auto_accuracy']['val'] for r in runs])} %, training "
          f"{mean_ci([100 * r['auto_accuracy']['train'] for r in runs])} %")
    print("class-mixed recomputed vs the trainer's own row: max |diff| "
          f"{max(r['mixed_vs_trainer'] for r in runs):.2g}")
    print(f"test: epoch 0 {mean_ci([r['test'][0] for r in runs])}, best epoch "
          f"{mean_ci([max(r['test'].values()) for r in runs])}")
    print("| protocol | Spearman rho, val vs test over epochs | rho - class-mixed's (paired) | "
          "test at its pick - epoch 0 |")
    print("|---|---|---|---|")
    today = [spearman(r["val"]["class-mixed"], r["test"]) for r in runs]
    for protocol in map(label, protocols()):
        rhos = [spearman(r["val"][protocol], r["test"]) for r in runs]
        gains = [r["test"][max(r["val"][protocol], key=r["val"][protocol].get)] - r["test"][0]
                 for r in runs]
        print(f"| {protocol} | {rho_ci(rhos)} | {rho_ci(np.subtract(rhos, today))} | "
              f"{mean_ci(gains)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--modes", default="unfrozen")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 epochs, small")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_validation"))
    args = parser.parse_args()
    sizes, seeds = (QUICK, range(2)) if args.quick else (Sizes(), range(args.seeds))
    epochs, pretrain = (2, 3) if args.quick else (args.epochs, args.pretrain_epochs)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    domain = setup_domain("generated", out, sizes, epochs, pretrain)
    for mode in args.modes.split(","):
        runs = []
        for seed in seeds:
            started = time.perf_counter()
            roots, _ = domain.make_roots(seed)
            overrides = {**domain.base, **MODES[mode], **domain.data, "seed": seed}
            runs.append(run_seed(out / "run", roots["open"], overrides))
            print(f"  done: seed {seed}, {mode} ({time.perf_counter() - started:.0f} s)", flush=True)
        report(mode, runs)


if __name__ == "__main__":
    main()
