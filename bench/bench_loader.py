"""Images/s per core of the DataLoader's pixel work, before and after issue 25 (3a, 3b), in one run:

- before: open_clip's PIL transforms as the model used them (val: Resize bicubic + CenterCrop +
  ToTensor + Normalize; train: RandomHorizontalFlip + RandomResizedCrop + ToTensor + Normalize),
  the full decode, float32 handed over;
- after: the model's pixel pipeline (clipcore/data/pixels.py): JPEG draft decoding, resize on
  uint8 tensors, uint8 handed over, stacked in its own memory order (collate_pixels, as
  clipcore.model.features.image_loader does); the model normalises on its device.

Both on the same realistic JPEGs made here (bench/gpu/photos.py: smooth colour fields, texture
and sensor-like noise, quality 90) at 250x250 (a face crop) and 1024x768 (a photo), the val
transform and the training augmentation (each image with its own seed, clipcore.train.sampling),
one DataLoader worker (so: per core) and in-process (no worker). Goal (val path, in a worker):
>= 2x at 250x250, >= 2.5x at 1024x768.

    OMP_NUM_THREADS=1 python bench/bench_loader.py            # about a minute and a half
    OMP_NUM_THREADS=1 python bench/bench_loader.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch.utils.data import DataLoader
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu.photos import SIZES, photo  # noqa: E402
from clipcore.data.images import ImageFiles  # noqa: E402
from clipcore.data.pixels import collate_pixels  # noqa: E402
from clipcore.model.factory import build_model  # noqa: E402
from clipcore.params import ModelParams  # noqa: E402
from clipcore.train.sampling import SeededImages  # noqa: E402

GOALS = {"250x250": 2.0, "1024x768": 2.5}  # the val path, in a worker
BATCH = 64


def old_transforms(model) -> dict:
    """open_clip's transforms for this model, as FineTunedCLIP built them before issue 25."""
    cfg = PreprocessCfg(**model.clip.visual.preprocess_cfg)
    train = image_transform_v2(cfg, is_train=True)
    return {"val": image_transform_v2(cfg, is_train=False),
            "train": transforms.Compose([transforms.RandomHorizontalFlip(), *train.transforms])}


def dataset(files: list[Path], kind: str, transform):
    if kind == "val":
        return ImageFiles(files, transform), None
    # Training's: each image with a seed of its own, batches of (index, seed) keys.
    keys = [(i, 1000 + i) for i in range(len(files))]
    return SeededImages(files, transform), [keys[i:i + BATCH] for i in range(0, len(keys), BATCH)]


def rate(files: list[Path], kind: str, transform, workers: int,
         collate=None) -> tuple[float, float, torch.dtype]:
    """images per CPU second of the process doing the pixel work (the worker, whose CPU time
    the main process collects when it exits; or this process), images per wall second from the
    first batch to the last (worker start-up left out), and the batches' dtype. CPU seconds: a
    shared machine's other load barely moves them, where it moves wall time a lot."""
    images, batches = dataset(files, kind, transform)
    loader = (DataLoader(images, batch_size=BATCH, num_workers=workers, collate_fn=collate)
              if batches is None else
              DataLoader(images, batch_sampler=batches, num_workers=workers, collate_fn=collate))
    cpu = _children_cpu() if workers else time.process_time()
    seen, started, dtype = 0, None, None
    for pixels, _ in loader:
        if started is None:
            started, dtype = time.perf_counter(), pixels.dtype
        else:
            seen += len(pixels)
    wall = seen / (time.perf_counter() - started)
    del loader  # its worker exits and is waited for: its CPU time is counted then
    cpu = (_children_cpu() if workers else time.process_time()) - cpu
    return len(files) / cpu, wall, dtype


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (its 224 px input)")
    parser.add_argument("--quick", action="store_true", help="few images, one round")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many")
    args = parser.parse_args()
    torch.set_num_threads(1)
    embed_dim = open_clip.get_model_config(args.model)["embed_dim"]
    model = build_model(ModelParams(name=args.model, pretrained="none", embed_dim=embed_dim,
                                    dropout=0.1))
    new = {"val": model.preprocess_val, "train": model.preprocess_train}
    old = old_transforms(model)
    counts = {"250x250": 192 if args.quick else 640, "1024x768": 192 if args.quick else 384}
    rounds = 1 if args.quick else args.rounds
    print(f"{args.model}, input {model.pixels.size[0]} px, batches of {BATCH}, "
          f"torch {torch.__version__}, best of {rounds}; images per CPU second (per core)")
    print(f"{'size':>9} {'path':>5} {'where':>10} {'before':>8} {'after':>8} {'ratio':>6}   "
          f"wall-clock images/s: before, after, ratio")
    with tempfile.TemporaryDirectory() as tmp:
        for size, count in counts.items():
            files = []
            for i in range(count):
                files.append(Path(tmp) / f"{size}_{i:04d}.jpg")
                photo(SIZES[size], i).save(files[-1], quality=90)
            for kind in ("val", "train"):
                for workers, where in ((1, "1 worker"), (0, "in-process")):
                    best = {"before": (0.0, 0.0), "after": (0.0, 0.0)}
                    for _ in range(rounds):  # interleaved, so drift in the machine's load hits both
                        for path, transform, dtype, collate in (
                                ("before", old[kind], torch.float32, None),
                                ("after", new[kind], torch.uint8, collate_pixels)):
                            cpu, wall, got = rate(files, kind, transform, workers, collate)
                            assert got == dtype, (path, got)
                            best[path] = max(best[path], (cpu, wall))
                    (before, wall_before), (after, wall_after) = best["before"], best["after"]
                    goal = GOALS[size] if kind == "val" and workers == 1 else None
                    verdict = "" if goal is None else (
                        f"  goal >= {goal}: {'met' if after / before >= goal else 'not met'}")
                    print(f"{size:>9} {kind:>5} {where:>10} {before:8.0f} {after:8.0f} "
                          f"{after / before:5.2f}x   {wall_before:.0f}, {wall_after:.0f}, "
                          f"{wall_after / wall_before:.2f}x{verdict}", flush=True)


if __name__ == "__main__":
    main()
