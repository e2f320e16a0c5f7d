"""Weight soups (python -m clipcore.soup) and the paired comparison with the base: a soup of
identical runs is the run, a uniform soup is the mean, greedy keeps only what helps val, and the
verdict on whether fine-tuning beat the base, on hand-made per-query scores."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_params

from clipcore import paths, soup
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import load_file, load_model_file, save_model
from clipcore.model.factory import build_model
from clipcore.ranking.measures import query_scores, retrieval_metrics
from clipcore.report.versus_base import compare_with_base, paired_gain, verdict
from clipcore.retrieve.fusion import embed_images

TINY = {"model.name": "tiny", "model.pretrained": "none", "embed.num_workers": 0}


@pytest.fixture
def runs(tmp_path, prepared_demo):
    """A project folder with the demo prepared and two tiny "runs" of one base: the same base
    tower, heads (and, for run 1, towers) moved apart."""
    root, prepared = prepared_demo
    shutil.copytree(prepared, tmp_path / paths.PREPARED)
    write_params(tmp_path, {**TINY, "data.root": str(root)})
    with contextlib.chdir(tmp_path):
        params = soup.load_params()
        for seed, tower in ((0, False), (1, True)):
            torch.manual_seed(0)
            model = build_model(params.model)
            torch.manual_seed(seed + 10)
            with torch.no_grad():
                for p in model.head.parameters():
                    p.add_(0.05 * torch.randn_like(p))
                if tower:
                    for p in model.clip.visual.parameters():
                        p.add_(0.01 * torch.randn_like(p))
            save_model(model, Path(f"run{seed}.pt"), backbone_trained=tower, epoch=3)
    return tmp_path, root


def test_a_soup_of_identical_runs_embeds_as_the_run(runs, capsys):
    folder, root = runs
    with contextlib.chdir(folder):
        shutil.copy("run1.pt", "copy.pt")
        soup.main(["--models", "run1.pt", "copy.pt", "--out", "soup.pt"])
        images = [root / p for p in read_manifest(paths.PREPARED, "val")["path"][:16]]
        np.testing.assert_allclose(embed_images(Path("soup.pt"), images),
                                   embed_images(Path("run1.pt"), images), atol=1e-6)
        assert load_file("soup.pt")["soup"] == ["run1.pt", "copy.pt"]
    assert "uniform soup of 2: val score" in capsys.readouterr().out


def test_a_uniform_soup_is_the_mean_of_the_runs_tensors(runs):
    folder, _ = runs
    with contextlib.chdir(folder):
        soup.main(["--models", "run0.pt", "run1.pt", "--out", "soup.pt"])
        made, tower = load_model_file("soup.pt")
        (first, _), (second, _) = load_model_file("run0.pt"), load_model_file("run1.pt")
    assert tower  # run 1 trained its tower: the soup's holds the mean with run 0's (the base's)
    for name in (*first.head_state(), *first.backbone_state()):
        expected = (first.state_dict()[name].float() + second.state_dict()[name].float()) / 2
        torch.testing.assert_close(made.state_dict()[name].float(), expected)


def test_greedy_keeps_a_run_only_when_val_does_not_drop():
    own = {(0,): 500.0, (1,): 700.0, (2,): 600.0}
    together = {(1, 2): 720.0, (0, 1, 2): 650.0, (0, 1): 710.0}

    def score(chosen):
        key = tuple(sorted(chosen))
        return own.get(key, together.get(key))
    assert soup.greedy(3, score) == ([1, 2], 720.0)  # 1 first, 2 helps, 0 then hurts


def test_a_soup_of_other_bases_is_refused_in_one_line(runs):
    folder, _ = runs
    with contextlib.chdir(folder):
        params = soup.load_params()
        model = build_model(dataclasses.replace(params.model, head="mlp"))
        save_model(model, Path("other.pt"), backbone_trained=False, epoch=1)
        with pytest.raises(ClipcoreError, match="other.pt: made on another base"):
            soup.main(["--models", "run0.pt", "other.pt"])


def test_query_scores_are_the_points_whose_mean_is_the_score():
    labels = np.array(["a", "b", "c", "d"])
    ranked = np.array([["a", "x", "x", "x", "x", "x", "x", "x", "x", "x"],   # top-1: 1000
                       ["x", "x", "b", "x", "x", "x", "x", "x", "x", "x"],   # top-5: 400
                       ["x", "x", "x", "x", "x", "x", "x", "c", "x", "x"],   # top-10: 100
                       ["x"] * 10])                                          # none: 0
    points = query_scores(labels, ranked)
    assert points.tolist() == [1000, 400, 100, 0]
    assert points.mean() == pytest.approx(retrieval_metrics(labels, ranked)["score"])


def write_scores(path: Path, by_epoch: dict) -> Path:
    path.write_text(json.dumps({str(e): s for e, s in by_epoch.items()}))
    return path


def test_a_clear_gain_beats_the_base_and_noise_does_not(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.choice([0, 100, 400, 1000], size=200).tolist()
    better = [min(1000, s + 300) for s in base]
    shuffled = rng.permutation(base).tolist()  # the same points, other queries: noise around 0
    path = write_scores(tmp_path / "scores.json", {0: base, 2: better, 3: shuffled})
    gain = compare_with_base(2, path)
    assert gain["beats_base"] and gain["gain_ci95"][0] > 0 and gain["queries"] == 200
    assert verdict(gain).startswith("fine-tuning beat the base: val ")
    noise = compare_with_base(3, path)
    low, high = noise["gain_ci95"]
    assert not noise["beats_base"] and low < 0 < high and noise["gain"] == pytest.approx(0)
    assert verdict(noise).startswith("fine-tuning did not beat the base beyond noise")
    assert "may be as good" in verdict(noise)
    assert "picked epoch 0" in verdict(compare_with_base(0, path))
    assert compare_with_base(2, tmp_path / "none.json") is None  # an older run: no comparison


def test_pairing_sees_a_small_steady_gain_that_two_separate_means_would_not():
    rng = np.random.default_rng(1)
    base = rng.choice([0, 1000], size=300).astype(float)
    picked = base.copy()
    picked[rng.choice(np.flatnonzero(base == 0), 20, replace=False)] = 1000  # 20 queries fixed
    gain, low, high = paired_gain(base, picked)
    assert gain == pytest.approx(1000 * 20 / 300) and low > 0
    separate = 1.96 * np.hypot(base.std() / np.sqrt(300), picked.std() / np.sqrt(300))
    assert gain < separate  # unpaired intervals would overlap
