"""Saving and loading model files and checkpoints: atomic writes, safe reads.

Every read goes through `torch.load(weights_only=True)`, which refuses pickled code, after a check
of the zip archive's CRC-32 checksums: torch.load does not check them, so a flipped bit would load
as a changed tensor. Every write goes to a temporary file in the target folder and is renamed
over the target only once complete, so an interrupted run never leaves a half-written file under
a real name.

A model file (`model_epoch_X.pt`) holds what inference needs on top of the base weights: the head,
and the visual tower only when training changed it. A frozen run's file is about a megabyte.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from clipcore.errors import ClipcoreError
from clipcore.files import write_atomic
from clipcore.model.factory import FineTunedCLIP, build_model
from clipcore.params import ModelParams

# /2: the head standardises its input (head.mean, head.std) and files name its kind; a /1 file
# holds a head of other tensors.
MODEL_FORMAT = "clipcore-model/2"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_STRUCTURE_DAMAGE = "failed reading zip archive"  # torch's reader: not the zip it once was
_FOLDER, _ENCRYPTED = 0x10, 0x1  # an entry's external attribute and flag bits
_END_RECORD_SIZE, _ZIP64 = 22, 0xFFFF  # zip64 archives count their entries elsewhere


class DamagedFile(ClipcoreError):
    """A file that was a complete torch archive once and is not any more (cut short, bits
    changed): unlike a foreign or incompatible file, an older copy may serve instead."""


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A dict saved by save_atomic, read with weights_only=True; ClipcoreError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ClipcoreError(f"{path}: file not found")
    check_archive(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a sound archive that torch can't read: another format or version
        message = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in message:
            raise ClipcoreError(
                f"{path}: not a safe checkpoint (it holds Python objects other than tensors and "
                f"plain data, numpy values included; refusing to unpickle it)") from exc
        reason = (message.splitlines() or [type(exc).__name__])[0]
        if _STRUCTURE_DAMAGE in message or isinstance(exc, UnicodeDecodeError):
            # torch's zip reader refusing an archive that Python's read whole: a field only it
            # checks changed (beyond _directory_problem's), a file of ours that took damage.
            raise DamagedFile(f"{path}: damaged: corrupt zip directory ({reason})") from None
        raise ClipcoreError(f"{path}: not a clipcore file ({reason})") from exc
    if not isinstance(obj, dict):
        raise ClipcoreError(f"{path}: not a clipcore file (holds a {type(obj).__name__}, not a dict)")
    return obj


def check_archive(path: Path) -> None:
    """DamagedFile when a torch archive is cut short or fails its CRC-32 check (reads it all);
    ClipcoreError when the file is no torch archive at all."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ClipcoreError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise ClipcoreError(f"{path}: not a clipcore file (not a torch zip archive)")
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
                odd = _directory_problem(archive, f)
        # Beyond BadZipFile, a damaged directory makes zipfile seek before the start (OSError),
        # misread a name (UnicodeDecodeError), a version or method (NotImplementedError) or
        # an encryption flag (RuntimeError).
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError,
                RuntimeError) as exc:
            raise DamagedFile(f"{path}: damaged: truncated or corrupt zip archive "
                              f"({type(exc).__name__}: {exc})") from None
    if odd is not None:
        raise DamagedFile(f"{path}: damaged: corrupt zip directory ({odd})")
    if bad is not None:
        raise DamagedFile(f"{path}: damaged: CRC-32 check failed for {bad} (changed bits)")


def _directory_problem(archive: zipfile.ZipFile, f) -> str | None:
    """Fields of the zip directory that Python's reader skips and torch's obeys: torch writes
    one disk, no folders and no encryption, and an end record that counts every entry."""
    entries = archive.infolist()
    for info in entries:
        if info.volume or info.external_attr & _FOLDER or info.flag_bits & _ENCRYPTED:
            return f"{info.filename} marked as on another disk, a folder or encrypted"
    f.seek(-_END_RECORD_SIZE, os.SEEK_END)
    end = f.read(_END_RECORD_SIZE)
    if end.startswith(b"PK\x05\x06"):  # no archive comment: the end record ends the file
        disk, directory_disk, here, total = struct.unpack("<4H", end[4:12])
        if disk or directory_disk or (total != _ZIP64 and (here, total) != (len(entries),) * 2):
            return "the end record's disk numbers or entry counts changed"
    return None


def inference_state(model: FineTunedCLIP, backbone_trained: bool) -> dict:
    """What embedding images needs beyond the base weights (the visual tower only if trained),
    the WiSE-FT alpha its weights are already mixed at, if they are (best/model.pt), and the
    crop its training images had (data.crop), where recorded."""
    state = model.head_state()
    if backbone_trained:
        state.update(model.backbone_state())
    mixed = {} if model.wise_ft_alpha == 1.0 else {"wise_ft_alpha": model.wise_ft_alpha}
    crop = {} if model.image_crop is None else {"crop": dict(model.image_crop)}
    return {**mixed, **crop,
        "format": MODEL_FORMAT,
        "model": {"name": model.base["name"], "pretrained": model.base["pretrained"],
                  "embed_dim": model.embed_dim, "dropout": model.head.dropout.p,
                  "head": model.head_kind},
        "base": dict(model.base),
        "backbone_trained": backbone_trained,
        "state": {k: v.detach().cpu() for k, v in state.items()},
    }


def save_model(model: FineTunedCLIP, path: str | Path, backbone_trained: bool, epoch: int) -> None:
    save_atomic({**inference_state(model, backbone_trained), "epoch": epoch}, path)


def load_model_params(path: str | Path) -> ModelParams:
    """The model params a model file was made with, without building the model."""
    return read_model_file(path, "cpu")[1]


def backbone_was_trained(path: str | Path) -> bool:
    """Whether a model file's visual tower trained, read without its tensors (torch.load maps
    them, mmap): how the embed stage knows, before its first pass, whether passes will follow.
    A file that doesn't read so is read whole, which names what is wrong with it."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_file says what is wrong, or reads it another way
        data = load_file(path)
    return bool(isinstance(data, dict) and data.get("backbone_trained"))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> FineTunedCLIP:
    """Rebuild the base model, check it is the one the file was made on, apply the stored tensors."""
    return load_model_file(path, device)[0]


def load_model_file(path: str | Path,
                    device: str | torch.device = "cpu") -> tuple[FineTunedCLIP, bool]:
    """load_model's model, and whether the file's visual tower was trained (one read of the file)."""
    data, params = read_model_file(path, device)
    return load_into(build_base(path, params, device), path, data)


def build_base(path: str | Path, params: ModelParams, device) -> FineTunedCLIP:
    """The untouched model a model file (read_model_file: its params) was made on."""
    try:
        return build_model(params, device)
    except ClipcoreError as exc:
        raise ClipcoreError(f"{path}: cannot rebuild its base model: {exc}") from exc


def load_into(model: FineTunedCLIP, path: str | Path, data: dict) -> tuple[FineTunedCLIP, bool]:
    """`model` (its base's, built by build_base) with a model file's tensors (read_model_file:
    `data`) applied in place, and whether the file's visual tower was trained. The tensors the
    file doesn't hold stay as they are: the base's, in a model that held no other file's."""
    name = data["model"]["name"]  # read_model_file checked the params already
    if model.base != data["base"]:
        raise ClipcoreError(
            f"{path}: made on base weights {_describe_base(data['base'])}, but they now read "
            f"{_describe_base(model.base)}; restore the original weights file or retrain")
    expected = set(model.head_state()) | (
        set(model.backbone_state()) if data["backbone_trained"] else set())
    stored = set(data["state"])
    if stored != expected:
        odd = sorted(stored ^ expected)
        raise ClipcoreError(
            f"{path}: tensors do not match a {name} model ({len(odd)} differ, e.g. {odd[0]})")
    try:
        model.load_state_dict(data["state"], strict=False)
    except RuntimeError as exc:
        raise ClipcoreError(
            f"{path}: tensors do not fit a {name} model ({str(exc).splitlines()[-1].strip()})"
        ) from exc
    model.wise_ft_alpha = float(data.get("wise_ft_alpha", 1.0))
    model.image_crop = data.get("crop")  # absent in files from before it was recorded
    return model.eval(), bool(data["backbone_trained"])


def read_model_file(path: str | Path, device) -> tuple[dict, ModelParams]:
    """A model file's contents (tensors on `device`) and the model params it was made with."""
    data = load_file(path, map_location=device)
    found = data.get("format")
    if found != MODEL_FORMAT:
        if isinstance(found, str) and found.split("/")[0] == MODEL_FORMAT.split("/")[0]:
            raise ClipcoreError(
                f"{path}: a model file of another clipcore version (format {found!r}, this one "
                f"reads {MODEL_FORMAT!r}: the head's tensors differ); make it again with this "
                f"version (dvc repro train)")
        raise ClipcoreError(f"{path}: not a clipcore model file (format {found!r}, "
                            f"expected {MODEL_FORMAT!r})")
    missing = sorted({"model", "base", "backbone_trained", "state"} - set(data))
    if missing:
        raise ClipcoreError(f"{path}: damaged clipcore model file (no {missing[0]!r} entry)")
    try:
        return data, ModelParams(**data["model"])
    except TypeError as exc:
        raise ClipcoreError(f"{path}: damaged clipcore model file (model params: {exc})") from exc


def _describe_base(base: dict) -> str:
    digest = f", sha256 {base['sha256'][:12]}" if base.get("sha256") else ""
    return f"{base.get('name')} {base.get('pretrained')!r}{digest}"
