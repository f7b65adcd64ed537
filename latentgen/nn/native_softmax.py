"""A compiled bf16 row softmax for the blocked attention on x86 CPUs (latentgen/csrc/softmax_bf16.cpp).

The blocked attention's softmax runs over about 1.4 billion scores per bf16 SD v1 UNet step at 512x512, about
a tenth of the step (benchmarks/README.md). torch's bf16 softmax widens, exponentiates to 1 ulp and narrows in separate passes into a new
tensor; the kernel does it in place with ATen's fast polynomial exp, since the probabilities are rounded to bf16
right after. A bf16 SD v1 UNet step with the blocked attention (forced on a 2-core AMX machine): 3.99 -> 3.75 s
at one thread, 2.41 -> 2.36 s at two (`benchmarks/openvino_side_by_side.py`, configs `eager-blocked` and
`eager-blocked-torch-softmax`). Where the CPU has AMX, torch's flash kernel takes the attention by default and
this kernel is neither built nor used (`latentgen/nn/blocked_attention.py`).

The kernel is compiled on first use with torch's C++ extension builder (a C++ compiler is needed; about 20 s,
once per machine and torch version, cached where torch keeps its extensions), and used only where the CPU has
AVX2 or AVX-512. Without a compiler, or with `LATENTGEN_NATIVE_KERNELS=0`, or inside
`with native_softmax(False):`, torch's softmax runs instead (one log line says why, once per process).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from latentgen.nn.switch import Switch

log = logging.getLogger("latentgen.native")

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "softmax_bf16.cpp"
SWITCH = "LATENTGEN_NATIVE_KERNELS"  # "0" turns the compiled kernels off
_CAPABILITIES = ("AVX512", "AVX2")  # ATen's vector widths the kernel is written for

ENABLED: Switch[bool] = Switch(True)


def native_softmax(enabled: bool):
    """Turn the compiled softmax on or off inside a `with` block (to measure it or rule it out)."""
    return ENABLED.set(enabled)


@functools.cache  # tried once per process, built or not
def _build() -> Callable[[torch.Tensor], torch.Tensor] | None:
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        log.info("%s=%s: torch's softmax in the blocked attention", SWITCH, os.environ[SWITCH])
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _CAPABILITIES:
        log.info("the compiled softmax needs AVX2 or AVX-512 (this CPU: %s): torch's softmax instead", capability)
        return None
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its import warns that a CPU machine has no CUDA
    level, quiet.level = quiet.level, logging.ERROR
    try:
        from torch.utils.cpp_extension import load
    finally:
        quiet.setLevel(level)

    # The instruction sets by name rather than -march=native, so that a build cached in a shared home directory
    # also runs on another machine of the same capability. -fopenmp: at::parallel_for is OpenMP in the header;
    # linked, it resolves to the libgomp.so.1 torch already loaded.
    isa = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
           "AVX2": ["-mavx2", "-mfma", "-mf16c"]}[capability]
    variant = capability.lower()
    if capability == "AVX512" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        isa, variant = isa + ["-mavx512bf16"], variant + "_bf16"  # one instruction rounds 32 floats to bf16
    flags = ["-O3", "-fopenmp", *isa, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    name = f"latentgen_softmax_bf16_{variant}"
    try:
        log.info("compiling latentgen's bf16 softmax kernel (once per machine, about 20 s; %s=0 skips it)", SWITCH)
        return load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False).softmax_bf16_
    except Exception as error:  # no compiler, no headers, a failed build: torch's softmax is only slower
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("could not compile latentgen's bf16 softmax kernel (%s); torch's softmax instead. A C++ "
                    "compiler (g++) makes the blocked bf16 attention faster; %s=0 silences this", first, SWITCH)
        return None


def kernel() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The compiled in-place softmax (contiguous bf16 CPU tensor -> the same tensor), or None where it is
    switched off or cannot be built here. Built on the first call of a process."""
    return _build() if ENABLED.value else None


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of bf16 CPU scores, in place when the compiled kernel runs (the input's
    values are then gone), else torch's (a new tensor). Either way, use the returned tensor."""
    compiled = kernel()
    if compiled is None or not scores.is_contiguous() or scores.dtype != torch.bfloat16 \
            or scores.device.type != "cpu" or scores.numel() == 0:
        return torch.softmax(scores, dim=-1)
    return compiled(scores)
