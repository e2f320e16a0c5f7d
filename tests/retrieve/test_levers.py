"""The embed stage's levers on model files from real tiny training runs: WiSE-FT
(embed.wise_ft_alpha: 0 embeds as epoch 0, 1 as trained, between mixes the weights) and flip
test-time augmentation (embed.tta: the mean of the image's and its mirror's embeddings)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcore import paths
from clipcore.data.images import load_rgb
from clipcore.data.manifests import read_manifest
from clipcore.model.checkpoint import load_model, load_model_file
from clipcore.model.factory import build_model
from clipcore.retrieve.embedding import embed_all
from clipcore.retrieve.wise_ft import mix_weights
from clipcore.train.training import train

TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.lr": 1e-2, "train.backbone_lr_scale": 0.1, "train.epochs": 1,
        "embed.num_workers": 0}


@pytest.fixture(scope="module", params=[True, False], ids=["frozen", "unfrozen"])
def trained(request, tmp_path_factory, params_factory, prepared_demo):
    folder = tmp_path_factory.mktemp("levers")
    with contextlib.chdir(folder):
        train(params_factory({**TINY, "train.freeze_backbone": request.param}), *prepared_demo)
    return folder, request.param


VARIANTS = {"as trained": {}, "alpha 0": {"wise_ft_alpha": 0.0},
            "alpha 0.5": {"wise_ft_alpha": 0.5}, "flip": {"tta": "flip"}}


@pytest.fixture(scope="module")
def embedded(trained, params_factory, prepared_demo) -> dict[str, list[dict]]:
    """Per variant of the embed params: each epoch's query and gallery embeddings."""
    folder, _ = trained
    result = {}
    for name, embed in VARIANTS.items():
        params = params_factory({**TINY, **{f"embed.{k}": v for k, v in embed.items()}})
        with contextlib.chdir(folder):
            report = embed_all(params, *prepared_demo)
            result[name] = [{split: np.load(f)[split] for split in ("query", "gallery")}
                            for f in report.files]
    return result


def test_wise_ft_alpha_0_is_epoch_0_and_alpha_1_is_as_trained(embedded):
    as_trained, zero_shot, half = (embedded[v] for v in ("as trained", "alpha 0", "alpha 0.5"))
    for split in ("query", "gallery"):
        np.testing.assert_array_equal(zero_shot[1][split], as_trained[0][split])  # exactly
        np.testing.assert_array_equal(half[0][split], as_trained[0][split])  # epoch 0 stays
        assert not np.allclose(as_trained[1][split], as_trained[0][split], atol=1e-3)
        assert not np.allclose(half[1][split], as_trained[1][split], atol=1e-4)
        assert not np.allclose(half[1][split], as_trained[0][split], atol=1e-4)


def test_wise_ft_mixes_every_trained_parameter(trained):
    folder, frozen = trained
    base = load_model(folder / paths.model_path(0))
    fine_tuned, backbone_trained = load_model_file(folder / paths.model_path(1))
    assert backbone_trained is not frozen
    before = {k: v.clone() for k, v in fine_tuned.state_dict().items()}
    parameters = {k for k, _ in fine_tuned.named_parameters()}
    mixed = mix_weights(fine_tuned, base, 0.25, backbone_trained).state_dict()
    base_state = base.state_dict()
    trained_names = {k for k in parameters if k.startswith("head.") or
                     (backbone_trained and k.startswith("clip.visual."))}
    changed = {k for k in trained_names if not torch.equal(before[k], base_state[k])}
    assert any(k.startswith("head.") for k in changed)
    assert frozen or any(k.startswith("clip.visual.") for k in changed)
    for name, tensor in mixed.items():
        if name in trained_names:
            torch.testing.assert_close(tensor, 0.75 * base_state[name] + 0.25 * before[name])
        else:  # the text tower, the temperature, buffers
            assert torch.equal(tensor, before[name])


def test_flip_tta_is_the_renormalised_mean_of_image_and_mirror(trained, embedded,
                                                               prepared_demo):
    folder, _ = trained
    root, prepared = prepared_demo
    plain, flipped = embedded["as trained"], embedded["flip"]
    model = load_model(folder / paths.model_path(1))
    files = [root / p for p in read_manifest(prepared, "query")["path"]]
    with torch.inference_mode():
        images = torch.stack([model.preprocess_val(load_rgb(f)) for f in files])
        expected = F.normalize((model(images) + model(images.flip(-1))) / 2, dim=-1)
    np.testing.assert_allclose(flipped[1]["query"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flipped[1]["gallery"], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(flipped[1]["query"], plain[1]["query"], atol=1e-3)


def test_fresh_base_model_has_epoch_0s_weights(trained, params_factory):
    """WiSE-FT's base is a fresh build of the model file's params: epoch 0's parameters."""
    folder, _ = trained
    epoch_0 = dict(load_model(folder / paths.model_path(0)).named_parameters())
    fresh = dict(build_model(params_factory(TINY).model).named_parameters())
    assert fresh.keys() == epoch_0.keys()
    assert all(torch.equal(epoch_0[k], fresh[k]) for k in fresh)
