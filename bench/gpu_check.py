"""A GPU check, ready to run: train and embed on 1 and on N processes (train.processes; N = the
GPU count), for the tiny model and ViT-B-32, and print images/s, peak GPU memory and whether the
epoch-0 embeddings of 1 and N processes agree.

    python bench/gpu_check.py                       # CUDA: tiny and ViT-B-32, N = GPU count
    python bench/gpu_check.py --models tiny --repeat 1 --processes 2   # any machine

On CUDA, train and embed run with bf16 autocast (train.device auto) and NCCL. Without CUDA it
says so and runs on the CPU with gloo, N = 2 and the tiny model only by default; the CUDA parts
(bf16, NCCL, GPU memory) are then skipped, and the speeds say little: on a few shared cores a
process with 2 OpenMP threads can stall on its barriers (it checks plumbing and agreement).
ViT-B-32 uses OpenAI's weights when they are in the local cache, else random init (the speed is
the same).

Each run is a real train + embed through clipcore (the stages' own code, launched by the same
torchrun relaunch), on the digits demo written into a temporary folder; `--repeat R` lists each
training, query and gallery image R times so that a fast GPU has enough images to time.
Train images/s is the trainer's own measure (epoch 1); embed images/s is the whole embed run
(model files loaded, every epoch's pass) over its images.
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

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipcore import distributed, paths  # noqa: E402
from clipcore.demo import write_demo  # noqa: E402
from clipcore.errors import ClipcoreError  # noqa: E402
from clipcore.manifests import prepare  # noqa: E402
from clipcore.model import build_model  # noqa: E402
from clipcore.params import ModelParams, load_params, parse_params  # noqa: E402

WORKER = "GPU_CHECK_WORKER"  # set: this process is one of a check's train/embed runs


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    processes = args.processes or (torch.cuda.device_count() if cuda else 2)
    models = args.models or (["tiny", "ViT-B-32"] if cuda else ["tiny"])
    if cuda:
        print(f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}; "
              f"bf16 autocast, NCCL; N = {processes}")
    else:
        print(f"no CUDA: CPU with gloo, N = {processes}; skipped: bf16 autocast, NCCL, "
              f"GPU memory")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        demo = write_data(Path(tmp), args.repeat)
        for model in models:
            pretrained = "none" if model == "tiny" else cached_or_none(model)
            runs = {n: run(Path(tmp) / f"{model}_{n}", demo, model, pretrained, n, args)
                    for n in sorted({1, processes})}
            report(model, pretrained, runs, cuda)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="default: tiny ViT-B-32 (CUDA), tiny (CPU)")
    parser.add_argument("--processes", type=int, help="N; default: the GPU count (CPU: 2)")
    parser.add_argument("--batch-per-process", type=int, default=0,
                        help="images per process per step (default 128 CUDA, 32 CPU)")
    parser.add_argument("--repeat", type=int, default=0,
                        help="list each image R times (default 8 CUDA, 1 CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.batch_per_process = args.batch_per_process or (128 if cuda else 32)
    args.repeat = args.repeat or (8 if cuda else 1)
    return args


def write_data(folder: Path, repeat: int) -> Path:
    """The digits demo and its manifests, with every train/query/gallery row listed `repeat`
    times (val stays as is: validation ranks each image against the others)."""
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    root = folder / "demo"
    write_demo(root, params.demo, params.seed)
    prepared = folder / "prepared"
    prepare(root, prepared, params.data, params.seed)
    for split in ("train", "query", "gallery"):
        frame = pd.read_csv(prepared / f"{split}.csv")
        pd.concat([frame] * repeat).sort_values("path").to_csv(prepared / f"{split}.csv",
                                                               index=False)
    return folder


def cached_or_none(model: str) -> str:
    """'openai' when its weights load without network, else 'none' (random init)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # here and in the runs: never wait for a hub
    try:
        build_model(ModelParams(model, "openai", 512, 0.0))
        return "openai"
    except ClipcoreError:
        return "none"


def run(folder: Path, data: Path, model: str, pretrained: str, processes: int,
        args: argparse.Namespace) -> dict:
    """Train one epoch with the backbone trained, then embed, on `processes` processes."""
    folder.mkdir()
    (folder / "demo").symlink_to(data / "demo")
    (folder / "data").mkdir()
    (folder / paths.PREPARED).symlink_to(data / "prepared")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    workers = 0 if not torch.cuda.is_available() else min(8, (os.cpu_count() or 1) // processes)
    raw["data"]["root"] = "demo"
    raw["model"].update(name=model, pretrained=pretrained, dropout=0.0)
    raw["train"].update(epochs=1, freeze_backbone=False, augment=False, processes=processes,
                        batch_size=args.batch_per_process * processes, num_workers=workers)
    raw["embed"].update(batch_size=2 * args.batch_per_process, num_workers=workers)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = {}
    for stage in ("train", "embed"):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=folder,
                              env={**os.environ, WORKER: stage, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{model} on {processes} processes, {stage} failed:\n{done.stderr[-3000:]}")
        result[f"{stage}_wall_s"] = time.perf_counter() - started
        result.update(json.loads((folder / f"{stage}.json").read_text()))
    result["epoch_0"] = np.load(folder / paths.embeddings_path(0))
    return result


def worker(stage: str) -> None:
    """One check run (cwd: its folder), on train.processes processes like the stages."""
    from clipcore.embedding import embed_all
    from clipcore.training import train

    params = load_params()
    if distributed.relaunch(params.train.processes, "bench.gpu_check"):
        return
    started = time.perf_counter()
    if stage == "train":
        history = train(params, Path(params.data.root), paths.PREPARED)
        measured = {"train_images_per_s": history[-1]["images_per_s"]}
    else:
        report = embed_all(params, Path(params.data.root), paths.PREPARED)
        images = report.backbone_passes * sum(report.images.values())
        measured = {"embed_images_per_s": images / (time.perf_counter() - started)}
    world = distributed.join(params.train.device)
    peak = (torch.cuda.max_memory_allocated(world.device) / 2**30
            if world.device.type == "cuda" else float("nan"))
    # Every process's peak memory, for the largest; rank 0 writes.
    peaks = world.gather(torch.tensor([peak], device=world.device), [1] * world.size)
    if world.is_main:
        measured[f"{stage}_peak_gib"] = float(peaks.max())
        Path(f"{stage}.json").write_text(json.dumps(measured))


def report(model: str, pretrained: str, runs: dict[int, dict], cuda: bool) -> None:
    print(f"\n{model} (pretrained {pretrained}), one epoch with the backbone trained, then embed")
    print(f"{'processes':>9} {'train img/s':>12} {'embed img/s':>12} {'peak GPU GiB':>13} "
          f"{'train+embed wall s':>19}")
    for n, r in runs.items():
        peak = max(r["train_peak_gib"], r["embed_peak_gib"])
        print(f"{n:>9} {r['train_images_per_s']:>12.1f} {r['embed_images_per_s']:>12.1f} "
              f"{'n/a' if np.isnan(peak) else f'{peak:.2f}':>13} "
              f"{r['train_wall_s'] + r['embed_wall_s']:>19.1f}")
    if len(runs) > 1:
        one, many = runs[min(runs)], runs[max(runs)]
        ratio = {k: many[k] / one[k] for k in ("train_images_per_s", "embed_images_per_s")}
        print(f"N / 1 processes: train {ratio['train_images_per_s']:.2f}x, "
              f"embed {ratio['embed_images_per_s']:.2f}x")
        tolerance = 5e-3 if cuda else 1e-4  # bf16 on CUDA, fp32 on CPU
        worst = max(float(np.abs(one["epoch_0"][s] - many["epoch_0"][s]).max())
                    for s in ("query", "gallery"))
        same = all((one["epoch_0"][f"{s}_names"] == many["epoch_0"][f"{s}_names"]).all()
                   for s in ("query", "gallery"))
        verdict = "agree" if same and worst <= tolerance else "DIFFER"
        print(f"epoch-0 embeddings, 1 vs {max(runs)} processes: max |diff| {worst:.2e} "
              f"(tolerance {tolerance:g}): {verdict}")


if __name__ == "__main__":
    if WORKER in os.environ:
        from clipcore.stage import run_stage
        run_stage(lambda: worker(os.environ[WORKER]))
    else:
        main()
