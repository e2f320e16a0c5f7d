"""Running a stage script: a ClipcoreError becomes one line on stderr and exit status 1.

A process of a relaunched stage (clipcore.model.distributed.relaunch) also leaves its error's line in
the relaunch's error folder: the console shows local rank 0 only, and the launcher reports
every process's line.

A stage script takes no arguments (params.yaml holds its settings) but --help, which says what it
does (the script's docstring) and, from dvc.yaml, what it reads and writes.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable

import yaml

from clipcore.errors import ClipcoreError

ERROR_FOLDER = "CLIPCORE_ERROR_FOLDER"  # environment variable naming it, set by the relaunch


def run_stage(main: Callable[[], None]) -> None:
    _read_stage_command_line(main)
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


def _read_stage_command_line(main: Callable[[], None]) -> None:
    """--help (or a stray argument) on a stage script run as `python -m stages.<name>` answers
    before any work: run without its outputs tracked, a stage leaves files DVC refuses to
    overwrite. A command (clipcore.<name>) reads its own command line."""
    script = main.__globals__
    module = getattr(script.get("__spec__"), "name", "")
    if script.get("__name__") != "__main__" or not module.startswith("stages."):
        return
    command = f"python -m {module}"
    parser = argparse.ArgumentParser(
        prog=command, description=(script.get("__doc__") or "").strip(),
        epilog=_stage_io(Path(script["__file__"]).parents[1] / "dvc.yaml", command),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()


def _stage_io(dvc_yaml: Path, command: str) -> str:
    """What dvc.yaml says the stage running `command` reads and writes, for its --help."""
    try:
        stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"].items()
    except (OSError, AttributeError, KeyError, TypeError, yaml.YAMLError):
        stages = []
    name, stage = next(((n, s) for n, s in stages if s.get("cmd") == command), (None, None))
    if stage is None:
        return "It takes no arguments: its settings come from params.yaml."

    def line(label: str, entries) -> str:  # an entry is a path or {path: options}
        names = [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]
        return textwrap.fill(", ".join(names) or "-", width=96, initial_indent=f"  {label:8}",
                             subsequent_indent=" " * 10)
    data = [d for d in stage.get("deps", []) if not d.startswith(("stages/", "clipcore/"))]
    return "\n".join([
        f"dvc.yaml stage '{name}'. It takes no arguments: its settings come from params.yaml.",
        line("reads:", data), line("params:", stage.get("params")),
        line("writes:", stage.get("outs")),
        textwrap.fill(f"Run it as `dvc repro {name}`: DVC then records what it wrote (run alone, "
                      f"it writes the same files outside DVC, and `dvc checkout` then asks for "
                      f"--force).", width=96)])
