"""The pipeline's unfrozen train loop against a bare open_clip loop (`bare_train_speed`) on the
same images, batch and device, for this tree and for an earlier revision's, each with its own
default DataLoader workers: one run prints both ratios (issue 20 measured 0.78 with 1 worker
and 0.91 with 0 for ViT-B-32 on 2 CPU cores).

    python bench/bench_train_loop.py                      # ViT-B-32, batch 24, against b19e80e
    python bench/bench_train_loop.py --model tiny --before HEAD~1

Random init (no hub here): the speed does not depend on the weights. Each tree trains one
epoch in its own process (its own params.yaml with the overrides below), so the two trees'
code never mix; images/s is the trainer's own `images_per_s` (the epoch's loop, data loading
included, validation excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore.data.images import ImageFiles  # noqa: E402
from clipcore.demo.domain import write_domain  # noqa: E402
from clipcore.model.factory import build_model  # noqa: E402
from clipcore.model.features import autocast, loader_workers  # noqa: E402
from clipcore.params import ModelParams, with_overrides  # noqa: E402

# Run in each tree's own process, in a run folder holding its params.yaml: prepare, then one
# unfrozen epoch.
ONE_EPOCH = """
import json, sys
from pathlib import Path
from clipcore.data.manifests import prepare
from clipcore.params import load_params
from clipcore.train.training import train
params = load_params("params.yaml")
root = Path(params.data.root)
prepare(root, Path("data/prepared"), params.data, params.seed)
history = train(params, root, Path("data/prepared"))
print(json.dumps({"images_per_s": history[-1]["images_per_s"],
                  "workers": params.train.num_workers}))
"""


def bare_train_speed(model, images: list[Path], batch: int) -> float:
    """open_clip's image tower trained with AdamW on a cross-entropy over fixed random class
    directions: images/s over one pass, data loading included (as the trainer measures), with
    the default worker setting."""
    clip, device = model.clip, model.clip.logit_scale.device
    clip.visual.requires_grad_(True)
    clip.visual.train()
    optimizer = torch.optim.AdamW(clip.visual.parameters(), lr=1e-5)
    classes = F.normalize(torch.randn(10, model.head.feature_dim, device=device), dim=-1)
    loader = DataLoader(ImageFiles(images, model.preprocess_val), batch_size=batch,
                        num_workers=loader_workers("auto", device),
                        pin_memory=device.type == "cuda")
    seen, started = 0, time.perf_counter()
    for pixels, index in loader:
        pixels = pixels.to(device, non_blocking=True)
        with autocast(device):
            features = F.normalize(clip.encode_image(model.normalise(pixels)), dim=-1)
            loss = F.cross_entropy(100 * features @ classes.T, index.to(device) % 10)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--identities", type=int, default=40, help="x 5 training images")
    parser.add_argument("--before", default="b19e80e", help="git revision to compare with")
    args = parser.parse_args()
    overrides = {"model.name": args.model, "model.pretrained": "none",
                 "train.freeze_backbone": False, "train.epochs": 1,
                 "train.batch_size": args.batch, "train.device": "cpu"}
    with tempfile.TemporaryDirectory(prefix="bench_train_loop_") as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        write_domain(root, range(args.identities), range(args.identities, args.identities + 2),
                     seed=0, size=224)
        before = tmp / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        speeds = {}
        for name, tree in ((f"before ({args.before})", before), ("now", REPO)):
            run = tmp / f"run_{len(speeds)}"
            run.mkdir()
            raw = yaml.safe_load((tree / "params.yaml").read_text())  # the tree's own keys
            (run / "params.yaml").write_text(yaml.safe_dump(
                with_overrides(raw, {**overrides, "data.root": str(root)})))
            done = subprocess.run(
                [sys.executable, "-c", ONE_EPOCH],
                cwd=run, env={**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"},
                capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
            speeds[name] = json.loads(done.stdout.strip().splitlines()[-1])
        train_csv = pd.read_csv(tmp / "run_1" / "data" / "prepared" / "train.csv")
        model = build_model(ModelParams(args.model, "none", 512, 0.0), torch.device("cpu"))
        bare = bare_train_speed(model, [root / p for p in train_csv["path"]], args.batch)
    print(f"{args.model}, unfrozen, batch {args.batch}, {len(train_csv)} training images, "
          f"{torch.get_num_threads()} threads; bare open_clip loop {bare:.2f} images/s")
    for name, speed in speeds.items():
        print(f"{name:<20} {speed['images_per_s']:6.2f} images/s, "
              f"{speed['workers']} workers: {speed['images_per_s'] / bare:.2f} of the bare loop")


if __name__ == "__main__":
    main()
