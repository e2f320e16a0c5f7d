"""The pixel cache (embed.pixel_cache_gib) over real image files: later passes get the loader's
batches element for element, in the transform's dtype, from memory and beyond the bound from a
file on disk that no one sees; a pass cut short stores nothing."""
from __future__ import annotations

import torch
from torchvision import transforms

from clipcore.data.images import ImageFiles
from clipcore.data.manifests import read_manifest
from clipcore.model.features import image_loader
from clipcore.model.pixel_cache import GIB, PixelCache

UINT8 = transforms.Compose([transforms.Resize(24), transforms.CenterCrop(24),
                            transforms.PILToTensor()])  # (3, 24, 24) uint8
FLOAT = transforms.Compose([UINT8, transforms.ConvertImageDtype(torch.float32)])


def val_images(prepared_demo, count: int = 50):
    root, prepared = prepared_demo
    return [root / p for p in read_manifest(prepared, "val")["path"][:count]]


def passes(cache: PixelCache, paths, transform, batch_size: int, rounds: int):
    """Each pass's batches, and how many times the cache made a loader (decoded)."""
    decodes = []

    def decode():
        decodes.append(1)
        return image_loader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=0,
                            device=torch.device("cpu"))

    return [list(cache.batches(paths, batch_size, decode)) for _ in range(rounds)], len(decodes)


def test_later_passes_are_the_loaders_batches_from_memory_and_disk(prepared_demo, tmp_path,
                                                                   capsys):
    paths = val_images(prepared_demo)
    for transform in (UINT8, FLOAT):
        sample = ImageFiles(paths, transform)[0][0]
        row_bytes = sample.numel() * sample.element_size()
        # 23 rows in memory: the batch of rows 21..27 lies across memory and disk.
        cache = PixelCache(23 * row_bytes / GIB, tmp_path / "repository")
        (first, *later), decodes = passes(cache, paths, transform, batch_size=7, rounds=3)
        assert decodes == 1
        printed = capsys.readouterr().out
        assert f"{len(paths) - 23} of {len(paths)} images' pixels kept on disk" in printed
        for again in later:
            assert len(again) == len(first) == 8
            for (images, positions), (stored, stored_positions) in zip(first, again):
                assert stored.dtype == images.dtype == sample.dtype
                assert torch.equal(stored, images) and torch.equal(stored_positions, positions)
        assert list((tmp_path / "repository").iterdir()) == []  # the file never had a name to see


def test_within_the_bound_nothing_goes_to_disk(prepared_demo, tmp_path, capsys):
    paths = val_images(prepared_demo, 20)
    cache = PixelCache(1.0, tmp_path / "repository")
    (first, again), decodes = passes(cache, paths, FLOAT, batch_size=8, rounds=2)
    assert decodes == 1 and "on disk" not in capsys.readouterr().out
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not (tmp_path / "repository").exists()


def test_a_pass_cut_short_stores_nothing(prepared_demo, tmp_path):
    paths = val_images(prepared_demo, 20)
    cache = PixelCache(1.0, tmp_path)
    decodes = []

    def decode():
        decodes.append(1)
        return image_loader(ImageFiles(paths, FLOAT), batch_size=8, num_workers=0,
                            device=torch.device("cpu"))

    next(iter(cache.batches(paths, 8, decode)))  # stopped after its first batch (an error)
    whole = list(cache.batches(paths, 8, decode))
    again = list(cache.batches(paths, 8, decode))
    assert len(decodes) == 2 and sum(len(images) for images, _ in whole) == len(paths)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again))
