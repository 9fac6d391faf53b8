"""Shared plumbing for the stage entry points: device choice and one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from .errors import UserError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(main: Callable[[], None]) -> None:
    """Run a stage; bad input ends it with one line on stderr and exit status 1, not a traceback."""
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished outputs and the last checkpoint are kept; rerun to resume")
