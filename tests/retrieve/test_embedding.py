"""The embed stage on model files from real tiny training runs: the file contract, epoch 0 is the
untouched base model, and a frozen run's backbone features are computed once for all epochs."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from conftest import images_through_the_tower, write_params

from clipcore import paths
from clipcore.data.images import load_rgb
from clipcore.data.manifests import read_manifest
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import load_model, save_model
from clipcore.model.factory import build_model
from clipcore.retrieve.embedding import embed_all
from clipcore.train.training import train

REPO = Path(__file__).resolve().parents[2]
TINY = {"model.name": "tiny", "model.pretrained": "none", "train.num_workers": 0,
        "train.lr": 1e-2, "embed.num_workers": 0}




def train_and_embed(folder: Path, params, prepared_demo):
    """Train, then embed with the backbone calls counted (those of embedding only)."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(folder):
        train(params, *prepared_demo)
        stale = paths.embeddings_path(9)
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"from an older run")
        with images_through_the_tower() as seen:
            report = embed_all(params, *prepared_demo)
    return report, sum(seen)


@pytest.fixture(scope="module")
def frozen_embedded(tmp_path_factory, params_factory, prepared_demo):
    folder = tmp_path_factory.mktemp("frozen")
    params = params_factory({**TINY, "train.epochs": 3})
    return folder, params, *train_and_embed(folder, params, prepared_demo)


def test_frozen_epochs_share_one_backbone_pass(frozen_embedded):
    folder, params, report, images_through_backbone = frozen_embedded
    assert [paths.epoch_of(f) for f in report.files] == [0, 1, 2, 3]
    assert report.backbone_passes == 1
    assert images_through_backbone == report.images["query"] + report.images["gallery"]
    assert not (folder / paths.embeddings_path(9)).exists()  # stale file of an older run gone


def test_embeddings_file_contract(frozen_embedded, prepared_demo):
    folder, params, report, _ = frozen_embedded
    _, prepared = prepared_demo
    names = {split: [PurePosixPath(p).name for p in read_manifest(prepared, split)["path"]]
             for split in ("query", "gallery")}
    epochs = [np.load(folder / f) for f in report.files]
    for data in epochs:
        for split in ("query", "gallery"):
            assert data[f"{split}_names"].dtype.kind == "U"
            assert data[f"{split}_names"].tolist() == names[split]  # manifest order
            vectors = data[split]
            assert vectors.dtype == np.float32
            assert vectors.shape == (len(names[split]), params.model.embed_dim)
            np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(epochs[0]["query"], epochs[-1]["query"])  # the head did train


def test_epoch_0_is_the_untouched_base_model(frozen_embedded, prepared_demo):
    folder, params, _, _ = frozen_embedded
    root, prepared = prepared_demo
    fresh = build_model(params.model).eval()
    files = [root / p for p in read_manifest(prepared, "query")["path"]]
    with torch.inference_mode():
        expected = fresh(torch.stack([fresh.preprocess_val(load_rgb(f)) for f in files]))
    stored = np.load(folder / paths.embeddings_path(0))["query"]
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5)


def test_trained_backbone_epochs_get_a_pass_each(tmp_path, params_factory, prepared_demo):
    root, prepared = prepared_demo
    params = params_factory({**TINY, "train.epochs": 1, "train.freeze_backbone": False})
    report, images_through_backbone = train_and_embed(tmp_path, params, prepared_demo)
    per_pass = report.images["query"] + report.images["gallery"]
    assert report.backbone_passes == 2 and images_through_backbone == 2 * per_pass
    trained = load_model(tmp_path / paths.model_path(1))
    gallery = read_manifest(prepared, "gallery")["path"][:8]
    with torch.inference_mode():
        images = [trained.preprocess_val(load_rgb(root / p)) for p in gallery]
        expected = trained(torch.stack(images))
    stored = np.load(tmp_path / paths.embeddings_path(1))["gallery"][:8]
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_changed_since_prepare_is_one_line_error(tmp_path, params_factory, prepared_demo,
                                                       workers):
    root, prepared = prepared_demo
    copy = tmp_path / "data"
    shutil.copytree(root / "test", copy / "test")
    broken = copy / read_manifest(prepared, "gallery")["path"][3]
    broken.write_bytes(b"not a png any more")
    params = params_factory({**TINY, "embed.num_workers": workers})
    with contextlib.chdir(tmp_path):
        save_model(build_model(params.model), paths.model_path(0), backbone_trained=False, epoch=0)
        with pytest.raises(ClipcoreError) as error:
            embed_all(params, copy, prepared)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(broken))
    assert message.endswith("(changed since prepare: run dvc repro prepare)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_the_param(tmp_path, params_factory, prepared_demo):
    with contextlib.chdir(tmp_path), pytest.raises(ClipcoreError, match="^train.device is cuda"):
        train(params_factory({**TINY, "train.device": "cuda"}), *prepared_demo)


def test_stage_without_model_files_fails_in_one_line(tmp_path):
    write_params(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.embed"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: repository/all_weights: no model_epoch_*.pt files (run dvc repro train)"]
    assert not (tmp_path / paths.EMBEDDINGS).exists()


_interrupt_at_next_fork: list[bool] = []


def _interrupt_once() -> None:
    if _interrupt_at_next_fork:
        _interrupt_at_next_fork.clear()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, right as a loader worker is forked


os.register_at_fork(after_in_parent=_interrupt_once)


def test_ctrl_c_while_loader_workers_start_stops_the_run(tmp_path, params_factory,
                                                         prepared_demo, ctrl_c_raises):
    """Python runs its at-fork handlers (logging's lock release) with any KeyboardInterrupt
    they raise printed as "Exception ignored" and dropped: before, a Ctrl-C that came while the
    DataLoader forked its workers was swallowed and the embedding ran on to the end."""
    params = params_factory({**TINY, "embed.num_workers": 2})
    with contextlib.chdir(tmp_path):
        save_model(build_model(params.model), paths.model_path(0), backbone_trained=False,
                   epoch=0)
        _interrupt_at_next_fork.append(True)
        with pytest.raises(KeyboardInterrupt):
            embed_all(params, *prepared_demo)
        assert not _interrupt_at_next_fork  # the interrupt came during a fork
        assert not paths.embeddings_path(0).exists()
