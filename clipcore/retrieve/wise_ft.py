"""WiSE-FT (Wortsman et al. 2022): embed with a weight-space mix of the base and fine-tuned
models, (1 - alpha) * base + alpha * fine-tuned, for the tensors that trained.

The base is the untouched model epoch 0 holds: the pretrained backbone and the identity head.
So alpha 0 embeds exactly as epoch 0 (zero-shot CLIP), alpha 1 exactly as the fine-tuned
model, and values between often beat both, at no training cost (embed.wise_ft_alpha).
"""
from __future__ import annotations

import torch

from clipcore.model.factory import FineTunedCLIP


@torch.no_grad()
def mix_weights(model: FineTunedCLIP, base: FineTunedCLIP, alpha: float,
                backbone_trained: bool) -> FineTunedCLIP:
    """`model` (in place) with each trained parameter set to (1 - alpha) * base + alpha * its own;
    `model.wise_ft_alpha` records alpha, so a model file saved from it is not mixed again.

    Buffers stay the fine-tuned model's: they are statistics (the head's feature mean and std),
    not weights, and at alpha 0 the head's zero branch ignores them anyway.
    """
    trained = set(model.head_state())
    if backbone_trained:
        trained |= set(model.backbone_state())
    base_parameters = dict(base.named_parameters())
    for name, parameter in model.named_parameters():
        if name in trained:
            parameter.copy_((1 - alpha) * base_parameters[name].to(parameter.device)
                            + alpha * parameter)
    model.wise_ft_alpha = alpha
    return model
