"""Running a stage script: a ClipcoreError becomes one line on stderr and exit status 1."""
from __future__ import annotations

import sys
from typing import Callable

from clipcore.errors import ClipcoreError


def run_stage(main: Callable[[], None]) -> None:
    try:
        main()
    except ClipcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
