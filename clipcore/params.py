"""params.yaml as typed, validated objects.

Every stage calls `load_params()` first, so a typo or an out-of-range value stops the run
with one line naming the key before any image is read or any model is built.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipcore.params_parsing import ParamsError, build, checked


@dataclass(frozen=True)
class DataParams:
    root: str
    val_fraction: float = checked(ge=0.0, lt=1.0)
    val_split: str = checked(choices=("image", "class"))
    caption_template: str = checked(contains="{name}")
    numeric_caption_template: str = checked(contains="{name}")
    # An fnmatch pattern on a val image's file name ("photo_*"): those val images are the queries,
    # the others the gallery (clipcore.train.validation). "": every val image queries all the others.
    # Last, with a default, so DataParams built in code keep today's protocol.
    # auto: learnt from the unlabelled test images (clipcore.train.validation_plan).
    val_queries: str = ""
    # Images of no val class that join the val gallery so that it is as crowded as the test's
    # (clipcore.train.validation_plan); none keeps today's protocol.
    val_distractors: str = checked(default="none",
                                   choices=("none", "train_others", "test_gallery"))
    # face: the crop stage crops each image to its largest face (clipcore.crop) and the stages
    # that read pixels read the crops; none: they read data.root. Defaults keep today's data.
    crop: str = checked(default="none", choices=("none", "face"))
    crop_margin: float = checked(default=0.2, ge=0.0, le=2.0)  # share of the face's size added on each side

    def __post_init__(self):
        # Matched against base names, which never hold a slash: such a pattern matches nothing.
        if "/" in self.val_queries or "\\" in self.val_queries:
            raise ParamsError(f"'data.val_queries' is matched against a file's base name "
                              f"(e.g. photo_*): it can't hold a slash, got {self.val_queries!r}")


@dataclass(frozen=True)
class DemoParams:
    image_size: int = checked(ge=8, le=1024)
    test_fraction: float = checked(gt=0.0, lt=1.0)
    query_fraction: float = checked(gt=0.0, lt=1.0)


@dataclass(frozen=True)
class ModelParams:
    name: str
    pretrained: str
    embed_dim: int = checked(ge=1)
    dropout: float = checked(ge=0.0, lt=1.0)
    # residual: identity at start (epoch 0 = zero-shot) | mlp: the seed's Linear -> GELU -> Dropout,
    # random init. Last, with a default, so ModelParams built in code keep the residual head.
    head: str = checked(default="residual", choices=("residual", "mlp"))


@dataclass(frozen=True)
class TrainParams:
    freeze_backbone: bool
    standardize_features: bool
    epochs: int = checked(ge=0)
    batch_size: int = checked(ge=2)
    lr: float = checked(gt=0.0)
    backbone_lr_scale: float = checked(ge=0.0)
    weight_decay: float = checked(ge=0.0)
    warmup_fraction: float = checked(ge=0.0, le=1.0)
    grad_clip_norm: float = checked(gt=0.0)
    augment: bool
    num_workers: int | str = checked(ge=0, auto=True)  # auto: features.loader_workers
    resume: bool
    keep_checkpoints: int = checked(ge=0)  # 0: keep every epoch's checkpoint
    device: str = checked(choices=("auto", "cpu", "cuda"))
    processes: int = checked(ge=1)  # train and embed on this many processes (torchrun)
    val_top_k: int = checked(ge=1)
    sampler: str = checked(choices=("random", "class_balanced"))
    images_per_class: int = checked(ge=2)  # K of class_balanced P x K batches
    optimizer: str = checked(choices=("adamw", "adam"))  # adam: weight decay as L2 in the gradient
    schedule: str = checked(choices=("cosine", "constant"))  # the lr after the warmup
    clamp_temperature: bool  # keep the learnable temperature at most 100 (open_clip's clamp)
    # Fine-tuning levers (clipcore.train.unfreezing, clipcore.train.ema); off by default.
    # With freeze_backbone false: how many of the image tower's last blocks train ("all": every
    # block, the stem too); freeze_backbone true trains the head alone whatever this says.
    unlocked_blocks: int | str = checked(default="all", ge=0, auto="all")
    layer_decay: float = checked(default=1.0, gt=0.0, le=1.0)  # block lr x decay^(blocks from the top)
    ema: float = checked(default=0.0, ge=0.0, lt=1.0)  # EMA decay of the trained weights; 0: off
    frozen_epochs: int = checked(default=0, ge=0)  # LP-FT: head-only epochs before the blocks unlock

    def __post_init__(self):
        if self.frozen_epochs and not self.freeze_backbone and self.frozen_epochs >= self.epochs:
            raise ParamsError(f"'train.frozen_epochs' ({self.frozen_epochs}) must be below "
                              f"'train.epochs' ({self.epochs}): the blocks would never unlock")
        if self.batch_size < self.processes:  # each process takes a share of every batch
            raise ParamsError(f"'train.batch_size' ({self.batch_size}) must be at least "
                              f"'train.processes' ({self.processes}): each process takes a "
                              f"share of every batch")
        if self.sampler == "class_balanced" and self.batch_size % self.images_per_class:
            raise ParamsError(f"'train.batch_size' ({self.batch_size}) must be a multiple of "
                              f"'train.images_per_class' ({self.images_per_class}) with "
                              f"train.sampler class_balanced")


# loss.name values whose loss compares the batch's images with one another: they need same-class
# images in each batch (clipcore.train.losses).
PAIR_LOSSES = ("supcon", "triplet", "multi_similarity")


@dataclass(frozen=True)
class ClipLossParams:
    """None yet: the CLIP loss's knobs are LossParams' first ones (named before other losses
    came). The section exists so that dvc.yaml's `loss.${loss.name}` names one for every loss."""


@dataclass(frozen=True)
class ArcFaceParams:
    margin: float = checked(gt=0.0, lt=90.0)  # degrees, as pytorch-metric-learning takes it
    scale: float = checked(gt=0.0)
    class_lr_scale: float = checked(gt=0.0)  # the class weights' lr = train.lr * this


@dataclass(frozen=True)
class SubCenterArcFaceParams:
    margin: float = checked(gt=0.0, lt=90.0)  # degrees
    scale: float = checked(gt=0.0)
    class_lr_scale: float = checked(gt=0.0)
    sub_centers: int = checked(ge=1)


@dataclass(frozen=True)
class CosFaceParams:
    margin: float = checked(gt=0.0, lt=1.0)  # subtracted from the target class's cosine
    scale: float = checked(gt=0.0)
    class_lr_scale: float = checked(gt=0.0)


@dataclass(frozen=True)
class SupConParams:
    temperature: float = checked(gt=0.0)


@dataclass(frozen=True)
class TripletParams:
    margin: float = checked(gt=0.0)  # Euclidean distance between unit embeddings
    miner: str = checked(choices=("semihard", "hard", "all"))  # triplets the loss averages over


@dataclass(frozen=True)
class MultiSimilarityParams:
    alpha: float = checked(gt=0.0)
    beta: float = checked(gt=0.0)
    base: float = checked(ge=-1.0, le=1.0)  # a cosine similarity
    epsilon: float = checked(ge=0.0)  # the miner's margin


@dataclass(frozen=True)
class LossParams:
    name: str = checked(choices=("clip", "arcface", "subcenter_arcface", "cosface", *PAIR_LOSSES))
    same_class_positives: bool
    text_targets: str = checked(choices=("frozen", "learnable", "head"))
    target_init: str = checked(choices=("caption", "class_mean"))
    # Each loss's own knobs, read only when loss.name picks it.
    clip: ClipLossParams
    arcface: ArcFaceParams
    subcenter_arcface: SubCenterArcFaceParams
    cosface: CosFaceParams
    supcon: SupConParams
    triplet: TripletParams
    multi_similarity: MultiSimilarityParams

    def __post_init__(self):
        # A text head maps the caption embeddings anew at every step: no target to place.
        if self.text_targets == "head" and self.target_init != "caption":
            raise ParamsError("'loss.target_init' must be caption with 'loss.text_targets: head' "
                              "(the text head trains on the caption embeddings)")


@dataclass(frozen=True)
class EmbedParams:
    # The inference batch: embed's and training's backbone-feature passes (frozen features,
    # validation); no gradients, so larger than train.batch_size.
    batch_size: int = checked(ge=1)
    num_workers: int | str = checked(ge=0, auto=True)  # auto: features.loader_workers
    wise_ft_alpha: float = checked(ge=0.0, le=1.0)
    tta: str = checked(choices=("none", "flip"))
    # Where the backbone trains: the decoded pixels of embed's and validation's images, kept for
    # the passes after the first, this many GiB in memory and the rest on disk (pixel_cache).
    pixel_cache_gib: float = checked(ge=0.0)


@dataclass(frozen=True)
class QueryExpansionParams:
    k: int = checked(ge=1)
    alpha: float = checked(ge=0.0)


@dataclass(frozen=True)
class KReciprocalParams:
    k1: int = checked(ge=1)
    k2: int = checked(ge=1)
    lambda_value: float = checked(ge=0.0, le=1.0)


@dataclass(frozen=True)
class IvfParams:
    nlist: int = checked(ge=0)  # 0: chosen from the gallery size
    nprobe: int = checked(ge=1)


@dataclass(frozen=True)
class HnswParams:
    m: int = checked(ge=2)
    ef_construction: int = checked(ge=1)
    ef_search: int = checked(ge=1)


@dataclass(frozen=True)
class RetrieveParams:
    top_k: int = checked(ge=1)
    metric: str = checked(choices=("cosine", "euclidean"))
    index: str = checked(choices=("exact", "ivf", "hnsw"))
    ivf: IvfParams
    hnsw: HnswParams
    picture_queries: int = checked(ge=0)
    rerank: str = checked(choices=("none", "aqe", "kreciprocal"))
    qe: QueryExpansionParams
    dba_k: int = checked(ge=0)  # 0: no database-side augmentation
    kreciprocal: KReciprocalParams

    def __post_init__(self):
        # Query expansion and DBA average unit vectors: they mean nothing for raw L2 distances.
        if self.metric != "cosine" and (self.rerank == "aqe" or self.dba_k):
            raise ParamsError("'retrieve.rerank: aqe' and 'retrieve.dba_k' need "
                              "'retrieve.metric: cosine'")


@dataclass(frozen=True)
class SubmitParams:
    url: str
    groupname: str
    timeout: float = checked(gt=0.0)
    retries: int = checked(ge=0)
    backoff: float = checked(ge=0.0)
    force: bool


@dataclass(frozen=True)
class ReportParams:
    worst_queries: int = checked(ge=0)  # queries shown with their matches; 0: none


@dataclass(frozen=True)
class Params:
    seed: int = checked(ge=0, lt=2**32)  # numpy's seeds are 32-bit
    data: DataParams
    demo: DemoParams
    model: ModelParams
    train: TrainParams
    loss: LossParams
    embed: EmbedParams
    retrieve: RetrieveParams
    submit: SubmitParams
    report: ReportParams

    def __post_init__(self):
        # WiSE-FT mixes with the untouched head: an mlp head's is random, a mix with it is noise.
        if self.model.head == "mlp" and self.embed.wise_ft_alpha != 1.0:
            raise ParamsError("'embed.wise_ft_alpha' must be 1.0 with 'model.head: mlp' (WiSE-FT "
                              "mixes with the untouched head, which an mlp head draws at random)")
        # Class-balanced batches give each image K - 1 same-class images; the plain CLIP loss
        # would push them all away as negatives.
        if (self.train.sampler == "class_balanced" and self.loss.name == "clip"
                and not self.loss.same_class_positives):
            raise ParamsError("'train.sampler: class_balanced' needs 'loss.same_class_positives: "
                              "true' (otherwise each image's K - 1 same-class images in its batch "
                              "count as negatives)")
        # Random batches of many classes hold few same-class images, often none: a pair loss
        # then has nothing to pull together.
        if self.loss.name in PAIR_LOSSES and self.train.sampler != "class_balanced":
            raise ParamsError(f"'loss.name: {self.loss.name}' compares same-class images within "
                              f"a batch: set 'train.sampler: class_balanced' (random batches may "
                              f"hold none)")


def dotted(tree: dict, prefix: str = "") -> dict:
    """A nested mapping (params as `dataclasses.asdict` or YAML give them) as flat dotted keys."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def with_overrides(tree: dict, overrides: dict | None) -> dict:
    """A copy of a params tree with dotted keys set ({"train.epochs": 2}), as `dvc exp run -S`
    sets them (the key must exist)."""
    tree = copy.deepcopy(tree)
    for key, value in (overrides or {}).items():
        *sections, name = key.split(".")
        target = tree
        for section in sections:
            target = target[section]
        target[name] = value
    return tree


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming the first bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: object, source: str = "params") -> Params:
    return build(Params, raw, prefix="", source=source)
