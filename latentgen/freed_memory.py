"""Keep freed memory in the process, so that every denoiser step reuses pages already mapped (Linux, glibc).

glibc's malloc serves each block of 32 MiB or more (SD v1's GEGLU activations are 42 MiB at 512x512) with a
fresh mmap and returns it to the kernel on free, so the next step faults every page in again: about 150,000
page faults per bf16 SD v1 UNet step at 512x512 (600 MiB of zeroed pages), measured with getrusage. On a
virtual machine a fault is expensive and its cost varies with the host: on the project's 2-core CPU, in one run of
benchmarks/openvino_side_by_side.py (config `eager-malloc-as-is` against `eager`), a step took 3.96 -> 3.79 s at
one thread and 2.37 -> 2.12 s at two with the memory kept. OpenVINO plans its memory once per model and never
meets this.

`reuse_freed_memory()` tells glibc to take every block from its heap (M_MMAP_MAX = 0) and not to give the heap's
top back below 2 GiB (M_TRIM_THRESHOLD): the process keeps the high-water mark of its memory, which an inference
process reaches in its first step anyway. It is process-wide and stays on; `load_pipeline` applies it for a CPU
pipeline unless `reuse_memory=False`. Elsewhere (no glibc) it does nothing. `return_freed_memory()` is the
other direction, for a moment when much memory was freed for good (the int8 adapter dropping float weights).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger("latentgen.memory")

# glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest the C int parameter takes: 2 GiB


@functools.cache  # once per process: the setting is process-wide and stays
def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (see the module docstring); True where it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    version, mallopt = libc.gnu_get_libc_version, libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    version.restype = ctypes.c_char_p
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        log.info("glibc %s refused the malloc settings: freed memory goes back to the kernel as before",
                 version().decode())
        return False
    log.info("freed memory stays in the process (glibc malloc: no mmap per large block, heap kept up to 2 GiB "
             "above its top): no page faults for each step's activations; load_pipeline(reuse_memory=False) "
             "leaves malloc as it is")
    return True


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (musl's mallopt and malloc_trim are stubs), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system now (malloc_trim), e.g. after dropping a model's weights for good:
    SD v1's bf16 UNet measured 3.5 GiB resident after the int8 adapter freed its float weights, 2.05 GiB trimmed.
    A no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
