"""The embed stage's images/s (image files decoded by DataLoader workers, model file loaded)
against bare `encode_image` on ready tensors: same model, same images, same batch size.
Goal: the stage keeps >= 85% of the bare rate (decoding hides behind the model).
The two alternate for --rounds rounds and the best of each counts: on a shared machine a
single timing mostly measures the neighbours.

    python bench/bench_embed.py                          # random-init ViT-B/32, 256 images
    python bench/bench_embed.py --model tiny --images 540

Runs in a temporary folder on the digits demo.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore.model.checkpoint import load_model, save_model  # noqa: E402
from clipcore.demo.digits import write_demo  # noqa: E402
from clipcore.retrieve.embedding import embed_all  # noqa: E402
from clipcore.data.images import load_rgb  # noqa: E402
from clipcore.data.manifests import prepare, read_manifest  # noqa: E402
from clipcore.model.factory import build_model  # noqa: E402
from clipcore.params import Params, parse_params  # noqa: E402
from clipcore import paths  # noqa: E402


def smoke_params(model: str, overrides: dict) -> Params:
    """The repo's params.yaml with a random-init `model` and the given dotted overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {"model.name": model, "model.pretrained": "none", **overrides}.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return parse_params(raw)


def demo_data(tmp: Path, limits: dict[str, int]) -> tuple[Path, Path]:
    """The digits demo, prepared; each split in `limits` cut to about that many rows (0: all),
    every n-th row so that all classes stay."""
    params = smoke_params("tiny", {})
    root, prepared = tmp / "demo", tmp / "prepared"
    write_demo(root, params.demo, params.seed)
    prepare(root, prepared, params.data, params.seed)
    for split, limit in limits.items():
        frame = read_manifest(prepared, split)
        if 0 < limit < len(frame):
            rows = np.linspace(0, len(frame) - 1, limit).round().astype(int)
            frame.iloc[rows].to_csv(prepared / f"{split}.csv", index=False)
    return root, prepared


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@torch.inference_mode()
def bare_encode(model, ready: torch.Tensor, batch_size: int) -> None:
    for batch in ready.split(batch_size):
        model.clip.encode_image(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init)")
    parser.add_argument("--images", type=int, default=256, help="query + gallery images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    params = smoke_params(args.model, {"embed.batch_size": args.batch_size,
                                       "embed.num_workers": args.workers})
    with tempfile.TemporaryDirectory() as tmp:
        half = args.images // 2
        root, prepared = demo_data(Path(tmp), {"query": half, "gallery": half})
        os.chdir(tmp)
        save_model(build_model(params.model), paths.model_path(0), backbone_trained=False, epoch=0)

        model = load_model(paths.model_path(0))
        files = [root / p for split in ("query", "gallery")
                 for p in read_manifest(prepared, split)["path"]]
        ready = model.normalise(torch.stack([model.preprocess_val(load_rgb(f)) for f in files]))
        with torch.inference_mode():
            model.clip.encode_image(ready[:args.batch_size])  # warm-up
        stage_s, load_s, bare_s = [], [], []
        for _ in range(args.rounds):
            stage_s.append(timed(lambda: embed_all(params, root, prepared)))
            load_s.append(timed(lambda: load_model(paths.model_path(0))))
            bare_s.append(timed(lambda: bare_encode(model, ready, args.batch_size)))

    n = len(files)
    stage, bare = n / min(stage_s), n / min(bare_s)
    no_load = n / min(s - l for s, l in zip(stage_s, load_s))
    load_s = min(load_s)
    print(f"model {args.model}, {n} images, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch threads, best of {args.rounds} rounds")
    print(f"bare encode_image on ready tensors: {bare:.1f} images/s")
    print(f"embed stage from image files: {stage:.1f} images/s ({stage / bare:.1%} of bare; "
          f"goal >= 85%); without the {load_s:.2f} s model load: {no_load:.1f} images/s "
          f"({no_load / bare:.1%})")


if __name__ == "__main__":
    main()
