"""A seed ensemble against the best single model, fused by clipcore.retrieve.fusion, on
bench_accuracy's generated domain (open set: identities never trained on).

Per split (a split seed draws which identities train and which are tested), --members models are
fine-tuned from the same pretrained tiny base with different training seeds (initialisation and
batch order), frozen backbone; each model is its val-picked epoch (class-mixed val, the trainer's
own). The best single model is the one with the highest val score (never the test's); the ensemble
ranks by the equal-weight sum of the members' cosines. Prints per split the members' open-set test
scores, the best single one's, the ensemble's and the gain, then the mean gain over splits with
its Student-t 95% interval.

    OMP_NUM_THREADS=1 python bench/bench_fusion.py [--splits 3] [--members 5] [--epochs 4]
        [--quick]   # QUICK sizes of bench_accuracy (the default here; full sizes: --full)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_accuracy as bench  # noqa: E402

from clipcore import paths  # noqa: E402
from clipcore.data.manifests import read_manifest  # noqa: E402
from clipcore.ranking.measures import metrics_for_indices  # noqa: E402
from clipcore.ranking.search import top_k  # noqa: E402
from clipcore.report.compare import mean_ci  # noqa: E402
from clipcore.retrieve.fusion import embed_images, fused_vectors  # noqa: E402


def open_set(root: Path) -> tuple[list[Path], int, np.ndarray, np.ndarray]:
    frames = {s: read_manifest(root / "prepared", s) for s in ("query", "gallery")}
    images = [root / p for s in ("query", "gallery") for p in frames[s]["path"]]
    return images, len(frames["query"]), frames["query"]["label"].to_numpy(), \
        frames["gallery"]["label"].to_numpy()


def score(query, gallery, query_labels, gallery_labels) -> float:
    return metrics_for_indices(query_labels, gallery_labels, top_k(query, gallery, 10))["score"]


def split_arguments(description: str, splits: int, out: str) -> argparse.ArgumentParser:
    """The options of a bench over splits of several runs each (this one, bench_soup)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--splits", type=int, default=splits)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="bench_accuracy's full sizes")
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def main() -> None:
    args = split_arguments(__doc__.split("\n\n")[0], 3, "/tmp/bench_fusion").parse_args()
    torch.set_num_threads(1)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = bench.Sizes() if args.full else bench.QUICK
    domain = bench.setup_domain("generated", out, sizes, args.epochs, args.pretrain_epochs)
    gains = []
    for split in range(args.splits):
        started = time.perf_counter()
        roots, _ = domain.make_roots(split)
        images, n_query, query_labels, gallery_labels = open_set(roots["open"])
        singles = []  # (val score at the picked epoch, test score, query, gallery)
        for member in range(args.members):
            params = bench.bench_params({**domain.base, **domain.data, **bench.MODES["frozen"],
                                         "seed": 1000 * split + member})
            work = out / f"split{split}_member{member}"
            run = bench.run_pipeline(work, {"open": roots["open"]}, None, params)
            epoch = bench.picked_epoch(run, bench.own_protocol(params))
            vectors = embed_images(work / paths.model_path(epoch), images, desc=f"member {member}")
            query, gallery = vectors[:n_query], vectors[n_query:]
            singles.append((run.val[bench.own_protocol(params)][epoch],
                            score(query, gallery, query_labels, gallery_labels), query, gallery))
        best = max(singles, key=lambda s: s[0])
        weights = [1.0] * len(singles)
        ensemble = score(fused_vectors([s[2] for s in singles], weights),
                         fused_vectors([s[3] for s in singles], weights), query_labels,
                         gallery_labels)
        gains.append(ensemble - best[1])
        print(f"split {split}: members' open test {', '.join(f'{s[1]:.1f}' for s in singles)}; "
              f"best single by val {best[1]:.1f}; ensemble of {len(singles)} {ensemble:.1f} "
              f"({ensemble - best[1]:+.1f}); {time.perf_counter() - started:.0f} s", flush=True)
    mean, half = mean_ci(gains)
    print(f"ensemble - best single, open set, {len(gains)} splits: {mean:+.1f}"
          + (f" ± {half:.1f} (95% t interval)" if half is not None else ""))


if __name__ == "__main__":
    main()
