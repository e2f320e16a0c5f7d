"""Which parts of the image tower train (`train.unlocked_blocks`) and at which lr
(`train.layer_decay`), as optimizer parameter groups.

The tower by depth, bottom to top: the stem (patch embedding, class and position embeddings,
ln_pre), each transformer block, the top (ln_post and the projection). `unlocked_blocks: k`
trains the last k blocks and the top (open_clip's `lock_image_tower(unlocked_groups=k + 1)`
less the projection split); `all` trains everything, the stem too (today's unfrozen run).
With `train.freeze_backbone: true` nothing of the tower trains whatever unlocked_blocks says:
the user's `dvc exp run -S train.freeze_backbone=false` keeps its meaning (the whole tower),
and unlocked_blocks refines only what an unfrozen run trains.

Layer-wise lr decay (FT-CLIP, BEiT): the last block and the top train at the backbone lr, each
block below at `layer_decay` times the one above it, the stem below the first block.
"""
from __future__ import annotations

from torch import nn

from clipcore.errors import ClipcoreError
from clipcore.params import TrainParams


def backbone_frozen(train: TrainParams) -> bool:
    """Whether no part of the image tower trains (the stored-features path)."""
    return train.freeze_backbone or train.unlocked_blocks == 0


def tower_layers(visual: nn.Module) -> list[list[nn.Parameter]]:
    """The tower's parameters by depth, bottom to top: [stem, block 0, ..., block n-1, top]."""
    stem, top = [], []
    blocks: dict[int, list[nn.Parameter]] = {}
    for name, parameter in visual.named_parameters():
        if name.startswith("transformer.resblocks."):
            blocks.setdefault(int(name.split(".")[2]), []).append(parameter)
        else:  # before the blocks in registration order: the stem; after them: the top
            (top if blocks else stem).append(parameter)
    if not blocks:
        raise ClipcoreError("train.unlocked_blocks / train.layer_decay: the image tower has no "
                            "transformer blocks (a ViT is needed)")
    return [stem, *(blocks[i] for i in sorted(blocks)), top]


def unlock(model, train: TrainParams) -> None:
    """Set which of `model`'s image-tower parameters train (the head and temperature always do)."""
    model.set_backbone_trainable(not backbone_frozen(train))
    if backbone_frozen(train) or train.unlocked_blocks == "all":
        return
    layers = tower_layers(model.clip.visual)
    blocks = len(layers) - 2
    if train.unlocked_blocks > blocks:
        raise ClipcoreError(f"train.unlocked_blocks: {train.unlocked_blocks}, but "
                            f"{model.base['name']}'s image tower has {blocks} blocks "
                            f"(at most {blocks}, or all)")
    for layer in layers[:len(layers) - 1 - train.unlocked_blocks]:  # the stem, the lower blocks
        for parameter in layer:
            parameter.requires_grad_(False)


def backbone_groups(visual: nn.Module, lr: float, train: TrainParams) -> list[dict]:
    """Optimizer groups of the tower's trainable parameters: at `lr` (layer_decay 1.0: one
    matrix and one no-decay group, as without the lever), else per depth lr * decay^(blocks
    from the top)."""
    if train.layer_decay == 1.0:
        return decay_groups(visual.parameters(), lr, train.weight_decay)
    layers = tower_layers(visual)
    last_block = len(layers) - 2
    groups = []
    for depth, layer in enumerate(layers):
        from_top = max(0, last_block - depth)  # the top trains with the last block
        groups += decay_groups(layer, lr * train.layer_decay ** from_top, train.weight_decay)
    return groups


def decay_groups(parameters, lr: float, weight_decay: float) -> list[dict]:
    """The trainable ones of `parameters` at `lr`: matrices with weight decay, biases, norms
    and scalars (fewer than 2 dimensions) without."""
    trainable = [p for p in parameters if p.requires_grad]
    matrices = [p for p in trainable if p.ndim >= 2]
    others = [p for p in trainable if p.ndim < 2]
    return [{"params": matrices, "lr": lr, "weight_decay": weight_decay},
            {"params": others, "lr": lr, "weight_decay": 0.0}]
