"""latentgen's compiled bf16 CPU kernels (latentgen/csrc/) and the torch code each one stands in for.

- `softmax_`: the blocked attention's row softmax, in place with ATen's fast polynomial exp (the probabilities are
  rounded to bf16 right after). torch's bf16 softmax widens, exponentiates to 1 ulp and narrows in separate passes
  into a new tensor. Blocked bf16 SD v1 UNet step (forced on a 2-core AMX machine): 3.99 -> 3.75 s at one thread,
  2.41 -> 2.36 s at two (`benchmarks/openvino_side_by_side.py`, `eager-blocked` against what is now
  `eager-blocked-torch-ops`).
- `geglu`: value * GELU(gate) in one pass over the GEGLU projection (torch: GELU into a new tensor, then the product).
- `group_norm_silu`: the UNet ResBlock's GroupNorm and SiLU, with the timestep embedding's per-channel shift added
  first where there is one, in two passes (torch: three operators, each a full read and write of the feature map).

Each is a drop-in for the torch code it replaces, used only for inference (no autograd through them) on contiguous
(or, for the GroupNorm, channels-last) bf16 CPU tensors, and rounds once where torch rounds after every operator.
Under torch.compile the torch code runs (the compiler fuses it itself).

The kernels are compiled together on first use with torch's C++ extension builder (a C++ compiler is needed; about
a minute, once per machine and torch version, cached where torch keeps its extensions), and used only where the CPU
has AVX2 or AVX-512. Without a compiler, or with `LATENTGEN_NATIVE_KERNELS=0`, or inside
`with native_kernels(False):`, torch's operators run instead (one log line says why, once per process).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from latentgen.nn.switch import Switch

log = logging.getLogger("latentgen.native")

SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = ("bindings.cpp", "softmax_bf16.cpp", "geglu_bf16.cpp", "group_norm_silu_bf16.cpp")
SWITCH = "LATENTGEN_NATIVE_KERNELS"  # "0" turns the compiled kernels off
_CAPABILITIES = ("AVX512", "AVX2")  # ATen's vector widths the kernels are written for

ENABLED: Switch[bool] = Switch(True)


def native_kernels(enabled: bool):
    """Turn the compiled kernels on or off inside a `with` block (to measure them or rule them out)."""
    return ENABLED.set(enabled)


@functools.cache  # tried once per process, built or not
def _build() -> ModuleType | None:
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        log.info("%s=%s: torch's operators instead of latentgen's compiled kernels", SWITCH, os.environ[SWITCH])
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _CAPABILITIES:
        log.info("latentgen's compiled kernels need AVX2 or AVX-512 (this CPU: %s): torch's operators instead",
                 capability)
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
    try:
        log.info("compiling latentgen's bf16 CPU kernels (once per machine, about a minute; %s=0 skips it)", SWITCH)
        return load(f"latentgen_kernels_{variant}", [str(SOURCE_DIR / name) for name in SOURCES],
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers, a failed build: torch's operators are only slower
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("could not compile latentgen's bf16 CPU kernels (%s); torch's operators instead. A C++ "
                    "compiler (g++) makes bf16 inference on the CPU faster; %s=0 silences this", first, SWITCH)
        return None


def kernels() -> ModuleType | None:
    """The compiled kernels' module, or None where they are switched off or cannot be built here. Built on the
    first call of a process."""
    return _build() if ENABLED.value else None


def _takes(*tensors: torch.Tensor | None) -> ModuleType | None:
    """The kernels' module if they may run here: bf16 CPU data (the first tensor) and nothing autograd records.
    Never inside torch.compile: there torch's operators are what the compiler fuses on its own."""
    data = tensors[0]
    if torch.compiler.is_compiling() or data.dtype != torch.bfloat16 or data.device.type != "cpu" \
            or data.numel() == 0 or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                     for t in tensors)):
        return None
    return kernels()  # built on the first call that could use it: float32 and training never trigger the build


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of bf16 CPU scores, in place when the compiled kernel runs (the input's
    values are then gone), else torch's (a new tensor). Either way, use the returned tensor."""
    module = _takes(scores)
    if module is None or not scores.is_contiguous():
        return torch.softmax(scores, dim=-1)
    return module.softmax_bf16_(scores)


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """value * GELU(gate) (exact GELU), value and gate the two halves of the last dimension."""
    module = _takes(projected)
    if module is None or not projected.is_contiguous():
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)
    return module.geglu_bf16(projected)


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm, shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(norm(x + shift[:, :, None, None])) for a (B, C, H, W) map and an optional (B, C) shift; `norm` is an
    affine GroupNorm (its statistics in float32 whatever x's dtype, as GroupNorm32 keeps them)."""
    module = _takes(x, shift, norm.weight, norm.bias)
    layout_ok = x.dim() == 4 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    if module is None or not layout_ok or norm.weight is None or norm.bias is None:
        # In place on the norm's fresh output (its backward needs the norm's input, not its output).
        return F.silu(norm(x if shift is None else x + shift.to(x.dtype)[:, :, None, None]), inplace=True)
    return module.group_norm_silu_bf16(x, norm.num_groups, norm.weight.float().contiguous(),
                                       norm.bias.float().contiguous(), norm.eps,
                                       None if shift is None else shift.float().contiguous())
