"""An exponential moving average of the weights training changes (`train.ema`, the decay per
step; FT-CLIP, timm's ModelEmaV3): validation, model files and so embed, and checkpoints use the
average; the optimizer keeps stepping the raw weights, which a checkpoint carries beside it so
that resuming continues both.

The decay ramps up over the first steps, min(decay, (1 + n) / (10 + n)) at step n (TensorFlow's
ExponentialMovingAverage with num_updates): an average over a few hundred steps would otherwise
hold the untouched base for most of a short run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """The EMA of `model`'s trainable parameters (those with requires_grad when built)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.raw: dict[str, torch.Tensor] | None = None  # the training weights while applied

    @torch.no_grad()
    def update(self) -> None:
        """One optimizer step taken: move the average towards the weights."""
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for name, parameter in self.parameters.items():
            self.average[name].lerp_(parameter.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside, its training weights again after."""
        self.raw = {name: p.detach().clone() for name, p in self.parameters.items()}
        self._load(self.average)
        try:
            yield
        finally:
            self._load(self.raw)
            self.raw = None

    def training_weights(self) -> dict[str, torch.Tensor]:
        """The raw weights the optimizer steps (on the CPU), applied or not: what resuming needs."""
        source = self.raw if self.raw is not None else self.parameters
        return {name: t.detach().cpu().clone() for name, t in source.items()}

    def state(self) -> dict:
        """What a checkpoint holds beside the averaged weights (its "state")."""
        return {"steps": self.steps, "raw": self.training_weights()}

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        """Resume: the model holds the checkpoint's averaged weights; they become the average,
        the checkpoint's raw weights go back into the model."""
        self.steps = state["steps"]
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}
        self._load(state["raw"])

    @torch.no_grad()
    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, parameter in self.parameters.items():
            parameter.copy_(tensors[name])
