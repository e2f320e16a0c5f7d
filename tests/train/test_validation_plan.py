"""data.val_distractors and data.val_queries: auto (issue 29 item 4): distractors crowd the val
gallery and are never a match; auto draws the queries with a classifier learnt from the unlabelled
test images, on the generated domain with the tiny model; bad settings stop before any work."""
from __future__ import annotations

import numpy as np
import pytest
from test_validation_queries import TINY, prepared_domain, run

from clipcore.errors import ClipcoreError
from clipcore.train.resume import check_compatible, run_settings
from clipcore.train.training import Trainer
from clipcore.train.validation import validation_metrics
from clipcore.train.validation_plan import predicted_queries, rendering_classifier

CLASS = {**TINY, "data.val_split": "class", "data.val_fraction": 0.25}


@pytest.fixture(scope="module")
def class_split(tmp_path_factory, params_factory):
    return prepared_domain(tmp_path_factory.mktemp("plan"), params_factory(CLASS))


# Hand-made vectors.

def test_a_distractor_next_to_the_query_pushes_its_match_out_of_top1():
    val = np.array([[1, 0.2, 0], [1, 0, 0.2]], np.float32)  # two images of class A
    labels = np.array(["A", "A"])
    assert validation_metrics(val, labels, 1)["top1"] == 1.0
    distractor = np.array([[1, 0.1, 0.1]], np.float32)  # nearer each query than its match
    crowded = validation_metrics(val, labels, 1, distractors=distractor)
    assert crowded["top1"] == 0.0 and crowded["top5"] == 1.0  # the match is second now
    assert crowded["val_queries"] == 2 and crowded["val_unmatched"] == 0


def test_a_distractor_is_never_a_hit_even_where_it_is_a_copy_of_the_query():
    val = np.eye(3, dtype=np.float32)
    # Every query lonely (no other image of its class): a copy of it gives it no positive.
    lonely = validation_metrics(val, np.array(["A", "B", "C"]), 10, distractors=val.copy())
    assert lonely == {"val_queries": 0, "val_unmatched": 3}
    # Class -1 (what a distractor is coded as inside) stays lonely; class 0's queries find
    # their copy first, a miss, and each other next.
    measures = validation_metrics(val, np.array([0, -1, 0]), 10, distractors=val.copy())
    assert (measures["val_queries"], measures["val_unmatched"]) == (2, 1)
    assert measures["top1"] == 0.0 and measures["top5"] == 1.0


def test_no_distractors_give_the_numbers_of_today():
    rng = np.random.default_rng(0)
    val, labels = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 4, 20)
    train, train_labels = rng.normal(size=(30, 6)).astype(np.float32), rng.integers(0, 4, 30)
    plain = validation_metrics(val, labels, 10, train, train_labels)
    empty = validation_metrics(val, labels, 10, train, train_labels,
                               distractors=np.zeros((0, 6), np.float32))
    assert plain == empty


def test_the_classifier_learns_queries_from_the_test_images():
    rng = np.random.default_rng(1)
    query, gallery = rng.normal(1, 0.3, (30, 4)), rng.normal(-1, 0.3, (50, 4))
    classifier = rendering_classifier(query, gallery)
    assert predicted_queries(classifier, np.r_[query[:3], gallery[:3]]).tolist() == \
        [True] * 3 + [False] * 3


# A real run with the tiny model.

@pytest.mark.parametrize("distractors", ["none", "train_others", "test_gallery"])
def test_the_run_ranks_against_the_distractors_it_names(class_split, params_factory, distractors):
    """Epoch 0's row equals validation_metrics on the same embeddings with those distractors:
    the class split's training images, or the test gallery (none: today's call)."""
    trainer = Trainer(params_factory({**CLASS, "data.val_distractors": distractors}), *class_split)
    row = trainer.start()
    embed = (lambda split: trainer.model.embed_features(trainer.features(split)).float().cpu()
             .detach().numpy())
    extra = {"none": None, "train_others": embed(trainer.train_split),
             "test_gallery": embed(trainer.plan.test_gallery) if trainer.plan.test_gallery else None
             }[distractors]
    val_labels = trainer.val_split.labels.cpu().numpy()
    expected = validation_metrics(embed(trainer.val_split), val_labels, 10, distractors=extra)
    assert row.pop("query_scores") == expected.pop("query_scores")
    keys = ("top1", "top5", "top10", "score", "map_at_k", "val_queries", "val_unmatched")
    assert {key: row[key] for key in keys} == {key: float(expected[key]) for key in keys}


def test_auto_applies_to_val_the_classifier_of_the_test_images(class_split, params_factory,
                                                               tmp_path):
    params = params_factory({**CLASS, "data.val_queries": "auto"})
    trainer = Trainer(params, *class_split)
    features, plan = trainer.features, trainer.plan
    classifier = rendering_classifier(features(plan.test_query), features(plan.test_gallery))
    assert plan.masks[0].tolist() == predicted_queries(classifier,
                                                       features(trainer.val_split)).tolist()
    assert len(plan.masks[1]) == len(trainer.train_split.paths)
    history = run(tmp_path / "run", params, class_split)
    assert all(row["val_queries"] + row["val_unmatched"] == plan.masks[0].sum()
               for row in history)


# Bad settings: one line, before the model is built.

@pytest.mark.parametrize("setting, empty", [({"data.val_queries": "auto"}, "query"),
                                            ({"data.val_queries": "auto"}, "gallery"),
                                            ({"data.val_distractors": "test_gallery"}, "gallery")])
def test_no_test_images_to_learn_from_stop_before_the_model(class_split, params_factory,
                                                            tmp_path, monkeypatch, setting, empty):
    root, prepared = class_split
    copy = tmp_path / "prepared"
    copy.mkdir()
    for file in prepared.glob("*.csv"):
        lines = file.read_text().splitlines(keepends=True)
        (copy / file.name).write_text("".join(lines[:1] if file.stem == empty else lines))
    built = []
    monkeypatch.setattr("clipcore.train.training.build_model", lambda *a: built.append(a))
    with pytest.raises(ClipcoreError) as caught:
        Trainer(params_factory({**CLASS, **setting}), root, copy)
    message = str(caught.value)
    assert f"{empty}.csv" in message and next(iter(setting)) in message and "\n" not in message
    assert built == []


@pytest.mark.parametrize("everything, says", [(True, "all"), (False, "none")])
def test_auto_that_calls_every_val_image_one_class_says_so(class_split, params_factory,
                                                           monkeypatch, everything, says):
    monkeypatch.setattr("clipcore.train.validation_plan.predicted_queries",
                        lambda classifier, features: np.full(len(features), everything))
    with pytest.raises(ClipcoreError, match=rf"'data.val_queries' auto .* takes {says} "):
        Trainer(params_factory({**CLASS, "data.val_queries": "auto"}), *class_split)


def test_resume_takes_older_checkpoints_as_without_distractors(class_split, params_factory):
    _, prepared = class_split
    plain = run_settings(params_factory(CLASS), prepared)
    crowded = run_settings(params_factory({**CLASS, "data.val_distractors": "train_others"}),
                           prepared)
    older = {"path": "weights_epoch_1.pth", "base": {},
             "signature": {k: v for k, v in plain.items() if k != "data.val_distractors"}}
    check_compatible(older, {}, plain)
    with pytest.raises(ClipcoreError, match=r"data\.val_distractors='none', now 'train_others'"):
        check_compatible(older, {}, crowded)
