"""Running a stage script: a ClipcoreError becomes one line on stderr and exit status 1.

A process of a relaunched stage (clipcore.model.distributed.relaunch) also leaves its error's line in
the relaunch's error folder: the console shows local rank 0 only, and the launcher reports
every process's line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from clipcore.errors import ClipcoreError

ERROR_FOLDER = "CLIPCORE_ERROR_FOLDER"  # environment variable naming it, set by the relaunch


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except ClipcoreError as exc:
        _leave_error_line(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Unexpected (often the echo of another process's failure: a closed connection): its
        # traceback follows as usual, its first line goes to the launcher.
        _leave_error_line(first_line(exc))
        raise


def first_line(exc: BaseException) -> str:
    """An unexpected error in one line: its type and its message's first line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _leave_error_line(line: str) -> None:
    folder = os.environ.get(ERROR_FOLDER)
    if folder:
        (Path(folder) / f"rank_{os.environ.get('RANK', '0')}").write_text(line)
