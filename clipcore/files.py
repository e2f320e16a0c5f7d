"""Writing output files atomically: a reader (or a resumed run) sees either the previous file or
the complete new one, never a half-written file under a real name."""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from clipcore.errors import ClipcoreError


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    # A unique name in the same folder (os.replace is atomic only within one file system);
    # opened "x" so it gets the usual permissions, unlike tempfile's private 0600 files.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # it may never have been created
            tmp.unlink()
        cause = _os_error(exc)
        if cause is not None:
            raise ClipcoreError(f"{path}: cannot write ({cause.strerror or cause})") from exc
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: torch's zip writer reports a failed write as a RuntimeError."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc
