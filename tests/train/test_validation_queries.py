"""data.val_queries: validation drawn as the competition's test is (photo queries against a render
gallery, told apart by file name), on a generated domain with the tiny model; the empty default
keeps the mixed protocol number for number; a pattern that leaves no query or no gallery stops
the run before any work."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from conftest import default_params_dict, with_overrides

from clipcore.data.manifests import prepare, read_manifest
from clipcore.demo.domain import rendering_of, write_domain
from clipcore.errors import ClipcoreError
from clipcore.params import ParamsError, parse_params
from clipcore.ranking.measures import retrieval_metrics
from clipcore.ranking.search import top_k
from clipcore.train.resume import check_compatible, run_settings
from clipcore.train.training import Trainer, train
from clipcore.train.validation import query_rows, validation_metrics

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.epochs": 1, "train.lr": 1e-2, "train.batch_size": 16}
IDENTITIES = range(8)  # 5 images each: photo_0, render_1, photo_2, render_3, photo_4
PHOTOS = {"data.val_queries": "photo_*"}


def prepared_domain(base: Path, params) -> tuple[Path, Path]:
    root = base / "data"
    write_domain(root, IDENTITIES, [0, 1], seed=5, queries=1, gallery=1, size=32)
    prepared = base / "prepared"
    prepare(root, prepared, params.data, params.seed)
    return root, prepared


@pytest.fixture(scope="module")
def class_split(tmp_path_factory, params_factory):
    """The domain with 2 of its 8 identities held out whole (class split)."""
    params = params_factory({**TINY, "data.val_split": "class", "data.val_fraction": 0.25})
    return prepared_domain(tmp_path_factory.mktemp("class_split"), params)


@pytest.fixture(scope="module")
def image_split(tmp_path_factory, params_factory):
    """The domain with about 0.4 of every identity's images held out (image split)."""
    params = params_factory({**TINY, "data.val_split": "image", "data.val_fraction": 0.4})
    return prepared_domain(tmp_path_factory.mktemp("image_split"), params)


def run(folder: Path, params, data) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(folder):
        return train(params, *data)


def photos_of(paths) -> np.ndarray:
    """The photos, told by clipcore.demo.domain's own reading of a name (not the pattern)."""
    return np.array([rendering_of(str(path)) == "photo" for path in paths])


# The validation protocol before data.val_queries, verbatim: the empty default must give its
# numbers exactly.
def mixed_protocol(val, val_labels, k, train=None, train_labels=None) -> dict:
    val_labels = np.asarray(val_labels)
    gallery, gallery_labels = val, val_labels
    if (train is not None and len(train_labels)
            and np.isin(val_labels, train_labels).any()):
        gallery = np.concatenate([val, train])
        gallery_labels = np.concatenate([val_labels, np.asarray(train_labels)])
    classes, counts = np.unique(gallery_labels, return_counts=True)
    positives = counts[np.searchsorted(classes, val_labels)] - 1
    matched = positives > 0
    result = {"val_queries": int(matched.sum()), "val_unmatched": int((~matched).sum())}
    if not matched.any():
        return result
    ranks = min(max(k, 10), len(gallery) - 1)
    found = top_k(val, gallery, ranks, metric="cosine", exclude_self=True)[matched]
    result.update(retrieval_metrics(val_labels[matched], gallery_labels[found],
                                    n_relevant=positives[matched], k=k))
    return result


# (a) A run under the class split with photo queries.

def test_class_split_photo_queries_each_find_a_render_of_their_identity(
        class_split, tmp_path, params_factory):
    _, prepared = class_split
    val = read_manifest(prepared, "val")
    photos = photos_of(val["path"])
    assert val["label"].nunique() == 2 and photos.sum() == 6 and (~photos).sum() == 4
    params = params_factory({**TINY, **PHOTOS, "data.val_split": "class",
                             "data.val_fraction": 0.25})
    history = run(tmp_path / "run", params, class_split)
    assert [row["epoch"] for row in history] == [0, 1]
    # Only the held-out photos query; each held-out identity has renders: none is unmatched.
    assert all(row["val_queries"] == photos.sum() and row["val_unmatched"] == 0
               for row in history)
    assert all(0 <= row["score"] <= 1000 for row in history)


# (b) A photo query whose nearest image is another identity's photo, and nearest render its own.

def test_photo_queries_against_renders_find_what_the_mixed_protocol_misses():
    # Dimensions: photo, render (the rendering dominates) and each identity's own direction.
    names = ["photo_0.png", "photo_1.png", "render_2.png", "render_3.png"]
    labels = np.array(["A", "B", "A", "B"])
    vectors = np.array([[1, 0, 0.3, 0],     # photo of A: nearest overall the photo of B (cos 1)
                        [1, 0, 0, 0.3],     # photo of B
                        [0, 1, 0.3, 0],     # render of A: the nearest render to A's photo
                        [0, 1, 0, 0.3]], dtype=np.float32)
    mask = query_rows(names, "photo_*")
    assert mask.tolist() == [True, True, False, False]
    with_mask = validation_metrics(vectors, labels, 1, query_mask=mask)
    assert with_mask["top1"] == 1.0 and with_mask["score"] == 1000.0
    assert with_mask["val_queries"] == 2 and with_mask["val_unmatched"] == 0
    # Mixed: every image's nearest is the other identity in its own rendering.
    assert validation_metrics(vectors, labels, 1)["top1"] == 0.0


def test_training_photos_stay_out_of_the_gallery():
    """Image split: a training photo of B next to A's photo query would be its top-1 in the
    gallery; the render of A in the training images is."""
    val, val_labels = np.array([[1, 0, 0.3, 0], [0, 1, 0, 0.3]], np.float32), np.array(["A", "B"])
    train = np.array([[1, 0, 0, 0.3], [0, 1, 0.3, 0]], np.float32)
    train_labels = np.array(["B", "A"])
    queries = query_rows(["photo_0.png", "render_1.png"], "photo_*")
    train_queries = query_rows(["photo_2.png", "render_3.png"], "photo_*")
    measures = validation_metrics(val, val_labels, 1, train, train_labels, queries, train_queries)
    assert measures["top1"] == 1.0 and measures["val_queries"] == 1
    with_train_photos = validation_metrics(val, val_labels, 1, train, train_labels, queries)
    assert with_train_photos["top1"] == 0.0


def test_a_query_whose_identity_has_no_render_is_unmatched():
    vectors = np.eye(4, dtype=np.float32)
    labels = np.array(["A", "lonely", "A", "B"])
    mask = query_rows(["photo_0.png", "photo_1.png", "render_2.png", "render_3.png"], "photo_*")
    measures = validation_metrics(vectors, labels, 10, query_mask=mask)
    assert (measures["val_queries"], measures["val_unmatched"], measures["queries"]) == (1, 1, 1)
    assert measures["score"] == 1000.0


# (c) The empty default: the mixed protocol, number for number.

@pytest.mark.parametrize("shape", ["train joins", "class split", "val alone", "lonely"])
def test_no_mask_gives_the_mixed_protocol_numbers(shape):
    rng = np.random.default_rng(3)
    val_labels = rng.integers(0, 6, 30)
    train_labels = {"train joins": rng.integers(0, 6, 50), "class split": rng.integers(6, 12, 50),
                    "val alone": None, "lonely": rng.integers(0, 6, 50)}[shape]
    if shape == "lonely":
        val_labels[:3] = [20, 21, 22]  # no other image of their class anywhere
    val = rng.normal(size=(30, 8)).astype(np.float32)
    train = None if train_labels is None else rng.normal(size=(50, 8)).astype(np.float32)
    assert query_rows([f"photo_{i}.png" for i in range(30)], "") is None  # "": the mask is off
    for k in (1, 10):
        measures = validation_metrics(val, val_labels, k, train, train_labels)
        # Each scored query's points (issue 29's paired base comparison) average to the score.
        points = measures.pop("query_scores")
        assert len(points) == measures["val_queries"]
        assert np.mean(points) == pytest.approx(measures["score"])
        assert measures == mixed_protocol(val, val_labels, k, train, train_labels)


@pytest.mark.parametrize("pattern", ["", "photo_*"])
def test_the_run_measures_with_the_mask_the_pattern_draws(image_split, params_factory, pattern):
    """Epoch 0's row equals validation_metrics on the same embeddings: without a mask for the
    empty default, with the photo masks for photo_* (the training photos left out too)."""
    params = params_factory({**TINY, "data.val_split": "image", "data.val_fraction": 0.4,
                             "data.val_queries": pattern})
    trainer = Trainer(params, *image_split)
    row = trainer.start()
    features = trainer.features
    embed = (lambda split: trainer.model.embed_features(features(split)).float().cpu()
             .detach().numpy())
    val_labels = trainer.val_split.labels.cpu().numpy()
    train_labels = trainer.train_split.labels.cpu().numpy()
    masks = ((photos_of(trainer.val_split.paths), photos_of(trainer.train_split.paths))
             if pattern else (None, None))
    expected = validation_metrics(embed(trainer.val_split), val_labels, params.train.val_top_k,
                                  embed(trainer.train_split), train_labels, *masks)
    assert row.pop("query_scores") == expected.pop("query_scores")
    assert {key: row[key] for key in expected if key in row} == \
        {key: float(value) for key, value in expected.items() if key in row}
    n_val = len(trainer.val_split.paths)
    assert row["val_queries"] + row["val_unmatched"] == (masks[0].sum() if pattern else n_val)


# (d) Bad patterns.

def test_a_pattern_with_a_slash_is_one_line_naming_the_key():
    raw = with_overrides(default_params_dict(), {"data.val_queries": "train/*/photo_*"})
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert "'data.val_queries'" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("pattern, says", [
    ("selfie_*", "matches none of the 10 val images"),
    ("*.png", "matches all 10 val images"),
])
def test_a_pattern_leaving_no_query_or_no_gallery_stops_before_any_work(
        class_split, tmp_path, params_factory, pattern, says, monkeypatch):
    params = params_factory({**TINY, "data.val_split": "class", "data.val_fraction": 0.25,
                             "data.val_queries": pattern})
    built = []
    monkeypatch.setattr("clipcore.train.training.build_model", lambda *a: built.append(a))
    with pytest.raises(ClipcoreError) as caught:
        run(tmp_path / "run", params, class_split)
    message = str(caught.value)
    assert "'data.val_queries'" in message and says in message and "\n" not in message
    assert built == [] and not (tmp_path / "run" / "repository").exists()


# Resume: the protocol is part of the run.

def test_resume_refuses_another_protocol_and_takes_older_checkpoints_as_the_default(
        class_split, params_factory):
    _, prepared = class_split
    mixed = run_settings(params_factory(TINY), prepared)
    photos = run_settings(params_factory({**TINY, **PHOTOS}), prepared)
    checkpoint = {"path": "weights_epoch_1.pth", "base": {}, "signature": mixed}
    with pytest.raises(ClipcoreError, match=r"made with data\.val_queries='', now 'photo_\*'"):
        check_compatible(checkpoint, {}, photos)
    # Written before the key existed: made under the mixed protocol, the empty default.
    older = {**checkpoint, "signature": {k: v for k, v in mixed.items()
                                         if k != "data.val_queries"}}
    check_compatible(older, {}, mixed)
    with pytest.raises(ClipcoreError, match=r"data\.val_queries='', now 'photo_\*'"):
        check_compatible(older, {}, photos)
