"""Several processes (train.processes, torch.distributed with gloo on CPU): two processes compute
the loss and gradients one process computes on the same global batch (through DDP, frozen and
unfrozen); the train and embed stages on two processes, and on two loopback "nodes", write what
one process writes; resuming with another process count stops with one line; a failing
process's error reaches the user; a batch too small to share is refused before any work.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing
import yaml
from conftest import default_params_dict, with_overrides, write_params

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.model import distributed
from clipcore.model.distributed import buffers_never_synced
from clipcore.model.checkpoint import load_file
from clipcore.model.factory import build_model
from clipcore.params import PAIR_LOSSES, Params, load_params, parse_params
from clipcore.retrieve.embedding import embed_all
from clipcore.train.losses import create_loss
from clipcore.train.training import METRIC_COLUMNS, train

REPO = Path(__file__).resolve().parents[2]
# Dropout and augmentation off: then two processes must follow one process's run exactly.
STAGE = {"model.name": "tiny", "model.pretrained": "none", "model.dropout": 0.0,
         "train.augment": False, "train.num_workers": 0, "embed.num_workers": 0,
         "train.lr": 1e-2, "data.root": "demo"}
EPOCHS = {True: 2, False: 1}  # by train.freeze_backbone: a trained backbone's epoch costs more
LABELS = [0, 0, 1, 2, 1, 0, 2]  # 7 images: an uneven 4 + 3 split, same-class pairs across it
COMPARED = ("train_loss", "val_loss", "top1", "top5", "top10", "score", "precision_at_k",
            "map_at_k", "lr")


# --- the loss and its gradients ------------------------------------------------------------

def loss_and_gradients(world: distributed.World, name: str, frozen: bool,
                       same_class_positives: bool = True) -> dict:
    """One training step's loss (loss.name `name`, clipcore.train.losses) and gradients on a fixed
    global batch of 7 images through the tiny model (the visual tower trainable unless frozen:
    then the head on stored features), from this process's share of the batch, through the
    trainer's forward (DDP with several processes) and backward."""
    params = parse_params(with_overrides(default_params_dict(), {
        "model.name": "tiny", "model.pretrained": "none", "model.dropout": 0.0,
        "loss.name": name, "loss.same_class_positives": same_class_positives,
        "loss.target_init": "caption",
        "train.sampler": "class_balanced" if name in PAIR_LOSSES else "random"}))
    model = build_model(params.model).eval()  # seeded random init: the same in every process
    model.set_backbone_trainable(not frozen)
    torch.manual_seed(0)  # a classifier loss's class weights: the same in every process
    loss = create_loss(params, model, captions=["zero", "one", "two"])
    images = torch.randn(len(LABELS), 3, 32, 32, generator=torch.Generator().manual_seed(2))
    inputs = model.backbone_features(images).detach() if frozen else images
    mine = list(world.shard(range(len(LABELS))))
    forward = world.trained(model, loss, frozen)  # DDP's hooks live while it does
    local = forward(inputs[mine])
    embeddings, labels, rows = world.gather_batch(local, torch.tensor(LABELS)[mine], len(LABELS))
    value = loss(embeddings, labels, rows)
    world.backward(value)
    named = {**{f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad},
             **{f"loss.{n}": p for n, p in loss.named_parameters() if p.requires_grad}}
    return {"loss": world.sum(value), "grads": {n: p.grad.clone() for n, p in named.items()}}


# (loss.name, frozen, same-class positives): the CLIP loss in every mode; a classifier loss
# (each process scores its rows against the class weights; the visual tower trains) and a pair
# loss (each process takes a share of the gathered batch's loss).
MODES = [("clip", frozen, positives) for frozen in (True, False) for positives in (True, False)]
MODES += [("arcface", False, True), ("triplet", True, True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_process(rank: int, port: int, folder: str) -> None:
    """One of two processes, set up as torchrun sets them up (environment variables)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    world = distributed.join("cpu")
    assert (world.rank, world.size) == (rank, 2)
    results = {mode: loss_and_gradients(world, *mode) for mode in MODES}
    torch.save(results, Path(folder) / f"rank_{rank}.pt")


def test_two_processes_give_one_process_loss_and_gradients(tmp_path):
    torch.multiprocessing.start_processes(gloo_process, args=(free_port(), str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    for mode in MODES:
        alone = loss_and_gradients(distributed.World(), *mode)
        trained = "model.head.linear.weight" if mode[1] else "model.clip.visual.conv1.weight"
        assert alone["loss"] > 0 and alone["grads"][trained].abs().sum() > 0, mode
        if mode[0] == "arcface":
            assert alone["grads"]["loss.loss.W"].abs().sum() > 0
        for rank in (0, 1):
            shared = torch.load(tmp_path / f"rank_{rank}.pt")[mode]
            assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-5, abs=1e-5), mode
            assert shared["grads"].keys() == alone["grads"].keys()
            for name, grad in alone["grads"].items():
                torch.testing.assert_close(shared["grads"][name], grad, atol=1e-5, rtol=1e-4,
                                           msg=f"{mode} {name}, rank {rank}")


def test_shares_are_contiguous_and_cover_every_item_once():
    items = list(range(7))
    shares = [distributed.World(rank=rank, size=3).shard(items) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.World().shard(items) is items  # one process: untouched


# --- the stages on two processes ---------------------------------------------------------

def stage(folder: Path, name: str, fails: bool = False, **env) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=folder,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == (1 if fails else 0), done.stderr[-3000:]
    return done


def project(folder: Path, demo: tuple[Path, Path], overrides: dict) -> Path:
    """A folder holding the demo data, its manifests and params.yaml, as a stage sees them."""
    root, prepared = demo
    (folder / "demo").symlink_to(root)
    shutil.copytree(prepared, folder / paths.PREPARED)
    write_params(folder, {**STAGE, **overrides})
    return folder


def metric_rows(folder: Path) -> list[dict]:
    with open(folder / paths.TRAINING_METRICS_CSV) as f:
        return list(csv.DictReader(f))


def same_metrics(rows: list[dict], history: list[dict]) -> None:
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history]
    for row, expected in zip(rows, history):
        for column in COMPARED:
            if row[column] == "":  # epoch 0: no train_loss, no lr
                assert np.isnan(expected[column])
            else:
                assert float(row[column]) == pytest.approx(expected[column], rel=1e-4, abs=1e-6), \
                    f"epoch {row['epoch']} {column}"


@pytest.fixture(scope="module")
def small_demo(prepared_demo, tmp_path_factory) -> tuple[Path, Path]:
    """The demo with a third of its training images and half its queries and gallery: enough
    for what these runs show, and each starts two processes on two shared cores."""
    root, prepared = prepared_demo
    small = tmp_path_factory.mktemp("small_prepared")
    for split, step in (("train", 3), ("val", 1), ("query", 2), ("gallery", 2)):
        frame = pd.read_csv(prepared / f"{split}.csv", dtype=str, keep_default_na=False)
        frame.iloc[::step].to_csv(small / f"{split}.csv", index=False)
    return root, small


def on_one_process(folder: Path, **train) -> Params:
    """The params of a two-process run's folder, for one process (and `train` changes)."""
    params = load_params(folder / "params.yaml")
    return dataclasses.replace(
        params, train=dataclasses.replace(params.train, processes=1, **train))


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, small_demo):
    """run(frozen) -> (folder, stdout) of the train stage run on two processes."""
    runs = {}

    def run(frozen: bool) -> tuple[Path, str]:
        if frozen not in runs:
            folder = project(tmp_path_factory.mktemp("two_processes"), small_demo,
                             {"train.processes": 2, "train.freeze_backbone": frozen,
                              "train.epochs": EPOCHS[frozen]})
            runs[frozen] = folder, stage(folder, "train").stdout
        return runs[frozen]
    return run


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "unfrozen"])
def test_train_stage_on_two_processes_writes_one_process_run(
        two_process_runs, tmp_path, small_demo, frozen):
    folder, stdout = two_process_runs(frozen)
    with contextlib.chdir(tmp_path):
        one_process = train(on_one_process(folder), *small_demo)
    epochs = list(range(EPOCHS[frozen] + 1))
    assert stdout.count(f"trained {epochs[-1]} epochs") == 1  # local rank 0 alone prints
    rows = metric_rows(folder)
    assert list(rows[0]) == list(METRIC_COLUMNS)
    same_metrics(rows, one_process)
    live = json.loads((folder / paths.TRAIN_LIVE / "metrics.json").read_text())
    assert live["step"] == epochs[-1]
    scores = (folder / paths.TRAIN_LIVE / "plots/metrics/score.tsv").read_text().splitlines()
    assert len(scores) == 1 + len(epochs)  # header + one line per epoch
    assert [paths.epoch_of(p) for p in paths.epoch_files(folder / paths.ALL_WEIGHTS, "*.pt")] \
        == epochs
    assert [paths.epoch_of(p) for p in paths.epoch_files(folder / paths.CHECKPOINTS, "*.pth")] \
        == epochs[1:]


def test_embed_stage_on_two_processes_writes_one_process_embeddings(
        two_process_runs, tmp_path, small_demo):
    folder, _ = two_process_runs(True)
    stage(folder, "embed")
    shutil.copytree(folder / paths.ALL_WEIGHTS, tmp_path / paths.ALL_WEIGHTS)
    with contextlib.chdir(tmp_path):
        embed_all(on_one_process(folder), *small_demo)
    for epoch in (0, 1, 2):
        two = np.load(folder / paths.embeddings_path(epoch))
        one = np.load(tmp_path / paths.embeddings_path(epoch))
        assert two.files == one.files
        for split in ("query", "gallery"):
            assert two[f"{split}_names"].tolist() == one[f"{split}_names"].tolist()
            np.testing.assert_allclose(two[split], one[split], atol=1e-4)


def test_resume_on_two_processes_ends_as_the_run_that_never_stopped(
        two_process_runs, tmp_path, small_demo):
    finished, _ = two_process_runs(True)
    folder = tmp_path / "run"
    shutil.copytree(finished, folder, symlinks=True)
    for path in (paths.checkpoint_path(2), paths.model_path(2)):  # stopped after epoch 1
        (folder / path).unlink()
    with contextlib.chdir(folder), pytest.raises(ClipcoreError) as error:
        train(on_one_process(folder, resume=True), *small_demo)
    message = str(error.value)
    assert "\n" not in message and "train.processes" in message
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["train"]["resume"] = True
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    assert "resuming after epoch 1" in stage(folder, "train").stdout
    resumed, uninterrupted = metric_rows(folder), metric_rows(finished)
    assert [r["epoch"] for r in resumed] == ["0", "1", "2"]
    for a, b in zip(resumed, uninterrupted):
        assert [a[c] for c in COMPARED] == [b[c] for c in COMPARED]
    a = load_file(folder / paths.model_path(2))["state"]
    b = load_file(finished / paths.model_path(2))["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multi_node_run_over_loopback_writes_the_one_node_run(
        two_process_runs, tmp_path, small_demo):
    """Two torchrun "nodes" of one process each (the stage's relaunch reads torchrun's PET_*
    rendezvous, docs Scaling out) on this machine: the run of two processes on one node."""
    one_node, _ = two_process_runs(True)
    folder = project(tmp_path, small_demo, {"train.processes": 1, "train.freeze_backbone": True,
                                            "train.epochs": EPOCHS[True]})
    rendezvous = {"PET_NNODES": "2", "PET_MASTER_ADDR": "127.0.0.1",
                  "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env = {**os.environ, **rendezvous, "PYTHONPATH": str(REPO)}
    nodes = [subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=folder,
                              env={**env, "PET_NODE_RANK": str(node)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:]
    assert "2 processes (gloo)" in outputs[0][0]
    rows, expected = metric_rows(folder), metric_rows(one_node)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected] == ["0", "1", "2"]
    for row, same in zip(rows, expected):
        assert [row[c] for c in COMPARED] == [same[c] for c in COMPARED]


def test_a_failing_process_is_named_with_its_error_last(tmp_path, small_demo):
    """An unreadable training image in rank 1's share: rank 1's one-line error (naming the file)
    is the last line; rank 0's echo of it (a closed connection) comes before."""
    root, prepared = small_demo
    data = tmp_path / "data_root"
    data.mkdir()
    for part in ("train", "test"):
        (data / part).symlink_to(root / part)
    (data / "broken.png").write_bytes(b"not a picture")
    folder = project(tmp_path, small_demo, {"train.processes": 2, "data.root": "data_root"})
    manifest = pd.read_csv(folder / paths.PREPARED / "train.csv")
    manifest.loc[len(manifest) - 1, "path"] = "broken.png"  # the last: rank 1's share
    manifest.to_csv(folder / paths.PREPARED / "train.csv", index=False)
    stderr = stage(folder, "train", fails=True, OMP_NUM_THREADS="1").stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stages.train: ") and "rank 1: " in last
    assert "broken.png" in last and "dvc repro prepare" in last
    assert stderr.count("Traceback") <= 1  # rank 0's alone: the console shows local rank 0


def test_odd_process_counts_are_refused_with_the_keys_named(params_factory):
    with pytest.raises(ClipcoreError) as error:
        params_factory({"train.processes": 3, "train.batch_size": 2})
    assert "'train.batch_size' (2)" in str(error.value)
    assert "'train.processes' (3)" in str(error.value)
    assert params_factory({"train.processes": 3, "train.batch_size": 3}).train.processes == 3


def test_ddp_buffer_keyword_is_the_one_this_torch_takes():
    # This torch (2.14) spells it forward_sync_buffers; the GPU machine's 2.11 only knows
    # broadcast_buffers (its DistributedDataParallel.__init__ signature, abridged).
    def torch_2_11_init(self, module, device_ids=None, output_device=None, dim=0,
                        broadcast_buffers=True, init_sync=True, process_group=None,
                        bucket_cap_mb=None, find_unused_parameters=False):
        pass

    assert buffers_never_synced() == {"forward_sync_buffers": False}
    assert buffers_never_synced(torch_2_11_init) == {"broadcast_buffers": False}
