"""Model files and checkpoints: round trips, sizes, refusing bad files, atomic writes."""
from __future__ import annotations

import pickle
import resource
import signal

import pytest
import torch
from conftest import flip_bit

from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import (
    DamagedFile,
    inference_state,
    load_file,
    load_model,
    load_model_params,
    save_atomic,
    save_model,
)
from clipcore.model.factory import build_model
from clipcore.params import ModelParams

TINY = ModelParams(name="tiny", pretrained="none", embed_dim=512, dropout=0.1)


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained(params: ModelParams = TINY, backbone: bool = False):
    """A model whose head (and, if asked, visual tower) moved away from the base, as training does."""
    model = build_model(params)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.head.linear.weight.add_(0.05 * torch.randn(model.head.linear.weight.shape, generator=generator))
        if backbone:
            model.clip.visual.conv1.weight.mul_(1.5)
    return model.eval()


def embed(model, images):
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("backbone_trained", [False, True])
def test_model_file_round_trip_gives_identical_embeddings(tmp_path, images, backbone_trained):
    model = trained(backbone=backbone_trained)
    path = tmp_path / "model_epoch_3.pt"
    save_model(model, path, backbone_trained=backbone_trained, epoch=3)

    loaded = load_model(path)
    assert not loaded.training
    assert torch.equal(embed(loaded, images), embed(model, images))
    assert load_model_params(path) == TINY
    assert load_file(path)["epoch"] == 3
    visual_restored = torch.equal(loaded.clip.visual.conv1.weight, model.clip.visual.conv1.weight)
    assert visual_restored  # frozen: from the same seeded base; trained: from the file


def test_frozen_run_file_holds_the_head_only(tmp_path):
    model = trained(backbone=True)
    frozen_path, unfrozen_path = tmp_path / "frozen.pt", tmp_path / "unfrozen.pt"
    save_model(model, frozen_path, backbone_trained=False, epoch=1)
    save_model(model, unfrozen_path, backbone_trained=True, epoch=1)

    frozen_keys = set(load_file(frozen_path)["state"])
    assert frozen_keys == {"head.linear.weight", "head.linear.bias", "head.mean", "head.std"}
    assert set(load_file(unfrozen_path)["state"]) == frozen_keys | set(model.backbone_state())
    head_bytes = sum(t.numel() * t.element_size() for t in model.head_state().values())
    visual_bytes = sum(t.numel() * t.element_size() for t in model.backbone_state().values())
    frozen_size, unfrozen_size = frozen_path.stat().st_size, unfrozen_path.stat().st_size
    print(f"tiny model files: frozen {frozen_size / 1e6:.2f} MB (head {head_bytes / 1e6:.2f} MB), "
          f"unfrozen {unfrozen_size / 1e6:.2f} MB (+ visual tower {visual_bytes / 1e6:.2f} MB)")
    assert frozen_size < head_bytes + 64_000
    assert unfrozen_size >= frozen_size + visual_bytes
    # Loading a frozen-run file onto a model whose backbone differs keeps the base's backbone.
    assert not torch.equal(load_model(frozen_path).clip.visual.conv1.weight,
                           model.clip.visual.conv1.weight)


def test_inference_state_describes_its_base():
    state = inference_state(build_model(TINY), backbone_trained=False)
    assert state["format"] == "clipcore-model/2"
    assert state["model"] == {"name": "tiny", "pretrained": "none", "embed_dim": 512, "dropout": 0.1,
                              "head": "residual"}
    assert state["base"] == {"name": "tiny", "pretrained": "none", "sha256": None}
    assert state["backbone_trained"] is False


def test_local_base_file_is_checked(tmp_path, images):
    base_file = tmp_path / "base.pt"
    torch.save(build_model(TINY).clip.state_dict(), base_file)
    params = ModelParams("tiny", str(base_file), 512, 0.1)
    model = trained(params)
    path = tmp_path / "model_epoch_1.pt"
    save_model(model, path, backbone_trained=False, epoch=1)
    assert torch.equal(embed(load_model(path), images), embed(model, images))

    changed = build_model(TINY).clip.state_dict()
    changed["visual.conv1.weight"] = changed["visual.conv1.weight"] * 2
    torch.save(changed, base_file)
    with pytest.raises(ClipcoreError, match=r"model_epoch_1\.pt: made on base weights .*sha256"):
        load_model(path)
    base_file.unlink()
    with pytest.raises(ClipcoreError, match=r"model_epoch_1\.pt: cannot rebuild .*base\.pt not found"):
        load_model(path)


def test_bad_files_are_refused_with_one_line(tmp_path):
    good = tmp_path / "good.pt"
    save_model(trained(), good, backbone_trained=False, epoch=1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    class Code:
        def __reduce__(self):
            return (print, ("this ran while loading",))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "clipcore-model/1", "payload": Code()}, unsafe)
    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    training_checkpoint = tmp_path / "weights_epoch_1.pth"
    save_atomic({"epoch": 1, "head": torch.zeros(2)}, training_checkpoint)

    cases = [(tmp_path / "missing.pt", "file not found"), (truncated, "truncated"),
             (unsafe, "not a safe checkpoint"), (a_list, "not a clipcore file")]
    for path, reason in cases:
        with pytest.raises(ClipcoreError) as error:
            load_model(path)
        message = str(error.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message
    assert load_file(training_checkpoint)["epoch"] == 1
    with pytest.raises(ClipcoreError, match="not a clipcore model file"):
        load_model(training_checkpoint)


def test_a_flipped_bit_is_caught_not_loaded(tmp_path):
    """torch.load does not check the zip CRC: unchecked, this file loads a changed head."""
    path = tmp_path / "model_epoch_1.pt"
    save_model(trained(), path, backbone_trained=False, epoch=1)
    intact = path.read_bytes()
    flip_bit(path, "data/0")
    with pytest.raises(DamagedFile) as error:
        load_model(path)
    assert str(error.value) == (f"{path}: damaged: CRC-32 check failed for "
                                f"archive/data/0 (changed bits)")
    path.write_bytes(intact[:-100])  # cut short, as by a full disk
    with pytest.raises(DamagedFile, match=r"model_epoch_1\.pt: damaged: truncated"):
        load_file(path)


def test_every_changed_byte_of_the_zip_trailer_counts_as_damage(tmp_path):
    """Flip each byte of the zip's central directory and end record, where names, sizes and
    offsets live. Before, many stopped with "not a clipcore file" (miniz's "unsupported
    multidisk", "invalid header"), or a UnicodeDecodeError or NotImplementedError traceback,
    instead of DamagedFile, on which resuming falls back to the epoch before."""
    path = tmp_path / "weights_epoch_2.pth"
    save_atomic({"epoch": 2, "head": torch.arange(6.0)}, path)
    intact = path.read_bytes()
    assert intact[-22:-18] == b"PK\x05\x06"  # the end record, no comment: 22 bytes
    directory = int.from_bytes(intact[-6:-2], "little")  # where the central directory starts
    outcomes = set()
    for at in range(directory, len(intact)):
        changed = bytearray(intact)
        changed[at] ^= 0xFF
        path.write_bytes(changed)
        try:
            loaded = load_file(path)
        except DamagedFile as exc:
            assert str(exc).startswith(f"{path}: damaged: ") and "\n" not in str(exc)
            outcomes.add("damaged")
        else:  # a field neither reader uses (a timestamp, an attribute): the same content
            assert loaded["epoch"] == 2 and torch.equal(loaded["head"], torch.arange(6.0))
            outcomes.add("loads")
    assert outcomes == {"damaged", "loads"}


def test_failed_serialisation_leaves_the_old_file(tmp_path):
    path = tmp_path / "weights_epoch_1.pth"
    save_atomic({"epoch": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a bug, not a user error
        save_atomic({"epoch": 2, "tensor": torch.zeros(1000), "not data": lambda: None}, path)
    assert load_file(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_disk_full_midway_leaves_the_old_file(tmp_path):
    """A file-size limit makes the write fail part way, as a full disk would (even for root)."""
    path = tmp_path / "weights_epoch_1.pth"
    save_atomic({"epoch": 1}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(ClipcoreError, match=r"weights_epoch_1\.pth: cannot write"):
            save_atomic({"epoch": 2, "tensor": torch.zeros(1_000_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert load_file(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_unwritable_destination_is_reported(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ClipcoreError, match=r"not_a_folder/model_epoch_0\.pt: cannot write"):
        save_atomic({"epoch": 0}, blocker / "model_epoch_0.pt")
