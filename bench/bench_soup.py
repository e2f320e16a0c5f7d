"""Weight soups of several runs against the best single run and the ensemble, on bench_accuracy's
generated domain (open set: identities never trained on).

Per split (a split seed draws which identities train and which are tested), --members runs are
fine-tuned from the same pretrained base with different training seeds, backbone unfrozen by
default (a frozen run's soup only averages heads); each run is its val-picked epoch (class-mixed
val, the trainer's own). Then, with clipcore.soup's own code:
- best single: the run with the highest val score (never the test's);
- uniform soup: the mean of every run's trained weights;
- greedy soup: runs tried best val first, each kept if the soup's val score does not drop
  (the val score: every val image querying the others, as `python -m clipcore.soup` scores);
- ensemble: the equal-weight sum of the runs' cosines (clipcore.retrieve.fusion), for scale.
Prints per split the four open-set test scores, then each one's mean difference from the best
single run over the splits, with its Student-t 95% interval.

    OMP_NUM_THREADS=1 python bench/bench_soup.py [--splits 5] [--members 5] [--epochs 4]
        [--mode unfrozen|frozen] [--full]   # bench_accuracy's QUICK sizes unless --full
        [--stand-in tiny-deep]             # the 6-block stand-in (its base: --out)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_accuracy as bench  # noqa: E402
from bench_fusion import open_set, score, split_arguments  # noqa: E402

from clipcore import paths  # noqa: E402
from clipcore.data.manifests import read_manifest  # noqa: E402
from clipcore.model.checkpoint import load_model_file  # noqa: E402
from clipcore.report.compare import mean_ci  # noqa: E402
from clipcore.retrieve.fusion import embed_images, fused_vectors, val_score  # noqa: E402
from clipcore.soup import cook, greedy  # noqa: E402

ROWS = ("uniform soup", "greedy soup", "ensemble")


def split_scores(domain, split: int, members: int, mode: str, out: Path) -> dict[str, float]:
    """The open-set test score of the best single run, both soups and the ensemble of one split."""
    roots, _ = domain.make_roots(split)
    root = roots["open"]
    images, n_query, query_labels, gallery_labels = open_set(root)
    val = read_manifest(root / "prepared", "val")
    val_images, val_labels = [root / p for p in val["path"]], val["label"].to_numpy()

    def test_score(vectors) -> float:
        return score(vectors[:n_query], vectors[n_query:], query_labels, gallery_labels)

    runs = []  # (model, tower trained) at each run's val-picked epoch
    for member in range(members):
        params = bench.bench_params({**domain.base, **domain.data, **bench.MODES[mode],
                                     "seed": 1000 * split + member})
        work = out / f"split{split}_member{member}"
        run = bench.run_pipeline(work, {"open": root}, None, params)
        epoch = bench.picked_epoch(run, bench.own_protocol(params))
        runs.append(load_model_file(work / paths.model_path(epoch)))
    val_scores: dict[tuple[int, ...], float] = {}

    def soup_val(chosen: list[int]) -> float:
        key = tuple(sorted(chosen))
        if key not in val_scores:
            soup, _ = cook([runs[i] for i in key])
            val_scores[key] = val_score(embed_images(soup, val_images, desc="val"), val_labels)
        return val_scores[key]

    singles = [embed_images(model, images, desc=f"run {i}") for i, (model, _) in enumerate(runs)]
    best = max(range(members), key=lambda i: soup_val([i]))
    kept, _ = greedy(members, soup_val)
    scores = {"best single": test_score(singles[best]),
              "uniform soup": test_score(embed_images(cook(runs)[0], images, desc="uniform")),
              "greedy soup": test_score(embed_images(cook([runs[i] for i in kept])[0], images,
                                                     desc="greedy")),
              "ensemble": test_score(fused_vectors(singles, [1.0] * members))}
    print(f"split {split}: runs' open test {', '.join(f'{test_score(s):.1f}' for s in singles)}; "
          + "; ".join(f"{name} {value:.1f}" for name, value in scores.items())
          + f" (greedy kept {len(kept)} of {members})", flush=True)
    return scores


def main() -> None:
    parser = split_arguments(__doc__.split("\n\n")[0], 5, "/tmp/bench_soup")
    parser.add_argument("--mode", choices=tuple(bench.MODES), default="unfrozen")
    parser.add_argument("--stand-in", default="tiny", choices=("tiny", "tiny-deep"),
                        help="bench_accuracy's model (its base cached under --out)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = bench.Sizes() if args.full else bench.QUICK
    domain = bench.setup_domain("generated", out, sizes, args.epochs, args.pretrain_epochs,
                                args.stand_in)
    per_split = []
    for split in range(args.splits):
        started = time.perf_counter()
        per_split.append(split_scores(domain, split, args.members, args.mode, out))
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    single, half = mean_ci([s["best single"] for s in per_split])
    print(f"{args.mode}, open set, {len(per_split)} splits of {args.members} runs: best single "
          f"{single:.1f}" + (f" ± {half:.1f}" if half is not None else ""))
    for row in ROWS:
        mean, half = mean_ci([s[row] - s["best single"] for s in per_split])
        print(f"  {row} - best single: {mean:+.1f}"
              + (f" ± {half:.1f} (95% t interval)" if half is not None else ""))


if __name__ == "__main__":
    main()
