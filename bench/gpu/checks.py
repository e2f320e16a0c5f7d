"""gpu_check's agreement checks: bf16 on CUDA against fp32 (ViT-B-32 itself, random init),
frozen and unfrozen, in training and in embed; two processes against one; an unfrozen resume.
Each returns (verdict, numbers in words, numbers as values): verdict True / False, or None for a
check that was skipped or only reports."""
from __future__ import annotations

import shutil
from collections.abc import Callable

import yaml

from clipcore import paths
from clipcore.model.checkpoint import load_file, save_atomic

from .runs import Machine, lowest_cosine, metric_gaps, stage, trained, within

Result = tuple[bool | None, str, dict]


def _no_bf16(machine: Machine) -> str:
    return "" if machine.device == "cuda" else " (CPU: no bf16; fp32_stage.py against the stage)"


def check_train(frozen: bool) -> Callable[[Machine], Result]:
    """Every epoch's losses within 2% and val score within 25 points (of 1000)."""
    def check(machine: Machine) -> Result:
        gaps = metric_gaps(trained(machine, frozen), trained(machine, frozen, fp32=True))
        ok, numbers = within(gaps, loss=0.02, score=25)
        return ok, numbers + _no_bf16(machine), gaps
    return check


def check_embed(frozen: bool) -> Callable[[Machine], Result]:
    """The runs' embeddings of every model file (epochs 0-2), bf16 against fp32: cosine per
    image >= 0.99 frozen (one backbone, two precisions), >= 0.98 unfrozen (two trainings, whose
    backbones drift apart a little more each step)."""
    bar = 0.99 if frozen else 0.98

    def check(machine: Machine) -> Result:
        lowest = lowest_cosine(trained(machine, frozen, embed=True),
                               trained(machine, frozen, fp32=True, embed=True))
        return (lowest >= bar, f"lowest cosine {lowest:.5f} (>= {bar}){_no_bf16(machine)}",
                {"lowest_cosine": lowest})
    return check


def check_processes(machine: Machine) -> Result:
    """Two processes against one, frozen train and embed: NCCL on 2 GPUs, gloo on the CPU."""
    if machine.gpus == 1:
        return None, "skipped: one GPU (NCCL needs a GPU per process)", {"skipped": "one GPU"}
    if machine.quick:
        return None, "skipped: --quick", {"skipped": "quick"}
    device = "cuda" if machine.gpus >= 2 else "cpu"
    two = trained(machine, True, processes=2, embed=True, device=device)
    one = trained(machine, True, embed=True, device=device)
    gaps = metric_gaps(two, one)
    ok, numbers = within(gaps, loss=1e-3 if device == "cuda" else 1e-4,
                         score=2 if device == "cuda" else 1e-6)
    lowest = lowest_cosine(two, one)
    where = "2 GPUs, NCCL" if device == "cuda" else "CPU, gloo"
    return (ok and lowest >= 0.999,
            f"{where}: {numbers}; embeddings lowest cosine {lowest:.6f} (>= 0.999)",
            {**gaps, "lowest_cosine": lowest})


def check_resume(machine: Machine) -> Result:
    """The unfrozen run stopped after epoch 1 and resumed: its checkpoint's optimizer state
    (AdamW's moments of the whole visual tower) goes back onto the device, and it ends as the
    run that never stopped. On CUDA the checkpoint also holds one more GPU's RNG state than the
    machine has (as when saved on more GPUs)."""
    finished = trained(machine, False)
    folder = machine.work / f"{finished.name}_resumed"
    shutil.copytree(finished, folder, symlinks=True)
    for path in (paths.checkpoint_path(2), paths.model_path(2)):  # stopped after epoch 1
        (folder / path).unlink()
    checkpoint = load_file(folder / paths.checkpoint_path(1))
    moments = sum(len(state) for state in checkpoint["optimizer"]["state"].values())
    note = f"{moments} optimizer state tensors"
    if machine.device == "cuda":
        checkpoint["rng"]["cuda"].append(checkpoint["rng"]["cuda"][-1])
        save_atomic(checkpoint, folder / paths.checkpoint_path(1))
        note += f", {len(checkpoint['rng']['cuda'])} GPUs' RNG states"
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"]["resume"] = True
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage(machine, folder, "train")
    # bf16 kernels on CUDA are not bitwise repeatable run to run: a looser bar there.
    cuda = machine.device == "cuda"
    gaps = metric_gaps(folder, finished)
    ok, numbers = within(gaps, loss=1e-3 if cuda else 1e-4, score=2 if cuda else 1e-6)
    return ok, f"unfrozen, epoch 2 resumed from epoch 1 ({note}): {numbers}", gaps
