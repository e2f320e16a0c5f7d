"""`python bench/gpu/fp32_stage.py train|embed`: the stage as `python -m stages.<name>` runs it,
with autocast off and TF32 off: the fp32 reference that gpu_check's bf16 runs are held to on
the same GPU (a CPU run of ViT-B-32 would take too long)."""
from __future__ import annotations

import contextlib
import runpy
import sys

import torch

from clipcore.model import features
from clipcore.train import training


def no_autocast(device: torch.device):
    return contextlib.nullcontext()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding is a convolution
    features.autocast = training.autocast = no_autocast  # every user of clipcore's autocast
    name = sys.argv[1]
    sys.argv = [f"stages.{name}", *sys.argv[2:]]  # the stage's own arguments (--help)
    runpy.run_module(f"stages.{name}", run_name="__main__", alter_sys=True)
