"""Turning the failures a user can cause or meet into one `error:` line and exit status 1 in the apps."""

from __future__ import annotations

import contextlib
import errno
import os
import sys

from latentgen.errors import LatentgenError

DEBUG_ENV = "LATENTGEN_DEBUG"

# What to do about an operating-system error, by errno.
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space, or write somewhere else (hydra.run.dir=<dir>)",
    errno.EDQUOT: "the disk quota is used up: free space, or write somewhere else (hydra.run.dir=<dir>)",
    errno.EROFS: "the file system is read-only: write somewhere else (hydra.run.dir=<dir>)",
    errno.EACCES: "permission denied: use a path you may write to (hydra.run.dir=<dir>), or change its permissions",
    errno.EPERM: "permission denied: use a path you may write to (hydra.run.dir=<dir>), or change its permissions",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EISDIR: "a directory is where a file was expected: check the path",
    errno.ENOTDIR: "a file is where a directory was expected: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or lower train.num_workers",
}


def debugging() -> bool:
    """Whether the user asked for tracebacks (LATENTGEN_DEBUG=1, or Hydra's own HYDRA_FULL_ERROR=1)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1"


def message(exc: BaseException) -> str:
    """The one line that explains `exc` to the user, with its fix."""
    if isinstance(exc, OSError) and not isinstance(exc, LatentgenError) and exc.errno in _OS_FIXES:
        where = f" '{exc.filename}'" if exc.filename else ""
        return f"cannot use{where}: {_OS_FIXES[exc.errno]} ({exc.strerror})"
    if isinstance(exc, MemoryError) and not isinstance(exc, LatentgenError):
        return ("out of memory: ask for fewer or smaller images (num_images, height, width) or a smaller batch "
                "(train.*.batch_size with train.*.grad_accumulation)")
    return str(exc)


@contextlib.contextmanager
def reported():
    """Print what went wrong as one line, without a traceback, then exit 1.

    latentgen's own errors (bad settings, missing or corrupt files, broken plugins), ValueErrors, and
    operating-system errors (disk full, permissions, missing files) describe a problem and its fix; a
    traceback would only hide that. Set LATENTGEN_DEBUG=1 (or HYDRA_FULL_ERROR=1) to see it anyway.
    """
    try:
        yield
    except (LatentgenError, ValueError, OSError, MemoryError) as exc:
        if debugging():
            raise
        print(f"error: {message(exc)}".replace("\n", " "), file=sys.stderr)
        sys.exit(1)
