"""The fine-tuned CLIP model: an open_clip backbone and a head, by default a Dropout+Linear head that
starts as the identity (`model.head: residual`), or the seed's Linear->GELU->Dropout (`mlp`).

`build_model(params.model)` resolves `model.pretrained` (an open_clip tag, a local weights file, or
"none") without ever sitting in the hub client's retry loop: a tag whose weights are in the local
Hugging Face cache loads from there; otherwise the hub is probed first and, when it cannot be reached,
a one-line ClipcoreError says what to do.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import pickle
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import AugmentationCfg
from torch import nn

from clipcore.data.pixels import Normalise, PixelSettings, TrainPixels, ValPixels
from clipcore.errors import ClipcoreError
from clipcore.model.weights import load_failure, resolve_weights
from clipcore.params import ModelParams

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # makes `model.name: tiny` a regular open_clip name

RANDOM_INIT_SEED = 0
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnable temperature at 100
SUGGESTED_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "tiny")
TEXT_BATCH = 256  # captions per text-tower pass, bounds memory with thousands of classes


def build_model(model: ModelParams, device: str | torch.device = "cpu") -> "FineTunedCLIP":
    """The open_clip backbone named by `model`, with the `model.head` kind of head on top (an mlp
    head draws its random init from the caller's random stream: the run's seed)."""
    _check_name(model.name)
    feature_dim = open_clip.get_model_config(model.name)["embed_dim"]
    _check_embed_dim(model.embed_dim, feature_dim)  # before any download
    weights = resolve_weights(model.name, model.pretrained)
    try:
        # Seeded in a private RNG state: "none" is then the same random base on every build, so a
        # model file made on it reloads, and the caller's random stream is left untouched. Only
        # the CPU generator (open_clip builds on the CPU): torch.manual_seed would reseed every
        # CUDA generator too, outside what fork_rng(devices=[]) restores, and dropout on CUDA
        # would start from this seed whatever `seed` says.
        with torch.random.fork_rng(devices=[]), _quiet_random_init(weights.source is None):
            torch.default_generator.manual_seed(RANDOM_INIT_SEED)
            clip = open_clip.create_model(
                model.name, pretrained=weights.source, device=device,
                force_quick_gelu=weights.quick_gelu, pretrained_text=False,
                force_preprocess_cfg=weights.preprocess)
    except (RuntimeError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise ClipcoreError(f"model.pretrained: cannot load {model.pretrained!r} into {model.name}: "
                            f"{load_failure(exc)}") from exc
    base = {"name": model.name, "pretrained": model.pretrained, "sha256": weights.sha256}
    # The model's preprocessing as open_clip resolved it (config, then the tag's mean/std...),
    # and open_clip's train crop scale.
    pixels = PixelSettings.from_open_clip(clip.visual.preprocess_cfg, AugmentationCfg().scale)
    return FineTunedCLIP(
        clip, open_clip.get_tokenizer(model.name), pixels,
        feature_dim=feature_dim, embed_dim=model.embed_dim, dropout=model.dropout, base=base,
        head=model.head).to(device)


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(asked: bool):
    """open_clip warns on every random-init build; with model.pretrained: none it was asked for,
    and the embed stage builds once per model file."""
    quiet = _RandomInitWarning()
    if asked:
        logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


class FineTunedCLIP(nn.Module):
    """CLIP image tower -> head -> L2 norm; the text tower only embeds captions.

    The residual head (the default) starts as the identity (zero-padded when embed_dim is larger),
    so before any training step the embeddings are exactly zero-shot CLIP's and captions land in
    the same space. The mlp head (the seed's) starts random: epoch 0 is then a random projection
    of CLIP's features, not zero-shot CLIP.
    """

    def __init__(self, clip: nn.Module, tokenizer, pixels: PixelSettings, *,
                 feature_dim: int, embed_dim: int, dropout: float, base: dict, head: str):
        super().__init__()
        _check_embed_dim(embed_dim, feature_dim)
        self.clip = clip
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.base = base
        self.wise_ft_alpha = 1.0  # the weights as trained; WiSE-FT mixing sets its alpha
        # The images it trained on: {"crop": none | face, "crop_margin": m} (data.crop), so that
        # inference crops its inputs alike; None: not recorded (a file from before the crop stage).
        self.image_crop: dict | None = None
        if head not in HEADS:  # a damaged model file; params.yaml's value is checked on load
            raise ClipcoreError(f"model.head: unknown head {head!r} (one of {', '.join(HEADS)})")
        self.head_kind = head
        self.head = HEADS[head](feature_dim, embed_dim, dropout)
        # The DataLoader workers' transforms (decoded image -> uint8 pixels) and the
        # normalisation on the device (backbone_features): clipcore.data.pixels. The train
        # transform flips too (open_clip's is a random resized crop only; retrieval wants flips).
        self.pixels = pixels
        self.preprocess_train, self.preprocess_val = TrainPixels(pixels), ValPixels(pixels)
        self.normalise = Normalise(pixels)
        self.set_backbone_trainable(False)

    def train_transform(self, augment: bool):
        return self.preprocess_train if augment else self.preprocess_val

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Visual tower on/off; the text tower is always frozen; head and temperature always train."""
        self.backbone_trainable = trainable
        self.clip.requires_grad_(False)
        self.clip.visual.requires_grad_(trainable)
        self.clip.logit_scale.requires_grad_(True)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FineTunedCLIP":
        # Frozen towers stay in eval mode even while the head trains: dropout (or any other
        # train-time behaviour) inside a frozen backbone would only add noise to fixed features,
        # and features computed once and reused must equal those seen in a training step.
        super().train(mode)
        self.clip.eval()
        self.clip.visual.train(mode and self.backbone_trainable)
        return self

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image features (B, feature_dim), not normalised: what the head takes. `images`:
        uint8 pixels (B, 3, H, W) as the transforms make them, normalised here on their device;
        or float, already normalised (mean/std) as the model takes them."""
        if images.dtype == torch.uint8:
            images = self.normalise(images)
        return self.clip.encode_image(images)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) unit embeddings of (B, feature_dim) features; of (B, V, feature_dim)
        features of V views of each image (test-time augmentation): the views' mean embedding,
        renormalised."""
        embeddings = F.normalize(self.head(features), dim=-1)
        return F.normalize(embeddings.mean(dim=1), dim=-1) if embeddings.ndim == 3 else embeddings

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.backbone_features(images))

    @torch.no_grad()
    def caption_embeddings(self, captions: list[str]) -> torch.Tensor:
        """Normalised text-tower embeddings (C, embed_dim), zero-padded like the head's init."""
        device = self.clip.logit_scale.device
        chunks = [self.clip.encode_text(self.tokenizer(captions[i:i + TEXT_BATCH]).to(device),
                                        normalize=True).float()
                  for i in range(0, len(captions), TEXT_BATCH)]
        if not chunks:
            return torch.zeros(0, self.embed_dim, device=device)
        text = torch.cat(chunks)
        return F.pad(text, (0, self.embed_dim - text.shape[1]))

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [1, 100] (call after each optimizer step, as open_clip does)."""
        self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's tensors, keyed as in this module's state_dict()."""
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The visual tower's tensors, keyed as in this module's state_dict()."""
        return {f"clip.visual.{k}": v for k, v in self.clip.visual.state_dict().items()}


class _StandardisedInput(nn.Module):
    """A head whose input is standardised by the training images' feature statistics: `mean`/`std`
    are set once before training (`set_feature_stats`); with the defaults (0, 1) it sees raw
    features."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise the head's input with these (N, feature_dim) features' statistics."""
        features = features.float()
        self.mean.copy_(features.mean(dim=0))
        # A floor keeps a constant feature (or a single image) from dividing by zero.
        self.std.copy_(features.std(dim=0, correction=0).clamp_min(1e-6 * features.abs().max()))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class ResidualHead(_StandardisedInput):
    """The projection head: features plus a Dropout+Linear branch on standardised features,

        head(f) = pad(f) + rms(std) * Linear(Dropout((f - mean) / std)),

    with the Linear starting at zero, so an untrained head is exactly the identity (zero-padded to
    embed_dim) and weight decay pulls towards zero-shot CLIP rather than towards a zero matrix.

    Why standardise: features of one domain share a large common direction (the tiny random
    model's: 99.75% of the norm), so a Linear fed raw features gets gradients dominated by it,
    and Adam's per-weight steps swamp the small class-telling variation. The branch sees
    standardised features (`set_feature_stats`), raw ones until those are set.
    The rms(std) factor keeps the branch in feature units, so one lr means the same for any backbone.
    """

    def __init__(self, feature_dim: int, embed_dim: int, dropout: float):
        super().__init__(feature_dim)
        self.feature_dim, self.embed_dim = feature_dim, embed_dim
        self.dropout = nn.Dropout(dropout)
        # skip_init: no random init to overwrite, and no draw from the caller's random stream.
        self.linear = nn.utils.skip_init(nn.Linear, feature_dim, embed_dim)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        branch = self.linear(self.dropout(self.standardise(features))) * self.std.square().mean().sqrt()
        return F.pad(features, (0, self.embed_dim - self.feature_dim)) + branch


class MlpHead(_StandardisedInput):
    """The seed's head, head(f) = Dropout(GELU(Linear(f))), with PyTorch's default random init
    drawn from the caller's random stream (the run's seed draws it). Used on the image features
    (`model.head: mlp`) and on the caption embeddings (`loss.text_targets: head`). Dropout acts on
    every output feature: nothing passes untouched, unlike the residual head's identity path.
    With `train.standardize_features` the Linear sees standardised features (the seed's: raw)."""

    def __init__(self, feature_dim: int, embed_dim: int, dropout: float):
        super().__init__(feature_dim)
        self.linear = nn.Linear(feature_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.gelu(self.linear(self.standardise(features))))


HEADS = {"residual": ResidualHead, "mlp": MlpHead}  # model.head's choices


def _check_name(name: str) -> None:
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=4) or list(SUGGESTED_MODELS)
        raise ClipcoreError(
            f"model.name: unknown open_clip model {name!r} (try {', '.join(close)}; "
            f"open_clip.list_models() lists all)")


def _check_embed_dim(embed_dim: int, feature_dim: int) -> None:
    if embed_dim < feature_dim:
        raise ClipcoreError(
            f"model.embed_dim: {embed_dim} is smaller than the backbone's {feature_dim} "
            f"features; captions and the residual head's identity start live in those, so use "
            f"{feature_dim} or more")
