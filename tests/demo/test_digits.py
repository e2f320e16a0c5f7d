"""The digits demo: competition layout, every digit in every split, class-free test names,
a complete labels file, and byte-identical output for one seed."""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from clipcore.demo.digits import write_demo
from clipcore.errors import ClipcoreError

DIGITS = [str(d) for d in range(10)]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def labels(root: Path) -> list[dict]:
    with open(root / "test_labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_layout_and_counts(demo_root, params_factory):
    size = params_factory().demo.image_size
    assert sorted(p.name for p in (demo_root / "train").iterdir()) == DIGITS
    train = list((demo_root / "train").glob("*/*.png"))
    query = list((demo_root / "test" / "query").glob("*.png"))
    gallery = list((demo_root / "test" / "gallery").glob("*.png"))
    assert len(train) + len(query) + len(gallery) == 1797
    with Image.open(query[0]) as image:
        assert (image.size, image.mode) == ((size, size), "RGB")


def test_every_digit_in_query_and_gallery_in_the_set_shares(demo_root, params_factory):
    demo = params_factory().demo
    rows = labels(demo_root)
    per_split = {split: Counter(r["label"] for r in rows if r["split"] == split)
                 for split in ("query", "gallery")}
    assert all(set(counts) == set(DIGITS) for counts in per_split.values())
    test = sum(sum(counts.values()) for counts in per_split.values())
    assert test / 1797 == pytest.approx(demo.test_fraction, abs=0.01)
    assert sum(per_split["query"].values()) / test == pytest.approx(demo.query_fraction, abs=0.01)


def test_test_names_do_not_reveal_the_class_and_labels_are_complete(demo_root):
    rows = labels(demo_root)
    files = {split: sorted(p.name for p in (demo_root / "test" / split).iterdir())
             for split in ("query", "gallery")}
    for split, names in files.items():
        assert sorted(r["file"] for r in rows if r["split"] == split) == names
        assert all(re.fullmatch(r"[0-9a-f]{32}\.png", name) for name in names)
    assert not set(files["query"]) & set(files["gallery"])
    assert {r["label"] for r in rows} == set(DIGITS)


def test_same_seed_same_bytes_other_seed_other_split(demo_root, params_factory, tmp_path):
    params = params_factory()
    write_demo(tmp_path / "again", params.demo, params.seed)
    assert tree(tmp_path / "again") == tree(demo_root)
    write_demo(tmp_path / "other", params.demo, params.seed + 1)
    same_split = {p for p in tree(demo_root) if p.startswith("train/")}
    assert {p for p in tree(tmp_path / "other") if p.startswith("train/")} != same_split
    assert labels(tmp_path / "other") != labels(demo_root)


def test_rewrite_removes_stale_files_but_never_foreign_folders(params_factory, tmp_path):
    demo = params_factory({"demo.image_size": 8}).demo
    write_demo(tmp_path / "demo", demo, seed=0)
    stale = tmp_path / "demo" / "test" / "query" / "stale.png"
    stale.write_bytes(b"old")
    write_demo(tmp_path / "demo", demo, seed=0)
    assert not stale.exists()

    foreign = tmp_path / "mine"
    (foreign / "train").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ClipcoreError, match="mine: exists and is not a demo data folder"):
        write_demo(foreign, demo, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"
