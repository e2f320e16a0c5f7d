"""The pixel pipeline, one place for it: a decoded image to the uint8 (3, H, W) tensor the model
takes (`ValPixels`: resize and crop; `TrainPixels`: flip and random resized crop), and the
normalisation (x / 255, then the model's mean/std) that runs on the model's device
(`Normalise`, which FineTunedCLIP holds). Built from the model's preprocess settings (open_clip's
preprocess_cfg: size, interpolation, resize_mode, mean, std, fill_color).

Why uint8 tensors and not open_clip's PIL transforms, measured per core in a DataLoader worker
(FACTS.md, bench/bench_loader.py): PIL's bicubic resize was most of a worker's time, and a
float32 batch costs a worker 0.43 ms per image to hand over against 0.12 for uint8;
torchvision's antialiased resize on uint8 tensors is several times faster than PIL's. The
numbers move slightly: tensor bicubic is not PIL bicubic (max difference of the normalised
input about 0.03, tests/data/test_pixels.py).

Each transform also says how small a large JPEG may decode (`least_size`, for PIL's draft mode:
clipcore.data.images.load_rgb): never below what its resize needs, so quality holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

# RandomResizedCrop's default aspect ratios, which open_clip's train transform keeps.
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class PixelSettings:
    """What the pipeline is built from: open_clip's preprocess_cfg, and the train crop's scale."""
    size: tuple[int, int]                      # (height, width) of the model's input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"             # bicubic | bilinear | random (bicubic here)
    resize_mode: str = "shortest"              # shortest | longest | squash
    fill_color: int = 0                        # longest: the padding
    crop_scale: tuple[float, float] = (0.9, 1.0)  # open_clip's AugmentationCfg().scale

    @classmethod
    def from_open_clip(cls, cfg: dict, crop_scale: tuple[float, float]) -> "PixelSettings":
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size[-2:])
        mean, std = (tuple(float(v) for v in (x if isinstance(x, (list, tuple)) else (x,) * 3))
                     for x in (cfg["mean"], cfg["std"]))
        return cls(size, mean, std, cfg.get("interpolation") or "bicubic",
                   cfg.get("resize_mode") or "shortest", int(cfg.get("fill_color", 0)),
                   tuple(crop_scale))


def to_uint8(image: Image.Image) -> torch.Tensor:
    """An image as a (3, H, W) uint8 RGB tensor (channels-last in memory, which the resize
    kernel is fastest on); converted to RGB first where it is not, as open_clip's transform did."""
    return F.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))


def _resize(pixels: torch.Tensor, size: list[int], mode: InterpolationMode) -> torch.Tensor:
    return F.resize(pixels, size, interpolation=mode, antialias=True)


class ValPixels:
    """open_clip's validation transform on uint8 tensors: the resize of `resize_mode`, then a
    centre crop (padded with `fill_color` where `longest` leaves the image smaller)."""

    def __init__(self, settings: PixelSettings):
        self.settings = settings
        # open_clip: bilinear when asked for, else bicubic ("random" is bicubic at inference).
        self.mode = (InterpolationMode.BILINEAR if settings.interpolation == "bilinear"
                     else InterpolationMode.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.crop(self.resize(to_uint8(image)))

    def resize(self, pixels: torch.Tensor) -> torch.Tensor:
        (height, width), (th, tw) = pixels.shape[-2:], self.settings.size
        mode = self.settings.resize_mode
        if mode == "squash":
            return _resize(pixels, [th, tw], self.mode)
        if mode == "shortest" and th == tw:  # torchvision's Resize(int), as open_clip uses
            return _resize(pixels, [th], self.mode)
        ratio = (max if mode == "longest" else min)(height / th, width / tw)
        return _resize(pixels, [round(height / ratio), round(width / ratio)], self.mode)

    def crop(self, pixels: torch.Tensor) -> torch.Tensor:
        (height, width), (th, tw) = pixels.shape[-2:], self.settings.size
        if th > height or tw > width:  # open_clip's CenterCropOrPad
            left, top = max(0, (tw - width) // 2), max(0, (th - height) // 2)
            right, bottom = max(0, (tw - width + 1) // 2), max(0, (th - height + 1) // 2)
            pixels = F.pad(pixels, [left, top, right, bottom], fill=self.settings.fill_color)
        return F.center_crop(pixels, [th, tw])

    def least_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) an image of this size may decode at: the resize's
        output (the crop is taken from it), so a reduced decode only ever downscales less."""
        (th, tw), mode = self.settings.size, self.settings.resize_mode
        ratio = (max if mode == "longest" else min)(width / tw, height / th)
        return _reduced(width, height, ratio)

    def steps(self) -> list[str]:
        """The transform in words (the ONNX export's sidecar lists them)."""
        (th, tw), s = self.settings.size, self.settings
        return [f"resize ({s.resize_mode} side to {th}x{tw}), {self.mode.value}, antialiased, "
                f"on uint8 (torchvision.transforms.v2.functional.resize)",
                f"centre crop to {th}x{tw}" + (f" (padded with {s.fill_color})"
                                               if s.resize_mode == "longest" else ""),
                "uint8 / 255 -> float32 in [0, 1]"]


class TrainPixels:
    """The training augmentation on uint8 tensors: a horizontal flip (p 0.5), then open_clip's
    random resized crop (scale `crop_scale`, ratios 3/4 to 4/3, bicubic), drawing from torch's
    default generator in the same order as RandomHorizontalFlip + RandomResizedCrop did
    (clipcore.train.sampling seeds it per image)."""

    def __init__(self, settings: PixelSettings):
        self.settings = settings

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = to_uint8(image)
        flip = bool(torch.rand(1) < 0.5)
        top, left, height, width = RandomResizedCrop.get_params(
            pixels, list(self.settings.crop_scale), list(CROP_RATIO))
        if flip:  # the flipped image's box, cut from the unflipped one: only the crop flips
            left = pixels.shape[-1] - left - width
        crop = F.resized_crop(pixels, top, left, height, width, list(self.settings.size),
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        return F.horizontal_flip(crop) if flip else crop

    def least_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) an image of this size may decode at: one where every
        crop the augmentation may draw still has both sides at least the output's larger side.
        A drawn crop covers at least crop_scale[0] of the area at an aspect ratio within
        CROP_RATIO, so its shorter side is at least sqrt(scale * area * 3/4); when no such crop
        fits, the fallback is the whole image (up to that ratio), its shorter side."""
        least = min(math.sqrt(self.settings.crop_scale[0] * width * height
                              * min(CROP_RATIO[0], 1 / CROP_RATIO[1])), width, height)
        return _reduced(width, height, least / max(self.settings.size))


def _reduced(width: int, height: int, factor: float) -> tuple[int, int]:
    """The image's size scaled down by `factor` (never up), rounded up."""
    factor = max(factor, 1.0)
    return math.ceil(width / factor), math.ceil(height / factor)


def collate_pixels(items: list) -> list:
    """default_collate for (pixels, position) items, stacking each image in its own memory
    order: the transforms' (3, H, W) pixels lie channels-last in memory (PIL's order), and
    stacking them into a channels-first batch would cost a worker a transposing copy (a quarter
    of a millisecond per 224 px image, a fifth of the whole val path at 250x250). The batch is
    (B, 3, H, W) all the same, channels-last in memory until `Normalise` (on the device, where
    reordering costs next to nothing) makes it contiguous."""
    batch = default_collate([(pixels.permute(1, 2, 0), *rest) for pixels, *rest in items])
    return [batch[0].permute(0, 3, 1, 2), *batch[1:]]


class Normalise(nn.Module):
    """uint8 pixels -> the model's float input, (x / 255 - mean) / std, as ToTensor + Normalize
    computed it, on the device the pixels are on (the module moves with the model). The buffers
    are not persistent: no model file holds them, the settings rebuild them."""

    def __init__(self, settings: PixelSettings):
        super().__init__()
        self.register_buffer("mean", torch.tensor(settings.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(settings.std).view(3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: uint8 (..., 3, H, W); or float in [0, 1] (the ONNX graph's input)."""
        # Contiguous: the layout the model's convolution always had (a channels-last batch from
        # collate_pixels would pick other kernels, and other rounding).
        pixels = pixels.contiguous()
        scaled = pixels.float().div(255) if pixels.dtype == torch.uint8 else pixels
        return scaled.sub(self.mean).div(self.std)
