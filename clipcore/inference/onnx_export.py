"""ONNX export of a trained model's image side: the image tower, the head and the final L2
normalisation (with the run's flip TTA and WiSE-FT weights as they embed), the input's mean/std
normalisation included. Input `pixels`: float32 (batch, 3, size, size) RGB in [0, 1], the image
resized and centre-cropped as the JSON written beside the .onnx file says (the model's own
pixel pipeline, clipcore.data.pixels, uint8 / 255); output `embedding`:
(batch, embed_dim) unit vectors. The batch dimension is dynamic.

onnx and onnxruntime are an extra install (requirements-export.txt): nothing else needs them.
torch's TorchScript exporter (dynamo=False): the dynamo one needs onnxscript, not a dependency
here. nn.MultiheadAttention's fused inference kernel has no ONNX form, so it is switched off
while exporting (the plain path computes the same attention).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from clipcore.data.images import load_rgb
from clipcore.errors import ClipcoreError
from clipcore.files import write_text_atomic
from clipcore.inference.face_crops import ImageCrop
from clipcore.inference.loading import TrainedModel
from clipcore.model.factory import FineTunedCLIP

OPSET = 18
EXTRA = "requirements-export.txt"


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ClipcoreError(f"ONNX export needs {module}, not installed: "
                            f"pip install -r {EXTRA}") from None


class ImageEncoder(nn.Module):
    """[0, 1] pixels -> unit embeddings, as TrainedModel.embed_images computes them."""

    def __init__(self, model: FineTunedCLIP, tta: str):
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = self.model.normalise(pixels)  # its mean/std, as backbone_features applies them
        features = self.model.backbone_features(images)
        if self.tta == "flip":
            features = torch.stack([features, self.model.backbone_features(images.flip(-1))], 1)
        return self.model.embed_features(features)


def export_onnx(trained: TrainedModel, out: Path) -> dict:
    """Write `out` (.onnx) and `out`.json (the preprocessing and where the model came from)."""
    _require("onnx")  # torch's exporter writes the graph with it
    model = trained.model.float().cpu().eval()
    encoder = ImageEncoder(model, trained.embed.tta).eval()
    size = _crop_size(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.onnx.export(encoder, (torch.rand(2, 3, size, size),), str(out), dynamo=False,
                          input_names=["pixels"], output_names=["embedding"], opset_version=OPSET,
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    sidecar = {
        "input": {"name": "pixels", "shape": ["batch", 3, size, size], "range": [0.0, 1.0],
                  "layout": "RGB, channels first"},
        "output": {"name": "embedding", "shape": ["batch", model.embed_dim], "unit_length": True},
        "preprocess": {"steps_before_the_graph": model.preprocess_val.steps(),
                       "mean_std_inside_the_graph": {"mean": list(model.pixels.mean),
                                                     "std": list(model.pixels.std)}},
        "model": str(trained.file), "model_sha256": trained.sha256, "tta": trained.embed.tta,
        "wise_ft_alpha": trained.embed.wise_ft_alpha, "opset": OPSET,
        # Before the steps above: the model trained on face crops (clipcore.crop, MTCNN).
        "face_crop": {"crop": trained.crop.crop, "crop_margin": trained.crop.margin}}
    write_text_atomic(Path(f"{out}.json"), json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def onnx_embeddings(onnx_file: Path, model: FineTunedCLIP, images: Sequence[Path],
                    batch_size: int = 32, crop: ImageCrop | None = None) -> np.ndarray:
    """Embeddings of image files through the exported graph with onnxruntime (face-cropped
    first by `crop`, as TrainedModel.embed_files crops them)."""
    onnxruntime = _require("onnxruntime")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    transform = model.preprocess_val
    chunks = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        decoded = ([load_rgb(p, transform.least_size) for p in chunk] if crop is None
                   else crop.files(chunk, transform.least_size))
        batch = torch.stack([transform(image) for image in decoded]).float().div(255)
        chunks.append(session.run(["embedding"], {"pixels": batch.numpy()})[0])
    return np.concatenate(chunks)


def _crop_size(model: FineTunedCLIP) -> int:
    size = model.clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
