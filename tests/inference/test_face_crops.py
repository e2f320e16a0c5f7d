"""A model trained on face crops (data.crop face) crops its queries and gallery images the same
way at inference: on real photos from scikit-image (astronaut, camera: faces; coffee, a cat:
none, kept whole), a tiny model trained through the crop stage, indexed and queried on the
original images, ranks as the retrieve stage ranked the crops."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys

import numpy as np
import pytest
from conftest import REPO, write_face_root
from PIL import Image

from clipcore import paths
from clipcore.crop.cropping import crop_all
from clipcore.crop.faces import load_detector
from clipcore.data.images import load_rgb
from clipcore.data.manifests import prepare, read_manifest
from clipcore.errors import ClipcoreError
from clipcore.inference.face_crops import ImageCrop
from clipcore.inference.gallery_index import build_index
from clipcore.inference.loading import load_trained
from clipcore.model.checkpoint import load_file, save_atomic
from clipcore.report.best import write_best
from clipcore.retrieve.embedding import embed_all
from clipcore.retrieve.retrieval import retrieve_all
from clipcore.train.training import train

pytest.importorskip("skimage")
pytest.importorskip("facenet_pytorch")

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.lr": 1e-2, "train.epochs": 1, "embed.num_workers": 0, "retrieve.top_k": 3,
        "data.val_fraction": 0.0, "data.crop": "face", "data.crop_margin": 0.3}
RECORD = {"crop": "face", "crop_margin": 0.3}


@pytest.fixture(scope="module")
def run(tmp_path_factory, params_factory):
    folder = tmp_path_factory.mktemp("face_run")
    root = write_face_root(folder / "faces")
    for png in sorted((root / "test" / "gallery").glob("*.png")):  # JPEG crops are re-encoded
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    params = params_factory({**TINY, "data.root": str(root)})
    with contextlib.chdir(folder):
        prepare(root, paths.PREPARED, params.data, params.seed)
        crop_all(params.data, paths.PREPARED, paths.CROPPED, load_detector())
        train(params, paths.CROPPED, paths.PREPARED)
        embed_all(params, paths.CROPPED, paths.PREPARED)
        retrieve_all(params.retrieve, paths.CROPPED, paths.PREPARED)
        write_best(params, paths.PREPARED)
    queries = sorted((root / "test" / "query").iterdir())
    return folder, root, load_trained(folder / paths.BEST, "cpu"), queries


def whole(trained):
    return dataclasses.replace(trained, crop=ImageCrop("none", 0.0, "test"))


def test_index_and_query_on_the_originals_rank_as_retrieve_ranked_the_crops(run):
    folder, root, trained, queries = run
    assert (trained.crop.crop, trained.crop.margin) == ("face", 0.3)
    assert "face crops (data.crop face, margin 0.3" in trained.crop.describe()
    index = build_index(trained, root / "test" / "gallery", folder / "index")
    assert index.manifest["crop"] == RECORD
    indices, _ = index.search(trained.embed_files(queries))
    ours = {q.name: [index.names[i] for i in row] for q, row in zip(queries, indices)}
    assert ours == json.loads((folder / paths.BEST_RESULTS).read_text())
    # Pixel for pixel the crop stage's files, JPEG re-encoding included; a face-free photo whole.
    cropped = [folder / paths.CROPPED / p for p in read_manifest(folder / paths.PREPARED, "gallery")["path"]]
    np.testing.assert_allclose(index.embeddings, whole(trained).embed_files(cropped), atol=1e-5)
    ours, originals = trained.embed_files(queries), whole(trained).embed_files(queries)
    faceless = [i for i, q in enumerate(queries) if q.name.startswith(("coffee", "chelsea"))]
    faces = [i for i in range(len(queries)) if i not in faceless]
    np.testing.assert_allclose(ours[faceless], originals[faceless], atol=1e-5)
    assert np.abs(ours[faces] - originals[faces]).max() > 1e-2  # the faces were cropped


def test_uploads_are_cropped_as_files_are(run):
    _, _, trained, queries = run  # PNG queries: an upload is cropped without re-encoding
    np.testing.assert_allclose(trained.embed_images([load_rgb(q) for q in queries]),
                               trained.embed_files(queries), atol=1e-5)


def test_an_index_refuses_queries_cropped_otherwise(run, tmp_path):
    _, root, trained, _ = run
    index = build_index(whole(trained), root / "test" / "gallery", tmp_path / "index")
    with pytest.raises(ClipcoreError, match="indexed with .*'none'.*rebuild the index"):
        index.check_model(trained)


def test_the_setting_is_read_from_the_model_file_else_the_summary_else_params(run, tmp_path):
    folder, _, _, _ = run
    best = load_file(folder / paths.BEST_MODEL)
    assert best["crop"] == RECORD == load_file(folder / paths.model_path(1))["crop"]
    old = {k: v for k, v in best.items() if k != "crop"}  # a file from before the record
    save_atomic(old, tmp_path / "model.pt")
    summary = json.loads((folder / paths.BEST_SUMMARY).read_text())
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    crop = load_trained(tmp_path / "model.pt", "cpu").crop
    assert (crop.crop, crop.margin, crop.source) == ("face", 0.3, str(tmp_path / "summary.json"))
    for key in ("crop", "crop_margin"):  # a summary from before the crop stage: whole images
        del summary["params"]["data"][key]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert load_trained(tmp_path / "model.pt", "cpu").crop.crop == "none"
    (tmp_path / "summary.json").unlink()
    params = (REPO / "tests" / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("crop: none", "crop: face")
                                          .replace("crop_margin: 0.2", "crop_margin: 0.5"))
    crop = load_trained(tmp_path / "model.pt", "cpu", tmp_path / "params.yaml").crop
    assert (crop.crop, crop.margin) == ("face", 0.5)


def test_without_the_face_extra_loading_stops_with_one_line(run, monkeypatch):
    folder, _, _, _ = run
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # `import` fails as when not installed
    with pytest.raises(ClipcoreError, match=r"trained on face crops .*requirements-face\.txt") as err:
        load_trained(folder / paths.BEST, "cpu")
    assert "\n" not in str(err.value)


def test_the_onnx_export_records_the_crop_and_embeds_as_torch(run, tmp_path):
    pytest.importorskip("onnxruntime")
    from clipcore.inference.onnx_export import export_onnx, onnx_embeddings
    _, _, trained, queries = run
    assert export_onnx(trained, tmp_path / "model.onnx")["face_crop"] == RECORD
    theirs = onnx_embeddings(tmp_path / "model.onnx", trained.model, queries, crop=trained.crop)
    assert (theirs * trained.embed_files(queries)).sum(axis=1).min() >= 0.9999
