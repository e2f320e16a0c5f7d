"""The generated benchmark domain: distinct identities, two renderings that differ, one seed
one output, and a data root that prepare reads like the competition's."""
from __future__ import annotations

import csv
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from clipcore.data.manifests import prepare, read_manifest
from clipcore.demo.domain import (
    RENDERINGS,
    draw,
    identities,
    rendering_of,
    write_domain,
)
from clipcore.errors import ClipcoreError

TRAIN, TEST = range(0, 6), range(6, 10)


def tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def domain_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain") / "data"
    write_domain(root, TRAIN, TEST, seed=3)
    return root


def test_identities_are_distinct_and_the_same_for_one_seed():
    table = identities(500, seed=1)
    signatures = {frozenset((part.kind, part.hue) for part in identity) for identity in table}
    assert len(signatures) == 500  # no two identities hold the same coloured shapes
    assert identities(500, seed=1) == table
    assert identities(500, seed=2) != table
    assert identities(20, seed=1) == table[:20]  # a number names the same identity in any root


@pytest.mark.timeout(60)
def test_more_identities_than_the_domain_holds_is_one_line_not_a_hang():
    """Before: identities(17_297) looked for a new set of coloured shapes for ever."""
    with pytest.raises(ClipcoreError, match=r"^the generated domain has at most 17,296 "
                                            r"identities .*asked for 17,297$"):
        identities(17_297, seed=0)


def test_renderings_differ_more_than_two_photos_of_one_identity():
    identity = identities(1, seed=0)[0]

    def pixels(rendering, k):
        return np.asarray(draw(identity, rendering, np.random.default_rng(k), 32), float)

    def mean_colour(rendering):
        return np.mean([pixels(rendering, k).reshape(-1, 3).mean(0) for k in range(20)], axis=0)

    photos = [pixels("photo", k) for k in range(4)]
    assert not np.array_equal(photos[0], photos[1])  # pose, light and background vary
    # Render-like images are crisp (flat fills, outlines); photos are noisy and blurred.
    grain = {r: np.mean([np.abs(np.diff(pixels(r, k), axis=1)).mean() for k in range(20)])
             for r in RENDERINGS}
    assert grain["photo"] != pytest.approx(grain["render"], rel=0.1)
    assert np.abs(mean_colour("photo") - mean_colour("render")).max() > 5
    with pytest.raises(ValueError, match="rendering"):
        draw(identity, "sketch", np.random.default_rng(0), 32)


def test_layout_names_and_labels(domain_root):
    classes = sorted(p.name for p in (domain_root / "train").iterdir())
    assert classes == [f"{n:04d}" for n in TRAIN]
    for folder in (domain_root / "train").iterdir():
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["photo_0.png", "photo_2.png", "photo_4.png", "render_1.png",
                         "render_3.png"]  # 5 images, both renderings, told by the name
    with open(domain_root / "test_labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_split = {split: Counter(r["label"] for r in rows if r["split"] == split)
                 for split in ("query", "gallery")}
    assert all(counts == Counter({f"{n:04d}": 2 for n in TEST}) for counts in per_split.values())
    for split in ("query", "gallery"):
        files = sorted(p.name for p in (domain_root / "test" / split).iterdir())
        assert files == sorted(r["file"] for r in rows if r["split"] == split)
        assert all(re.fullmatch(r"[0-9a-f]{32}\.png", name) for name in files)
    with Image.open(next((domain_root / "test" / "query").iterdir())) as image:
        assert (image.size, image.mode) == ((32, 32), "RGB")
    assert rendering_of("train/0001/render_3.png") == "render"
    assert rendering_of("test/query/0a1b.png") is None


def test_one_seed_one_output_and_closed_set_images_are_new(domain_root, tmp_path):
    again = tmp_path / "again"
    write_domain(again, TRAIN, TEST, seed=3)
    assert tree(again) == tree(domain_root)
    other = tmp_path / "other"
    write_domain(other, TRAIN, TEST, seed=4)
    assert tree(other) != tree(domain_root)
    # Test identities that also train (closed set) get images drawn after their training ones.
    closed = tmp_path / "closed"
    write_domain(closed, TRAIN, TRAIN, seed=3, queries=1, gallery=1)
    train_images = {p.read_bytes() for p in (closed / "train").rglob("*.png")}
    assert not train_images & {p.read_bytes() for p in (closed / "test").rglob("*.png")}


def test_prepare_reads_the_root_with_test_labels(domain_root, tmp_path, params_factory):
    params = params_factory({"data.val_split": "class"})
    report = prepare(domain_root, tmp_path / "prepared", params.data, params.seed)
    assert report.labelled and not report.skipped
    assert report.counts["train"] + report.counts["val"] == 30
    assert (report.counts["query"], report.counts["gallery"]) == (8, 8)
    val = read_manifest(tmp_path / "prepared", "val")
    assert set(val["path"].map(rendering_of)) == set(RENDERINGS)


def test_never_overwrites_a_folder_that_is_not_generated(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("user data")
    with pytest.raises(ClipcoreError, match="not a demo data folder"):
        write_domain(tmp_path / "real", TRAIN, TEST, seed=0)
    assert (tmp_path / "real" / "keep.txt").read_text() == "user data"


def test_a_base_of_one_rendering_sees_only_that_rendering(tmp_path):
    # A base pretrained on photos alone never sees a render: the cross-rendering invariance is
    # then what fine-tuning has to teach (bench_accuracy --base-renderings photo).
    root = tmp_path / "photos"
    write_domain(root, range(2), range(2, 3), seed=3, renderings=("photo",))
    names = {p.name for p in (root / "train").rglob("*.png")}
    assert names == {f"photo_{k}.png" for k in range(5)}
    both = tmp_path / "both"
    write_domain(both, range(2), range(2, 3), seed=3)
    # The photos the two roots share are the same images (same identity, same image number).
    assert ((root / "train/0000/photo_2.png").read_bytes()
            == (both / "train/0000/photo_2.png").read_bytes())
