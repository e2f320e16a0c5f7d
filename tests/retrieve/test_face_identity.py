"""The face-identity member (dlib's 128-d descriptor, requirements-face-id.txt) on scikit-image's
real face photos: a face found and described deterministically, the same face nearer than
another, a faceless image described whole and counted, the member in python -m clipcore.fuse,
and without dlib one line naming the requirements file."""
from __future__ import annotations

import contextlib
import functools
import os
import json
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_params
from PIL import Image

from clipcore import fuse, paths
from clipcore.model.checkpoint import save_model
from clipcore.model.factory import build_model
from clipcore.ranking.search import top_k

skdata = pytest.importorskip("skimage.data")
TINY = {"model.name": "tiny", "model.pretrained": "none", "embed.num_workers": 0}
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def face_identity():
    pytest.importorskip("dlib")
    from clipcore.retrieve import face_identity
    return face_identity


@pytest.fixture(scope="module")
def identity(face_identity):
    return face_identity.FaceIdentity()


@functools.cache
def lfw(index: int) -> Image.Image:
    """lfw_subset's image `index`: 0-99 are LFW faces (25 x 25 px), 100-199 non-face patches."""
    return Image.fromarray(np.uint8(np.round(skdata.lfw_subset()[index] * 255))).convert("RGB")


def mirrored(image: Image.Image, scale: float) -> Image.Image:
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return flipped.resize((round(image.width * scale), round(image.height * scale)),
                          Image.Resampling.BICUBIC)


def saved(folder: Path, images: dict[str, Image.Image]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


def test_the_astronauts_face_is_found_and_described_as_a_unit_128_d_vector(tmp_path, face_identity,
                                                                            identity):
    astronaut = Image.fromarray(skdata.astronaut())
    files = saved(tmp_path, {"astronaut.png": astronaut, "lfw.png": lfw(0)})
    first = face_identity.face_descriptors(files, identity=identity)
    again = face_identity.face_descriptors(files[:1], identity=identity)
    assert first.vectors.shape == (2, 128) and first.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first.vectors, axis=1), 1, atol=1e-5)
    assert first.found.tolist() == [True, True] and first.whole == 0  # 25 px: found upsampled
    assert np.array_equal(again.vectors[0], first.vectors[0])  # deterministic, batch or not
    box = identity.largest_face(np.asarray(astronaut))
    assert 150 < box.center().x < 300 and 60 < box.center().y < 200  # her face, not her badge


def test_the_same_face_is_nearer_than_another_face(tmp_path, face_identity, identity):
    astronaut = Image.fromarray(skdata.astronaut())
    files = saved(tmp_path, {"astronaut.png": astronaut, "copy.png": mirrored(astronaut, 0.8),
                             "lfw.png": lfw(0), "lfw_copy.png": mirrored(lfw(0), 1.2),
                             "other.png": lfw(1)})
    described = face_identity.face_descriptors(files, identity=identity)
    similarity = described.vectors @ described.vectors.T
    assert described.found.all()
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 4])  # astronaut vs copy
    assert similarity[2, 3] > max(similarity[2, 0], similarity[2, 4])  # an LFW face vs its copy


def test_a_faceless_image_is_described_whole_and_counted(tmp_path, face_identity, identity):
    files = saved(tmp_path, {"face.png": lfw(3), "patch.png": lfw(150),
                             "coffee.png": Image.fromarray(skdata.coffee())})
    described = face_identity.face_descriptors(files, identity=identity)
    assert described.found.tolist() == [True, False, False] and described.whole == 2
    np.testing.assert_allclose(np.linalg.norm(described.vectors, axis=1), 1, atol=1e-5)


def face_project(folder: Path) -> Path:
    """A project whose manifests hold LFW faces, one class each: val 4 faces and their mirrored,
    rescaled copies, the queries 8 other faces, the gallery their copies; returns the root."""
    root, rows = folder / "faces", []
    for n in range(12):
        split, copies = ("val", "val") if n < 4 else ("query", "gallery")
        saved(root / split, {f"{n}.png": lfw(n)})
        saved(root / copies, {f"{n}_copy.png": mirrored(lfw(n), 1.2)})
        rows += [(split, f"{split}/{n}.png", str(n)), (copies, f"{copies}/{n}_copy.png", str(n))]
    table = pd.DataFrame(rows, columns=["split", "path", "label"]).assign(caption="", sha256="")
    (folder / paths.PREPARED).mkdir(parents=True)
    for split, frame in table.groupby("split"):
        frame.drop(columns="split").to_csv(folder / paths.PREPARED / f"{split}.csv", index=False)
    write_params(folder, {**TINY, "data.root": str(root)})
    return root


def test_fuse_with_face_id_at_weight_1_ranks_as_its_descriptors_alone(tmp_path, face_identity,
                                                                       capsys):
    root = face_project(tmp_path)
    with contextlib.chdir(tmp_path):
        torch.manual_seed(0)
        save_model(build_model(fuse.load_params().model), Path("m0.pt"), backbone_trained=True,
                   epoch=0)
        fuse.main(["--models", "m0.pt", "face-id", "--weights", "0", "1", "--out", "alone.json"])
        frames = {s: pd.read_csv(paths.PREPARED / f"{s}.csv", dtype=str)
                  for s in ("val", "query", "gallery")}
    files = [root / p for s in ("val", "query", "gallery") for p in frames[s]["path"]]
    vectors = face_identity.face_descriptors(files).vectors[len(frames["val"]):]
    ranked = top_k(*np.split(vectors, [len(frames["query"])]), 8)
    names = [PurePosixPath(p).name for p in frames["gallery"]["path"]]
    expected = {PurePosixPath(q).name: [names[i] for i in row]
                for q, row in zip(frames["query"]["path"], ranked)}
    assert json.loads((tmp_path / "alone.json").read_text()) == expected
    assert sum(r[0] == f"{q[:-4]}_copy.png" for q, r in expected.items()) >= 7  # its own face
    printed = capsys.readouterr().out
    assert "face-id: no face found in" in printed and "fusion weights 0, 1" in printed


def test_without_dlib_fuse_stops_with_one_line_naming_the_requirements_file(tmp_path):
    face_project(tmp_path)
    blocked = ("import runpy, sys; sys.modules['dlib'] = None; "
               "sys.argv = ['fuse', '--models', 'face-id']; "
               "runpy.run_module('clipcore.fuse', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: the face-id member needs dlib and its models: pip install --no-deps -r "
        "requirements-face-id.txt"]
