"""prepare on small data roots made of real PNG and JPEG files: what it skips, what stops it,
the captions it writes, and how it splits train from val."""
from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcore.data.images import load_rgb
from clipcore.data.manifests import labels_by_name, prepare, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.train.resume import check_compatible, run_settings


def image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 255 - shade, 0)).save(path)


def make_root(base: Path, classes: dict[str, int], query=("q0.png", "q1.jpg"),
              gallery=("g0.png", "g1.png")) -> Path:
    """train/<class>/ with n images each, plus test/query and test/gallery files."""
    root = base / "data"
    for name, n in classes.items():
        for i in range(n):
            image(root / "train" / name / f"{name}_{i}.png", shade=i)
    for split, files in (("query", query), ("gallery", gallery)):
        for file in files:
            image(root / "test" / split / file)
    return root


def write_labels(root: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["split,file,label"] + [",".join(row) for row in rows]
    (root / "test_labels.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def data(params_factory):
    return params_factory({"data.val_fraction": 0.0}).data


def run(root: Path, data, seed: int = 0):
    out = root.parent / "prepared"
    return out, prepare(root, out, data, seed)


def test_unreadable_files_are_listed_and_junk_is_ignored(tmp_path, data, capsys):
    root = make_root(tmp_path, {"cat": 2, "dog": 2})
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "train" / "dog" / "notes.jpg").write_text("not a picture")
    (root / "test" / "gallery" / "scan.pdf").write_bytes(b"%PDF-1.4")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "test" / "query" / "._q0.png").write_bytes(b"\0\5\26\7")
    image(root / "train" / "__MACOSX" / "cat" / "._cat_0.png")
    image(root / "test" / "gallery" / ".cache" / "g9.png")
    image(root / "train" / "stray.png")

    out, report = run(root, data)
    expected = ["test/gallery/scan.pdf", "train/cat/broken.png", "train/dog/notes.jpg",
                "train/stray.png"]
    assert sorted(path for path, _ in report.skipped) == expected
    skipped = read_manifest(out, "skipped")
    assert sorted(skipped["path"]) == expected
    assert all(skipped["reason"])
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"warning: skipped 4 files that are not usable images, listed in {out / 'skipped.csv'}"
    assert list(read_manifest(out, "train")["path"]) == [
        "train/cat/cat_0.png", "train/cat/cat_1.png", "train/dog/dog_0.png", "train/dog/dog_1.png"]
    assert list(read_manifest(out, "query")["path"]) == ["test/query/q0.png", "test/query/q1.jpg"]
    assert list(read_manifest(out, "gallery")["path"]) == ["test/gallery/g0.png",
                                                           "test/gallery/g1.png"]
    assert report.counts == {"train": 4, "val": 0, "query": 2, "gallery": 2}


def test_clean_root_writes_an_empty_skipped_list_and_no_warning(tmp_path, data, capsys):
    out, report = run(make_root(tmp_path, {"cat": 1, "dog": 1}), data)
    assert report.skipped == [] and len(read_manifest(out, "skipped")) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("remove", ["", "train", "test/query", "test/gallery"])
def test_missing_folder_is_named(tmp_path, data, remove):
    root = make_root(tmp_path, {"cat": 1})
    missing = root / remove if remove else root
    shutil.rmtree(missing)
    with pytest.raises(ClipcoreError, match=f"^{missing}: folder not found"):
        run(root, data)


@pytest.mark.parametrize("fill", [None, "broken.png"], ids=["empty", "only-unreadable"])
def test_class_folder_without_a_readable_image_is_named(tmp_path, data, fill):
    root = make_root(tmp_path, {"cat": 1})
    (root / "train" / "dog").mkdir()
    if fill:
        (root / "train" / "dog" / fill).write_bytes(b"garbage")
    with pytest.raises(ClipcoreError, match=f"{root / 'train' / 'dog'}: class folder holds no"):
        run(root, data)


@pytest.mark.parametrize("clash, first", [("test/gallery/q0.png", "test/query/q0.png"),
                                          ("test/query/nested/q1.jpg", "test/query/q1.jpg")])
def test_duplicate_test_file_names_are_an_error(tmp_path, data, clash, first):
    root = make_root(tmp_path, {"cat": 1})
    image(root / clash)
    with pytest.raises(ClipcoreError, match="same file name as") as caught:
        run(root, data)
    assert clash in str(caught.value) and first in str(caught.value)


def test_empty_query_folder_is_an_error(tmp_path, data):
    root = make_root(tmp_path, {"cat": 1}, query=())
    (root / "test" / "query").mkdir()
    with pytest.raises(ClipcoreError, match="test/query: no readable images"):
        run(root, data)


def test_known_test_labels_reach_the_manifests(tmp_path, data):
    root = make_root(tmp_path, {"cat": 1, "dog": 1})
    write_labels(root, [("query", "q0.png", "cat"), ("query", "q1.jpg", "dog"),
                        ("gallery", "g0.png", "dog"), ("gallery", "g1.png", "cat")])
    out, report = run(root, data)
    assert report.labelled
    assert labels_by_name(read_manifest(out, "query")) == {"q0.png": "cat", "q1.jpg": "dog"}
    assert list(read_manifest(out, "gallery")["caption"]) == ["", ""]


def test_an_unreadable_test_file_without_a_label_is_skipped_not_an_error(tmp_path, data):
    """Before, a text file in test/query stopped prepare ("lacks labels") when labels exist."""
    root = make_root(tmp_path, {"cat": 1, "dog": 1})
    (root / "test/query/notes.txt").write_text("not an image")
    write_labels(root, [("query", "q0.png", "cat"), ("query", "q1.jpg", "dog"),
                        ("gallery", "g0.png", "dog"), ("gallery", "g1.png", "cat")])
    out, report = run(root, data)
    assert report.labelled and report.skipped == [("test/query/notes.txt",
                                                   "not an image file suffix (.txt)")]
    assert labels_by_name(read_manifest(out, "query")) == {"q0.png": "cat", "q1.jpg": "dog"}


def test_without_a_labels_file_test_labels_are_unknown(tmp_path, data):
    out, report = run(make_root(tmp_path, {"cat": 1}), data)
    assert not report.labelled
    assert labels_by_name(read_manifest(out, "query")) is None


@pytest.mark.parametrize("rows, problem", [
    ([("query", "q0.png", "cat"), ("query", "q1.jpg", "cat"), ("gallery", "g0.png", "cat"),
      ("gallery", "g1.png", "cat"), ("gallery", "lost.png", "cat")],
     "names unknown test file gallery/lost.png"),
    ([("query", "q0.png", "cat"), ("gallery", "g0.png", "cat")],
     "lacks labels for gallery/g1.png and 1 more"),
], ids=["unknown-file", "missing-files"])
def test_labels_file_must_match_the_test_files(tmp_path, data, rows, problem):
    root = make_root(tmp_path, {"cat": 1})
    write_labels(root, rows)
    with pytest.raises(ClipcoreError, match=f"test_labels.csv: {problem}"):
        run(root, data)


def test_captions_for_numeric_and_named_classes(tmp_path, data):
    root = make_root(tmp_path, {"007": 1, "golden_retriever": 1})
    out, _ = run(root, data)
    train = read_manifest(out, "train")
    assert dict(zip(train["label"], train["caption"])) == {
        "007": "a photo of class number 007", "golden_retriever": "a photo of a golden retriever"}


def test_image_split_is_stratified(prepared_demo, params_factory):
    _, prepared = prepared_demo
    fraction = params_factory().data.val_fraction
    train = Counter(read_manifest(prepared, "train")["label"])
    val = Counter(read_manifest(prepared, "val")["label"])
    assert set(val) == set(train) == {str(d) for d in range(10)}
    for label in train:
        assert val[label] / (train[label] + val[label]) == pytest.approx(fraction, abs=0.01)


def test_image_split_of_many_small_classes_keeps_the_overall_fraction(tmp_path, params_factory):
    """40 classes of 5 (like the competition's identities) and a class of one image."""
    root = make_root(tmp_path, {**{f"{c:03d}": 5 for c in range(40)}, "solo": 1})
    out, report = run(root, params_factory({"data.val_fraction": 0.15}).data)
    train = Counter(read_manifest(out, "train")["label"])
    val = Counter(read_manifest(out, "val")["label"])
    assert report.counts["val"] == round(0.15 * 200)
    assert set(train) == {f"{c:03d}" for c in range(40)} | {"solo"}
    assert max(val.values()) == 1 and "solo" not in val


def test_split_is_deterministic_per_seed(tmp_path, params_factory):
    root = make_root(tmp_path, {name: 10 for name in "abcdef"})
    data = params_factory({"data.val_fraction": 0.3}).data
    out, _ = run(root, data, seed=1)
    first = (out / "val.csv").read_bytes()
    assert run(root, data, seed=1)[0].joinpath("val.csv").read_bytes() == first
    assert run(root, data, seed=2)[0].joinpath("val.csv").read_bytes() != first


def test_class_split_holds_out_whole_classes(tmp_path, params_factory):
    root = make_root(tmp_path, {name: 3 for name in "abcdefghij"})
    out, report = run(root, params_factory({"data.val_split": "class",
                                            "data.val_fraction": 0.3}).data)
    train = set(read_manifest(out, "train")["label"])
    val = set(read_manifest(out, "val")["label"])
    assert not train & val and train | val == set("abcdefghij")
    assert len(val) == 3 and report.classes == {"train": 7, "val": 3}


def test_class_split_needs_two_classes_each_side(tmp_path, params_factory):
    root = make_root(tmp_path, {name: 3 for name in "abc"})
    with pytest.raises(ClipcoreError, match="'data.val_split' class needs at least 4"):
        run(root, params_factory({"data.val_split": "class", "data.val_fraction": 0.1}).data)


def test_zero_val_fraction_writes_a_header_only_val(tmp_path, data):
    out, _ = run(make_root(tmp_path, {"cat": 3, "dog": 3}), data)
    assert (out / "val.csv").read_text() == "path,label,caption,sha256\n"
    assert len(read_manifest(out, "train")) == 6


def test_missing_manifest_says_to_run_prepare(tmp_path):
    with pytest.raises(ClipcoreError, match=r"train.csv: manifest not found \(run `dvc repro"):
        read_manifest(tmp_path, "train")


def test_progress_bar_counts_every_image(tmp_path, data, capsys):
    """Before, the bar stopped at 5/6: it looked like a skipped image."""
    run(make_root(tmp_path, {"cat": 1, "dog": 1}), data)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "checking images" in last and "6/6" in last


@pytest.mark.parametrize("split", ["query", "gallery"])
@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_an_unreadable_test_image_stops_prepare_naming_it(tmp_path, data, split, labelled):
    """The server ranks every query against every gallery image: before, a broken one was
    skipped with a warning and every submission failed later ("missing 1 of 8 queries")."""
    root = make_root(tmp_path, {"cat": 1, "dog": 1})
    broken = root / "test" / split / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "test" / split / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    if labelled:
        write_labels(root, [("query", "q0.png", "cat"), ("query", "q1.jpg", "dog"),
                            ("gallery", "g0.png", "dog"), ("gallery", "g1.png", "cat"),
                            (split, "broken.png", "cat"), (split, "cut.jpg", "dog")])
    with pytest.raises(ClipcoreError) as caught:
        run(root, data)
    message = str(caught.value)
    assert message.startswith(f"{root}/test/{split}/broken.png: cannot read a {split} image (")
    assert message.endswith(" and 1 more; the server ranks every query against every gallery "
                            "image: replace them with readable copies")
    assert "\n" not in message and not (root.parent / "prepared").exists()


def test_a_labelled_test_file_that_is_no_image_stops_prepare(tmp_path, data):
    root = make_root(tmp_path, {"cat": 1, "dog": 1})
    (root / "test/query/q2.heic").write_bytes(b"\0\0\0\x18ftypheic")  # no decoder for it
    write_labels(root, [("query", "q0.png", "cat"), ("query", "q1.jpg", "dog"),
                        ("query", "q2.heic", "cat"),
                        ("gallery", "g0.png", "dog"), ("gallery", "g1.png", "cat")])
    with pytest.raises(ClipcoreError, match=r"test/query/q2\.heic: cannot read a query image \("
                                            r"not an image file suffix \(\.heic\)\); the server"):
        run(root, data)


def test_an_unreadable_training_image_is_still_skipped(tmp_path, data):
    root = make_root(tmp_path, {"cat": 2, "dog": 1})
    (root / "train" / "cat" / "cat_1.png").write_bytes(b"garbage")
    out, report = run(root, data)
    assert [path for path, _ in report.skipped] == ["train/cat/cat_1.png"]
    assert len(read_manifest(out, "train")) == 2


@pytest.mark.parametrize("where", ["train/cat/caf\xe9.png", "train/caf\xe9/a.png",
                                   "test/query/caf\xe9.png"], ids=["file", "folder", "query"])
def test_a_file_name_that_is_not_utf8_is_named(tmp_path, data, where):
    """Before: a UnicodeEncodeError traceback while writing the manifests, naming no file."""
    root = make_root(tmp_path, {"cat": 1})
    raw = os.fsencode(root) + b"/" + where.encode("latin-1")  # é as one byte: not UTF-8
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as f:
        Image.new("RGB", (8, 8)).save(f, format="PNG")
    with pytest.raises(ClipcoreError) as caught:
        run(root, data)
    message, shown = str(caught.value), where.replace("\xe9", r"\xe9")
    assert message == (f"{root}/{shown}: file or folder name is not "
                       f"UTF-8; rename it (the manifests and results hold names as UTF-8)")
    message.encode("utf-8")  # printable as the stage's error line


def test_16_bit_greyscale_keeps_its_tones(tmp_path, data):
    """PIL's convert("RGB") clips 16-bit values at 255: a 16-bit PNG came out as 0 and 255 only."""
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    root = make_root(tmp_path, {"cat": 1})
    for path in (root / "train/cat/deep.png", root / "test/query/deep.tif"):
        Image.fromarray(ramp).save(path)  # mode I;16: 16 bits per pixel
        with Image.open(path) as written:
            assert written.mode == "I;16"
        rgb = np.asarray(load_rgb(path))
        assert rgb.shape == (16, 16, 3)
        assert (rgb[..., 0] == np.arange(256).reshape(16, 16)).all()  # 257 v >> 8 == v
    out, report = run(root, data)
    assert report.skipped == [] and "train/cat/deep.png" in list(read_manifest(out, "train")["path"])


def test_manifests_hold_each_files_sha256(tmp_path, data):
    root = make_root(tmp_path, {"cat": 1})
    out, _ = run(root, data)
    for split in ("train", "query", "gallery"):
        for path, digest in zip(*read_manifest(out, split)[["path", "sha256"]].T.values):
            assert digest == hashlib.sha256((root / path).read_bytes()).hexdigest()


def test_changed_pixels_under_the_same_names_stop_a_resume_naming_them(tmp_path, params_factory):
    """Before, the run signature hashed the manifests' names and labels only: a training image
    changed in place resumed silently, mixing two data sets in one model."""
    root = make_root(tmp_path, {"cat": 2, "dog": 2})
    params = params_factory({"data.val_fraction": 0.0})
    out, _ = run(root, params.data)
    stored = {"path": Path("weights_epoch_1.pth"), "base": {},
              "signature": run_settings(params, out)}
    image(root / "train" / "dog" / "dog_1.png", shade=99)  # same name, other pixels
    run(root, params.data)
    with pytest.raises(ClipcoreError) as caught:
        check_compatible(stored, {}, run_settings(params, out))
    assert str(caught.value).startswith(
        "weights_epoch_1.pth: made with other data.content (the bytes of training or val images "
        "changed); set train.resume false to start over")
    image(root / "test" / "query" / "q0.png", shade=99)  # test images: no part of training
    image(root / "train" / "dog" / "dog_1.png", shade=1)  # back as it was
    run(root, params.data)
    check_compatible(stored, {}, run_settings(params, out))


def test_a_linked_class_folder_is_read(tmp_path, data, capsys):
    """Before: `train/dog -> elsewhere` was reported as a class folder holding no readable image
    (Path.rglob does not enter linked folders). A link to a folder above ends, not loops."""
    root = make_root(tmp_path, {"cat": 2, "dog": 2})
    shutil.move(root / "train/dog", tmp_path / "dog_photos")
    (root / "train/dog").symlink_to(tmp_path / "dog_photos", target_is_directory=True)
    (root / "train/cat/again").symlink_to(root / "train", target_is_directory=True)
    out, report = run(root, data)
    train = read_manifest(out, "train")
    assert sorted(train["path"]) == ["train/cat/cat_0.png", "train/cat/cat_1.png",
                                     "train/dog/dog_0.png", "train/dog/dog_1.png"]
    assert report.skipped == []
    # DVC (3.67) hashes data.root without entering the linked folder: said once.
    assert (f"warning: {root / 'train/cat/again'} is a link to a folder (and 1 more): prepare "
            f"reads it, but DVC does not look inside linked folders") in capsys.readouterr().err


def test_composed_and_decomposed_forms_of_a_name_are_one_name(tmp_path, data):
    """Before: "café.png" stored decomposed (e + U+0301, as macOS writes it) and typed composed
    in test_labels.csv stopped prepare: "names unknown test file query/café.png"."""
    decomposed, composed = "cafe\u0301.png", "caf\u00e9.png"
    root = make_root(tmp_path, {"cat": 1, "dog": 1}, query=(decomposed, "q1.jpg"))
    write_labels(root, [("query", composed, "cat"), ("query", "q1.jpg", "dog"),
                        ("gallery", "g0.png", "dog"), ("gallery", "g1.png", "cat")])
    out, report = run(root, data)
    assert report.labelled
    assert labels_by_name(read_manifest(out, "query")) == {decomposed: "cat", "q1.jpg": "dog"}
    (root / "test_labels.csv").unlink()
    image(root / "test/gallery" / composed)  # looks the same as the query's name: refused
    with pytest.raises(ClipcoreError, match="same file name as test/query/"):
        run(root, data)


def test_exif_orientation_is_honoured(tmp_path, data):
    """A phone's photo: pixels stored sideways, an EXIF Orientation tag saying how to turn them.
    Before, the tag was ignored: training, embedding and the pictures saw the photo sideways."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)
    with Image.open(path) as written:
        assert written.getexif()[0x0112] == 6 and written.size == (40, 20)
    upright = np.asarray(load_rgb(path)).astype(int)
    assert upright.shape == (40, 20, 3)  # 20 wide, 40 high
    assert (abs(upright[5, 10] - (255, 0, 0)) < 40).all()  # red on top
    assert (abs(upright[35, 10] - (0, 0, 255)) < 40).all()  # blue below
