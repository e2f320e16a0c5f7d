"""Named sets of params.yaml overrides: the seed's training recipe, for a faithful baseline.

`SEED_RECIPE` is every way the seed's training (the user's starting code, FACTS.md) differs
from this project's defaults, as dotted params keys, plus the settings it shares with today's
defaults that are part of its recipe. Run it as `dvc exp run` with `dvc_overrides(SEED_RECIPE)`
(docs: the model and loss page lists the `-S` line); benchmarks apply the same dict.

Not reproduced: the seed trained in fp16 on a GPU (with plain Adam, which NaNs when the backbone
trains); here training runs in fp32 on a CPU and in bf16 autocast on CUDA.
"""
from __future__ import annotations

SEED_RECIPE: dict[str, object] = {
    "model.head": "mlp",                   # Linear -> GELU -> Dropout on the image features, random init
    "model.dropout": 0.3,
    "train.standardize_features": False,   # the head sees raw CLIP features
    "train.optimizer": "adam",             # weight decay as L2 in the gradient, not decoupled
    "train.weight_decay": 1.0e-4,
    "train.lr": 1.0e-4,                    # heads and temperature
    "train.backbone_lr_scale": 0.01,       # when the backbone trains: 1e-6
    "train.schedule": "constant",          # no schedule
    "train.warmup_fraction": 0.0,          # and no warmup
    "train.clamp_temperature": False,      # the learnable temperature may pass 100
    "train.grad_clip_norm": 1.0,
    "train.batch_size": 64,
    "train.sampler": "random",
    "train.augment": False,                # its images went through CLIP's preprocessing only
    "loss.name": "clip",
    "loss.same_class_positives": False,    # plain CLIP loss: same-class pairs are negatives
    "loss.text_targets": "head",           # a text head of the same kind over the caption embeddings
    "loss.target_init": "caption",
    "data.val_split": "image",             # a random 15% of the images
    "data.val_fraction": 0.15,
}


def dvc_overrides(recipe: dict[str, object]) -> list[str]:
    """`key=value` strings for `dvc exp run -S` (YAML spelling: true/false, lowercase)."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in recipe.items()]
