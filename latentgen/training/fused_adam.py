"""Adam(W) through torch's fused kernel where it has one: one pass over the parameters instead of a dozen
foreach passes (benchmarks/optimizer_step.py, one thread: the shapes demo's stage-2 optimizer step 18.5 -> 7.9 ms,
its whole training step 1.06x faster)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

# The devices whose fused Adam kernel torch ships (for floating-point parameters, all on one device).
FUSED_DEVICES = ("cpu", "cuda")


def fused_option(parameters: Sequence[torch.Tensor]) -> dict[str, bool]:
    """{"fused": True} when every parameter can take the fused step, else {} (torch's default, foreach)."""
    devices = {p.device for p in parameters}
    usable = len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES and \
        all(p.dtype.is_floating_point for p in parameters)
    return {"fused": True} if usable else {}


def adam(optimizer_class: type[torch.optim.Optimizer], parameters: Iterable[torch.Tensor],
         **options: Any) -> torch.optim.Optimizer:
    """`optimizer_class` (torch.optim.Adam or AdamW) over `parameters` with `options`, fused where it can be."""
    parameters = list(parameters)
    return optimizer_class(parameters, **options, **fused_option(parameters))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, then each per-parameter state tensor laid out like its parameter.

    The fused kernel walks a parameter, its gradient and its moments as raw memory, assuming one layout: a
    channels-last conv weight whose saved moments come back contiguous (a training state file keeps no
    layout) would be updated with the wrong elements' moments. The foreach step reads by index either way."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            moments = optimizer.state.get(parameter, {})
            for name, value in moments.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    moments[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
