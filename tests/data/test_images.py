"""Decoding with JPEG draft mode (clipcore.data.images.load_rgb's least_size): a large JPEG
decodes at a reduced scale, never below what the transform's resize needs (so every crop the
augmentation may draw still downscales), only JPEGs at least twice that size, upright as EXIF
says, and the pixels the model gets stay close to a full decode's."""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import photo_like
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from clipcore.data.images import ImageFiles, load_rgb
from clipcore.data.pixels import CROP_RATIO, Normalise, PixelSettings, TrainPixels, ValPixels

PIXELS = PixelSettings((224, 224), (0.48145466, 0.4578275, 0.40821073),
                       (0.26862954, 0.26130258, 0.27577711))
TRANSFORMS = {"val": ValPixels(PIXELS), "train": TrainPixels(PIXELS)}
SIZES = [(1024, 768), (768, 1024), (2000, 300), (449, 449), (450, 450), (2400, 1800), (250, 250)]


@functools.cache
def picture(size: tuple[int, int]) -> Image.Image:
    return photo_like(size, seed=sum(size))


def jpeg(folder, size, name="photo.jpg", **save) -> object:
    path = folder / name
    picture(size).save(path, quality=90, **save)
    return path


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("size", SIZES)
def test_a_draft_never_decodes_below_what_the_resize_needs(tmp_path, kind, size):
    transform = TRANSFORMS[kind]
    decoded = load_rgb(jpeg(tmp_path, size), transform.least_size)
    least = transform.least_size(*size)
    assert decoded.size[0] >= least[0] and decoded.size[1] >= least[1]
    pixels = torch.zeros(3, decoded.size[1], decoded.size[0], dtype=torch.uint8)
    if kind == "val":  # the resize still only shrinks (or keeps) the decoded image
        resized = TRANSFORMS["val"].resize(pixels).shape[-2:]
        assert resized[0] <= decoded.size[1] and resized[1] <= decoded.size[0]
        return
    torch.manual_seed(0)
    for _ in range(200):  # every crop the augmentation draws is at least the output's size
        _, _, height, width = RandomResizedCrop.get_params(pixels, list(PIXELS.crop_scale),
                                                           list(CROP_RATIO))
        assert min(height, width) >= 224, (decoded.size, height, width)


def test_only_a_jpeg_twice_the_size_needed_is_drafted(tmp_path):
    val = TRANSFORMS["val"]
    assert load_rgb(jpeg(tmp_path, (1024, 768)), val.least_size).size == (512, 384)
    assert load_rgb(jpeg(tmp_path, (2400, 1800)), val.least_size).size == (300, 225)  # 1/8
    assert load_rgb(jpeg(tmp_path, (597, 448)), val.least_size).size == (597, 448)  # < 2x
    assert load_rgb(jpeg(tmp_path, (1024, 768))).size == (1024, 768)  # not asked: in full
    png = tmp_path / "photo.png"
    picture((1024, 768)).save(png)
    assert load_rgb(png, val.least_size).size == (1024, 768)  # PNG has no draft mode


def test_a_sideways_jpeg_drafts_by_its_upright_size(tmp_path):
    """A model input 448 wide, 112 high. Stored 2000 x 600, the photo reduces to 1/4 (500 x
    150: its height still over 112). With EXIF orientation 6 it is 600 x 2000 upright: its width
    600 must stay at 448 or more, so it decodes in full (1/4 would leave it 150 wide)."""
    wide = ValPixels(PixelSettings((112, 448), PIXELS.mean, PIXELS.std))
    assert load_rgb(jpeg(tmp_path, (2000, 600)), wide.least_size).size == (500, 150)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turned a quarter
    sideways = jpeg(tmp_path, (2000, 600), "sideways.jpg", exif=exif.tobytes())
    assert load_rgb(sideways, wide.least_size).size == (600, 2000)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_a_drafted_decode_gives_the_model_nearly_the_full_decodes_pixels(tmp_path, kind):
    path = jpeg(tmp_path, (1024, 768))
    transform, normalise = TRANSFORMS[kind], Normalise(PIXELS)
    views = []
    for least_size in (transform.least_size, None):
        torch.manual_seed(0)  # the same flip and crop for the train transform
        views.append(normalise(transform(load_rgb(path, least_size))))
    drafted, full = views
    assert (drafted - full).abs().mean() < 0.02 and (drafted - full).abs().max() < 0.2


def test_image_files_draft_with_their_transforms_least_size(tmp_path):
    files = ImageFiles([jpeg(tmp_path, (1024, 768))], TRANSFORMS["val"])
    assert files.least_size == TRANSFORMS["val"].least_size
    assert files[0][0].shape == (3, 224, 224) and files[0][0].dtype == torch.uint8
