"""The crop stage on real photos: scikit-image's face photos (astronaut, camera) and faceless ones
(coffee, a cat), through facenet-pytorch's MTCNN (requirements-face.txt)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import FACELESS, FACES, REPO, photo, write_face_root, write_params
from PIL import Image

from clipcore import paths
from clipcore.crop.cropping import crop_all
from clipcore.crop.faces import crop_face, largest_faces, load_detector
from clipcore.data.manifests import prepare
from clipcore.report.crops import crop_section
from clipcore.report.page import Thumbnails

pytest.importorskip("skimage")
pytest.importorskip("facenet_pytorch")


@pytest.fixture(scope="module")
def detector():
    return load_detector()


def test_the_largest_face_of_real_photos_is_found_and_levelled(detector):
    images = [photo(name) for name in FACES]
    faces = largest_faces(detector, images)
    assert all(face is not None and face.score >= 0.9 for face in faces)
    for image, face in zip(images, faces):
        left, top, right, bottom = face.box
        assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
        crop = crop_face(image, face, margin=0.2)
        assert crop.width < image.width / 2 and crop.height < image.height / 2
        again = largest_faces(detector, [crop])[0]  # the crop still holds the face, eyes level
        assert again is not None and abs(again.angle) < abs(face.angle) + 1 and abs(again.angle) < 3
    wider = crop_face(images[0], faces[0], margin=0.5)
    assert wider.width > crop_face(images[0], faces[0], margin=0.2).width


def test_faceless_photos_are_kept_whole_and_listed(tmp_path, params_factory, detector):
    root = write_face_root(tmp_path / "faces")
    params = params_factory({"data.root": str(root), "data.crop": "face", "data.val_fraction": 0.0})
    prepare(root, tmp_path / "prepared", params.data, params.seed)
    report = crop_all(params.data, tmp_path / "prepared", tmp_path / "cropped", detector)
    assert report.faces == {"train": 4, "val": 0, "query": 2, "gallery": 2}
    assert report.whole == {"train": 4, "val": 0, "query": 2, "gallery": 2}
    table = pd.read_csv(tmp_path / "cropped" / paths.CROP_REPORT.name, dtype={"path": str})
    whole = table[table["face"] == 0]
    assert sorted({Path(p).name.split("_")[0] for p in whole["path"]}) == sorted(FACELESS)
    for path in whole["path"]:  # a faceless image is the original, byte for byte
        assert (tmp_path / "cropped" / path).read_bytes() == (root / path).read_bytes()
    for path in table[table["face"] == 1]["path"]:
        with Image.open(root / path) as original, Image.open(tmp_path / "cropped" / path) as crop:
            assert crop.width < original.width / 2
    assert "train 4/8" in report.summary()
    # The report's section: counts per split, the crops and the images kept whole as pictures.
    section = crop_section(tmp_path / "cropped" / paths.CROP_REPORT.name, tmp_path / "cropped",
                           Thumbnails)
    assert "<tr><td>train</td><td>4</td><td>4</td></tr>" in section
    assert section.count("<img") == 8 + 4 and section.count("data:image/") == 12
    assert crop_section(tmp_path / "absent.csv", tmp_path, Thumbnails) == ""


def test_crops_are_the_same_bytes_every_run(tmp_path, params_factory, detector):
    root = write_face_root(tmp_path / "faces")
    params = params_factory({"data.root": str(root), "data.crop": "face", "data.val_fraction": 0.0})
    prepare(root, tmp_path / "prepared", params.data, params.seed)
    outputs = []
    for run in ("a", "b"):
        crop_all(params.data, tmp_path / "prepared", tmp_path / run, detector)
        outputs.append({p.relative_to(tmp_path / run): p.read_bytes()
                        for p in sorted((tmp_path / run).rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 1 + 16


def test_crop_none_writes_an_empty_report_and_needs_no_detector(tmp_path, prepared_demo,
                                                                params_factory):
    root, prepared = prepared_demo
    params = params_factory({"data.root": str(root)})
    report = crop_all(params.data, prepared, tmp_path / "cropped", detector=None)
    assert sorted(p.name for p in (tmp_path / "cropped").iterdir()) == [paths.CROP_REPORT.name]
    assert pd.read_csv(tmp_path / "cropped" / paths.CROP_REPORT.name).empty
    assert "data.crop none" in report.summary()
    assert paths.image_root("none", root) == root and paths.image_root("face", root) == paths.CROPPED


def test_a_missing_detector_stops_the_stage_naming_the_requirements_file(tmp_path):
    root = write_face_root(tmp_path / "faces")
    write_params(tmp_path, {"data.root": str(root), "data.crop": "face"})
    (tmp_path / "data/prepared").mkdir(parents=True)
    # facenet_pytorch made unimportable, as where requirements-face.txt was never installed
    blocked = ("import sys, runpy; sys.modules['facenet_pytorch'] = None; "
               "runpy.run_module('stages.crop', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: data.crop face needs facenet-pytorch: pip install --no-deps -r "
        "requirements-face.txt"]
