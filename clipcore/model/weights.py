"""Where a model's base weights come from: an open_clip tag (from the local Hugging Face cache, or
the hub after a quick probe that it answers), a local weights file, or none (random init).
Offline, a tag that is not cached stops within seconds with one line that says what to do."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import requests
from huggingface_hub import try_to_load_from_cache

from clipcore.errors import ClipcoreError
from clipcore.files import file_sha256

NO_WEIGHTS = "none"
HUB_PROBE_TIMEOUT_S = 3.0
DEFAULT_HUB = "https://huggingface.co"
# What open_clip looks for in a hub repo whose tag names no file (safetensors preferred).
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Weights:
    """How to ask open_clip for the base weights."""
    source: str | None                 # open_clip's `pretrained=`: a tag, a file, or None (random)
    quick_gelu: bool = False           # the weights were trained with QuickGELU (OpenAI's)
    preprocess: dict = field(default_factory=dict)  # the tag's image mean/std/interpolation
    sha256: str | None = None          # of a local file, so checkpoints can verify their base


def resolve_weights(name: str, pretrained: str) -> Weights:
    if pretrained == NO_WEIGHTS:
        return Weights(None)
    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if tag:
        preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
        # A cached file is handed to open_clip as a path, so nothing asks the hub for updates.
        source = _cached_hub_file(tag["hf_hub"])
        if source is None:
            _require_hub(name, pretrained)
            source = pretrained
        return Weights(source, tag.get("quick_gelu", False), preprocess)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return Weights(str(path), sha256=file_sha256(path))
    if "/" in pretrained or os.sep in pretrained or path.suffix:
        raise ClipcoreError(f"model.pretrained: weights file {pretrained} not found")
    tags = open_clip.list_pretrained_tags_by_model(name)
    known = f"tags for {name}: {', '.join(tags[:6])}" if tags else f"no tags exist for {name}"
    raise ClipcoreError(
        f"model.pretrained: {pretrained!r} is neither a weights file nor a known tag "
        f"({known}; or none for random init)")


def load_failure(exc: Exception) -> str:
    message = str(exc).strip()
    if "Weights only load failed" in message:
        return ("the file holds Python objects besides tensors, which weights_only loading refuses "
                "(OpenAI's TorchScript .pt files are like that: use the tag or a state dict)")
    return message.splitlines()[0] if message else type(exc).__name__


def _cached_hub_file(hf_hub: str) -> str | None:
    """The local copy of a tag's hub weights, if a previous run downloaded them."""
    repo_id, filename = os.path.split(hf_hub)
    candidates = [filename] if filename else HUB_WEIGHT_FILES
    for candidate in candidates:
        cached = try_to_load_from_cache(repo_id, candidate)
        if isinstance(cached, str):
            return cached
    return None


def _require_hub(name: str, tag: str) -> None:
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_HUB
    reason = _hub_unreachable(endpoint)
    if reason:
        raise ClipcoreError(
            f"model.pretrained: the {tag!r} weights for {name} are not in the local cache and the "
            f"model hub {endpoint} is unreachable ({reason}); connect once so they get cached, "
            f"or set model.pretrained to a local weights file, or to none (random init)")


def _hub_unreachable(endpoint: str) -> str | None:
    """Why the hub cannot be reached, or None when it answers HTTP (any status will do)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    outcome = [f"no answer within {HUB_PROBE_TIMEOUT_S:g} s"]

    def probe():
        # A real request, not a bare TCP connect: proxies and interceptors that accept any
        # connection but fail TLS or HTTP would otherwise pass, then stall in the hub's retries.
        try:
            requests.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S, allow_redirects=False)
            outcome[0] = None
        except requests.RequestException as exc:
            outcome[0] = _root_cause(exc)

    # In a thread because name resolution ignores request timeouts and can hang far longer.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return outcome[0]


def _root_cause(exc: BaseException) -> str:
    """The innermost error's message, on one line (requests wraps urllib3 wraps socket errors)."""
    while exc.__context__ is not None or exc.__cause__ is not None:
        exc = exc.__cause__ or exc.__context__
    return " ".join(str(exc).split()) or type(exc).__name__
