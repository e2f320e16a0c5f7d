"""Decode once (issue 25, 3c/3d): an unfrozen run's validation and its embed stage, for this tree
and an earlier revision's, on the same generated images: validation now takes the pixels it
decoded at epoch 0, embed decodes the query and gallery once for all model files and builds one
model for them, the training loader is made once. One run prints both, and whether the two
trees' numbers are the same (they must be: the cached pixels are the same tensors).

    python bench/bench_decode_once.py                   # tiny model, 224 px PNGs, against fb22319
    python bench/bench_decode_once.py --epochs 3 --identities 200 --before HEAD~3

Each tree trains `--epochs` unfrozen epochs and embeds the epoch 0..N model files in its own
process (its own params.yaml with the overrides below), so the two trees' code never mix.
Validation time: the trainer's evaluate calls (epoch 0's included, which both trees decode for).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore.demo.domain import write_domain  # noqa: E402
from clipcore.params import with_overrides  # noqa: E402

# Run in each tree's own process, in a run folder holding its params.yaml.
RUN = """
import json, time
from pathlib import Path
from clipcore.data.manifests import prepare
from clipcore.params import load_params
from clipcore.retrieve.embedding import embed_all
from clipcore.train import training
params = load_params("params.yaml")
root, prepared = Path(params.data.root), Path("data/prepared")
prepare(root, prepared, params.data, params.seed)
validation = []
evaluate = training.Trainer.evaluate
def timed(self, *args, **kwargs):
    started = time.perf_counter()
    row = evaluate(self, *args, **kwargs)
    validation.append(time.perf_counter() - started)
    return row
training.Trainer.evaluate = timed
started = time.perf_counter()
training.train(params, root, prepared)
train_s = time.perf_counter() - started
started = time.perf_counter()
report = embed_all(params, root, prepared)
print(json.dumps({"train_s": train_s, "validation_s": validation,
                  "embed_s": time.perf_counter() - started, "files": len(report.files),
                  "passes": report.backbone_passes, "images": sum(report.images.values())}))
"""


def run_tree(tree: Path, folder: Path, overrides: dict) -> dict:
    folder.mkdir()
    raw = yaml.safe_load((tree / "params.yaml").read_text())  # the tree's own keys
    (folder / "params.yaml").write_text(yaml.safe_dump(with_overrides(raw, overrides)))
    done = subprocess.run([sys.executable, "-c", RUN], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        sys.exit(f"{tree}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_numbers(a: Path, b: Path, files: int) -> bool:
    """The two runs' metric rows (timing aside) and every epoch's embeddings, bit for bit."""
    timing = ["seconds", "images_per_s"]
    rows = [pd.read_csv(f / "repository/metrics/training_metrics.csv").drop(columns=timing)
            for f in (a, b)]
    if not rows[0].equals(rows[1]):
        return False
    for epoch in range(files):
        x, y = (np.load(f / f"repository/embeddings/epoch_{epoch}.npz") for f in (a, b))
        if not all(np.array_equal(x[k], y[k]) for k in x.files):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--identities", type=int, default=120, help="x 5 training images")
    parser.add_argument("--test-identities", type=int, default=60, help="x 2 queries, 2 gallery")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (PNG)")
    parser.add_argument("--before", default="fb22319", help="git revision to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_decode_once_") as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        write_domain(root, range(args.identities),
                     range(args.identities, args.identities + args.test_identities),
                     seed=0, size=args.size)
        overrides = {"model.name": args.model, "model.pretrained": "none",
                     "train.freeze_backbone": False, "train.epochs": args.epochs,
                     "train.device": "cpu", "data.root": str(root)}
        before = tmp / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        results = {f"before ({args.before})": run_tree(before, tmp / "run_before", overrides),
                   "now": run_tree(REPO, tmp / "run_now", overrides)}
        same = same_numbers(tmp / "run_before", tmp / "run_now", args.epochs + 1)
    first = next(iter(results.values()))
    print(f"{args.model}, unfrozen, {args.epochs} epochs, {args.size} px PNGs; embed: "
          f"{first['files']} model files x {first['images']} query + gallery images")
    for name, r in results.items():
        later = sum(r["validation_s"][1:])
        print(f"{name:<20} validation {sum(r['validation_s']):6.2f} s (epochs 1-{args.epochs}: "
              f"{later:5.2f} s)  embed {r['embed_s']:6.2f} s  train stage {r['train_s']:6.2f} s")
    (_, old), (_, new) = results.items()
    print(f"now / before: validation of epochs 1-{args.epochs} "
          f"{sum(new['validation_s'][1:]) / sum(old['validation_s'][1:]):.2f}x, embed "
          f"{new['embed_s'] / old['embed_s']:.2f}x, "
          f"train stage {new['train_s'] / old['train_s']:.2f}x")
    print(f"same metrics and embeddings in both trees: {same}")


if __name__ == "__main__":
    main()
