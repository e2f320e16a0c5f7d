"""The embed stage: each model file's embeddings of the query and gallery images.

Model files whose backbone did not train (epoch 0, and every epoch of a frozen run) share one
base model: its backbone features are computed once per image and each file's head is applied
to them, so N such epochs cost about one pass through the image tower. Files whose backbone
trained get a pass each, over pixels decoded once (the first pass; embed.pixel_cache_gib), and
every file's tensors go into one model per base, built once, not a CLIP built per file.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from clipcore import paths
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.files import write_atomic
from clipcore.model import distributed
from clipcore.model.checkpoint import backbone_was_trained, build_base, load_into, read_model_file
from clipcore.model.factory import FineTunedCLIP
from clipcore.model.features import backbone_features
from clipcore.model.pixel_cache import PixelCache
from clipcore.params import Params
from clipcore.retrieve.wise_ft import mix_weights

SPLITS = ("query", "gallery")


@dataclass(frozen=True)
class EmbedReport:
    files: list[Path]        # the embeddings files written, by epoch
    backbone_passes: int     # passes over the query and gallery images through an image tower
    images: dict[str, int]   # images per split


class EmbeddingModels:
    """Model files' models as embed.wise_ft_alpha wants them, each file's tensors loaded into one
    model per base, built at its first file. The model handed out serves the next file on its
    base too: use it before loading another."""

    def __init__(self, alpha: float, device: torch.device):
        self.alpha, self.device = alpha, device
        self._models: dict[str, FineTunedCLIP] = {}
        self._untouched: dict[str, FineTunedCLIP] = {}  # each base's as built: WiSE-FT's base
        self._changed: set[str] = set()  # bases whose model's tower holds another file's

    def load(self, model_file: Path) -> tuple[FineTunedCLIP, bool]:
        """A model file's model, and whether its backbone trained. A file saved already mixed
        (best/model.pt) is taken as it is: mixing it again would move it further."""
        data, params = read_model_file(model_file, self.device)
        key = json.dumps([data["model"], data["base"]], sort_keys=True)
        # A tower that another file's tensors changed is built anew for a file that holds no
        # tower (never in files from train, whose tower trains from some epoch on).
        fresh = key not in self._models or (key in self._changed and not data["backbone_trained"])
        if fresh:
            self._models[key] = build_base(model_file, params, self.device)
            self._changed.discard(key)
        mixes = self.alpha != 1.0 and data.get("wise_ft_alpha", 1.0) == 1.0
        if mixes and key not in self._untouched:
            self._untouched[key] = (copy.deepcopy(self._models[key]) if fresh
                                    else build_base(model_file, params, self.device))
        model, backbone_trained = load_into(self._models[key], model_file, data)
        if backbone_trained:
            self._changed.add(key)
        if model.wise_ft_alpha != 1.0:
            if self.alpha not in (1.0, model.wise_ft_alpha):
                raise ClipcoreError(
                    f"{model_file}: already WiSE-FT mixed at alpha {model.wise_ft_alpha}, not "
                    f"{self.alpha}; mix a fine-tuned file ({paths.ALL_WEIGHTS}/model_epoch_X.pt) "
                    f"instead")
        elif mixes:
            mix_weights(model, self._untouched[key], self.alpha, backbone_trained)
        return model, backbone_trained


def embedding_model(model_file: Path, alpha: float,
                    device: torch.device) -> tuple[FineTunedCLIP, bool]:
    """A model file's model as embed.wise_ft_alpha wants it, and whether its backbone trained."""
    return EmbeddingModels(alpha, device).load(model_file)


def embed_all(params: Params, data_root: Path, prepared: Path = paths.PREPARED) -> EmbedReport:
    """Write `embeddings/epoch_X.npz` for every `all_weights/model_epoch_X.pt`."""
    model_files = paths.epoch_files(paths.ALL_WEIGHTS, "model_epoch_*.pt")
    if not model_files:
        raise ClipcoreError(f"{paths.ALL_WEIGHTS}: no model_epoch_*.pt files (run dvc repro train)")
    # Several processes (train.processes): each embeds its share of the images, rank 0 writes.
    world = distributed.join(params.train.device)
    device = world.device
    frames = {split: read_manifest(prepared, split) for split in SPLITS}
    images = [Path(data_root) / p for split in SPLITS for p in frames[split]["path"]]
    sizes = [len(frames[split]) for split in SPLITS]
    names = {split: np.array([PurePosixPath(p).name for p in frame["path"]], dtype=str)
             for split, frame in frames.items()}

    shared: dict[str, torch.Tensor] = {}  # base identity -> features of query + gallery
    pixels: dict[str, PixelCache] = {}  # base identity -> its decoded query + gallery images
    trains = [backbone_was_trained(model_file) for model_file in model_files]
    models = EmbeddingModels(params.embed.wise_ft_alpha, device)
    written, passes = [], 0
    for index, model_file in enumerate(model_files):
        model, backbone_trained = models.load(model_file)
        base = json.dumps(model.base, sort_keys=True)
        if backbone_trained or base not in shared:
            if any(trains[index + 1:]) and base not in pixels:  # a pass follows: keep the pixels
                pixels[base] = PixelCache(params.embed.pixel_cache_gib, paths.REPOSITORY,
                                          pin_memory=device.type == "cuda")
            # Query and gallery in one pass: one loader start, decoding overlaps throughout.
            features = backbone_features(
                model, world.shard(images), batch_size=params.embed.batch_size,
                num_workers=params.embed.num_workers, desc=f"{model_file.name} query+gallery",
                tta=params.embed.tta, pixels=pixels.get(base))
            passes += 1
            if not backbone_trained:
                shared[base] = features
        else:
            features = shared[base]
        with torch.inference_mode():
            embeddings = world.gather_shards(model.embed_features(features).float(), len(images))
        query, gallery = np.split(embeddings.cpu().numpy(), [sizes[0]])
        target = paths.embeddings_path(paths.epoch_of(model_file))
        if world.is_main:
            write_atomic(target, lambda f: np.savez(
                f, query=query, gallery=gallery,
                query_names=names["query"], gallery_names=names["gallery"]))
        written.append(target)
    if world.is_main:  # only now: a run that stops halfway keeps the earlier run's files
        for stale in set(paths.epoch_files(paths.EMBEDDINGS, "epoch_*.npz")) - set(written):
            stale.unlink()
    return EmbedReport(written, passes, dict(zip(SPLITS, sizes)))
