"""A trained model ready to embed images as the pipeline did: the model file's model (WiSE-FT
mixed as the run's embed.wise_ft_alpha says, unless the file is mixed already, as best/model.pt
is), its validation transform, the face crop its training images had (face_crops), and the
run's embed (TTA, batch size) and retrieve settings, read from the summary.json that `best`
writes beside model.pt (or from a params.yaml for a model file without one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clipcore import paths
from clipcore.data.images import load_rgb
from clipcore.errors import ClipcoreError
from clipcore.files import file_sha256
from clipcore.inference.face_crops import ImageCrop, image_crop
from clipcore.model.factory import FineTunedCLIP
from clipcore.model.features import backbone_features, batch_features, resolve_device
from clipcore.params import EmbedParams, RetrieveParams, load_params
from clipcore.params_parsing import build
from clipcore.retrieve.embedding import embedding_model


@dataclass
class TrainedModel:
    model: FineTunedCLIP
    file: Path
    sha256: str              # of the model file: a gallery index records it
    embed: EmbedParams
    retrieve: RetrieveParams
    device: torch.device
    crop: ImageCrop          # data.crop: face crops the queries and gallery images as in training

    def embed_files(self, images: Sequence[Path], desc: str = "embed") -> np.ndarray:
        """(N, embed_dim) float32 unit embeddings of image files, as the embed stage makes them
        (of the crop stage's files, for a model trained on face crops)."""
        if self.crop.crop == "face":
            return self._embed_cropped(images, desc)
        features = backbone_features(self.model, images, batch_size=self.embed.batch_size,
                                     num_workers=self.embed.num_workers, desc=desc,
                                     tta=self.embed.tta)
        with torch.inference_mode():
            return self.model.embed_features(features).float().cpu().numpy()

    def decode(self, file: Path | BinaryIO) -> Image.Image:
        """An image file decoded as embed_files decodes it: a large JPEG at the reduced scale
        its resize allows (clipcore.data.images.load_rgb), in full where a face is to be found."""
        least_size = None if self.crop.crop == "face" else self.model.preprocess_val.least_size
        return load_rgb(file, least_size)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """embed_files for decoded RGB images (the service's uploads: `decode`), in one batch."""
        return self._embed_batch(self.crop.images(images))

    def _embed_cropped(self, images: Sequence[Path], desc: str) -> np.ndarray:
        # Decoded, detected and embedded a batch at a time: memory stays flat on a large gallery.
        rows = [np.zeros((0, self.model.embed_dim), np.float32)]
        with tqdm(total=len(images), desc=desc, unit="img") as bar:
            for start in range(0, len(images), self.embed.batch_size):
                chunk = images[start:start + self.embed.batch_size]
                rows.append(self._embed_batch(
                    self.crop.files(chunk, self.model.preprocess_val.least_size)))
                bar.update(len(chunk))
        return np.concatenate(rows)

    def _embed_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.model.preprocess_val(image) for image in images])
        with torch.inference_mode():
            features = batch_features(self.model, batch.to(self.device), self.embed.tta)
            return self.model.embed_features(features.float()).float().cpu().numpy()


def load_trained(model: str | Path, device: str = "auto",
                 params_file: str | Path = "params.yaml") -> TrainedModel:
    """`model`: a best/ folder (model.pt and summary.json), or a model file; a file without a
    summary.json beside it takes its embed and retrieve settings from `params_file`."""
    model = Path(model)
    file = model / paths.BEST_MODEL.name if model.is_dir() else model
    if not file.is_file():
        raise ClipcoreError(f"{file}: model file not found (run `dvc repro`, or pass a "
                            f"model_epoch_X.pt from {paths.ALL_WEIGHTS})")
    embed, retrieve, data, source = _settings(file, Path(params_file))
    torch_device = resolve_device(device)
    loaded, _ = embedding_model(file, embed.wise_ft_alpha, torch_device)
    crop = image_crop(file, loaded.image_crop, data, source)
    return TrainedModel(loaded.eval(), file, file_sha256(file), embed, retrieve, torch_device, crop)


def _settings(file: Path, params_file: Path) -> tuple[EmbedParams, RetrieveParams, dict, str]:
    """The run's embed and retrieve params, its data.crop keys, and the file they were read from."""
    summary = file.with_name(paths.BEST_SUMMARY.name)
    if not summary.is_file():
        params = load_params(params_file)
        crop = {"crop": params.data.crop, "crop_margin": params.data.crop_margin}
        return params.embed, params.retrieve, crop, str(params_file)
    try:
        made_by = json.loads(summary.read_text(encoding="utf-8"))["params"]
        crop = {key: made_by["data"][key] for key in ("crop", "crop_margin") if key in made_by["data"]}
        return (build(EmbedParams, made_by["embed"], "embed.", str(summary)),
                build(RetrieveParams, made_by["retrieve"], "retrieve.", str(summary)),
                crop, str(summary))
    except (ValueError, KeyError, TypeError) as exc:
        raise ClipcoreError(f"{summary}: not the best stage's summary ({exc!r})") from None
