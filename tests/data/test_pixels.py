"""The pixel pipeline (clipcore.data.pixels): uint8 out of the DataLoader workers, normalised on
the model's device, and within a grey level or so of open_clip's PIL transforms that it replaces
(tensor bicubic is not PIL bicubic), val and training augmentation alike, on photo-like images."""
from __future__ import annotations

import pytest
import torch
from conftest import photo_like
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch.utils.data import default_collate
from torchvision import transforms

from clipcore.data.images import ImageFiles, load_rgb
from clipcore.data.pixels import (
    Normalise,
    PixelSettings,
    TrainPixels,
    ValPixels,
    collate_pixels,
)
from clipcore.model.factory import build_model
from clipcore.model.features import backbone_features, image_loader
from clipcore.params import ModelParams

OPENAI = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
SIZES = [(250, 250), (640, 480), (300, 900), (100, 80)]  # (width, height)
MAX_DIFF = 0.05  # of the normalised input: about 3 grey levels


def settings(size: int = 224, **changes) -> PixelSettings:
    cfg = {"size": size, **OPENAI, "interpolation": "bicubic", "resize_mode": "shortest", **changes}
    return PixelSettings.from_open_clip(cfg, (0.9, 1.0))


def open_clip_transforms(pixels: PixelSettings) -> tuple:
    """open_clip's val and train transforms for these settings, as the model used them before
    (the train one with the flip the model put first)."""
    cfg = PreprocessCfg(size=pixels.size, mean=pixels.mean, std=pixels.std,
                        interpolation=pixels.interpolation, resize_mode=pixels.resize_mode)
    train = image_transform_v2(cfg, is_train=True)
    return (image_transform_v2(cfg, is_train=False),
            transforms.Compose([transforms.RandomHorizontalFlip(), *train.transforms]))


@pytest.fixture(scope="module")
def tiny():
    return build_model(ModelParams(name="tiny", pretrained="none", embed_dim=512, dropout=0.1)).eval()


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("jpegs")
    files = []
    for i, size in enumerate([*SIZES, (1024, 768), (48, 64)]):
        files.append(folder / f"photo_{i}.jpg")
        photo_like(size, seed=i).save(files[-1], quality=90)
    return files


@pytest.mark.parametrize("augment", [False, True])
def test_workers_hand_over_uint8_pixels_at_the_models_size(tiny, jpegs, augment):
    loader = image_loader(ImageFiles(jpegs, tiny.train_transform(augment)), batch_size=3,
                          num_workers=1, device=torch.device("cpu"))
    batches = [pixels for pixels, _ in loader]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 32, 32) for b in batches)
    assert sum(map(len, batches)) == len(jpegs)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", SIZES)
def test_the_val_path_matches_open_clips_float_path(mode, size):
    pixels = settings(resize_mode=mode)
    before, _ = open_clip_transforms(pixels)
    image = photo_like(size, seed=1)
    ours = Normalise(pixels)(ValPixels(pixels)(image))
    theirs = before(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().max() < MAX_DIFF


def test_the_augmentation_draws_the_flips_and_crops_open_clip_drew():
    """The same random stream gives the same views: flip first, then the crop's box."""
    pixels = settings()
    _, before = open_clip_transforms(pixels)
    image, flipped = photo_like((400, 300), seed=2), 0
    for seed in range(12):
        torch.manual_seed(seed)
        theirs = before(image)
        torch.manual_seed(seed)
        flipped += bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw
        torch.manual_seed(seed)
        ours = Normalise(pixels)(TrainPixels(pixels)(image))
        assert (ours - theirs).abs().max() < MAX_DIFF, seed
    assert 0 < flipped < 12  # both orientations were compared


def test_normalising_uint8_is_to_tensor_and_normalize():
    image = photo_like((224, 224), seed=3)
    pixels = ValPixels(settings())(image)
    expected = transforms.Normalize(OPENAI["mean"], OPENAI["std"])(transforms.ToTensor()(image))
    assert torch.allclose(Normalise(settings())(pixels), expected, atol=1e-6)


def test_the_models_features_stay_those_of_the_float_path(tiny, jpegs):
    """Each image's tiny-model features, through the whole new path (draft decoding included),
    within a few percent of the old path's, and nearer to them than to any other image's."""
    before, _ = open_clip_transforms(tiny.pixels)
    ours = backbone_features(tiny, jpegs, batch_size=4, num_workers=0, desc="features")
    with torch.no_grad():
        theirs = tiny.backbone_features(torch.stack([before(load_rgb(f)) for f in jpegs]))
    assert ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max() < 0.05
    assert torch.equal(torch.cdist(ours, theirs).argmin(dim=1), torch.arange(len(jpegs)))


def test_uint8_and_normalised_float_give_the_same_features(tiny, jpegs):
    batch = torch.stack([tiny.preprocess_val(load_rgb(f)) for f in jpegs])
    with torch.no_grad():
        assert torch.equal(tiny.backbone_features(batch),
                           tiny.backbone_features(tiny.normalise(batch)))


def test_batches_stack_in_the_images_memory_order_and_normalise_contiguous(tiny, jpegs):
    """collate_pixels skips the transposing copy: the same values as default_collate, and the
    model sees the contiguous input it always had (the same features, to the bit)."""
    items = [(tiny.preprocess_val(load_rgb(f)), i) for i, f in enumerate(jpegs)]
    ours, positions = collate_pixels(items)
    theirs, _ = default_collate(items)
    assert torch.equal(ours, theirs) and positions.tolist() == list(range(len(jpegs)))
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    assert tiny.normalise(ours).is_contiguous()
    with torch.no_grad():
        assert torch.equal(tiny.backbone_features(ours), tiny.backbone_features(theirs))
