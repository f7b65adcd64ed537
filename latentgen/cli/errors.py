"""Turning latentgen's own errors into a one-paragraph message and exit status 1 in the apps."""

from __future__ import annotations

import contextlib
import os
import sys

from latentgen.errors import LatentgenError


@contextlib.contextmanager
def reported():
    """Print LatentgenError and ValueError messages without a traceback, then exit 1.

    These errors describe a bad input and its fix; a traceback would only hide that.
    Set HYDRA_FULL_ERROR=1 (or debug) to see it anyway.
    """
    try:
        yield
    except (LatentgenError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
