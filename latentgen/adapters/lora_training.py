"""A new LoRA to train (Hu et al. 2021): zero-initialised low-rank branches on a loaded model's modules, the
only parameters that require gradients, written as a kohya-ss file that the `lora` adapter (and A1111, ComfyUI,
diffusers) read.

    adapter = registry.build("adapter", "trainable_lora", rank=8, modules="attention")
    pipe.requires_grad_(False); pipe.attach(adapter)      # latentgen-train experiment=lora does this
    ... train adapter.parameters() ...
    adapter.save("style.safetensors")

Each branch is a child module `lora` of the module it patches (`lora_down`, `lora_up`: kohya's names and
shapes, a conv branch keeping the target's kernel, stride and padding), added to its output by a forward
hook that reads the module's own child, so a copy of the model carries its branches. `up` starts at zero:
the model computes exactly what it did until the first update. `modules`: "attention" (the Linears and 1x1
convs of the transformer blocks, kohya's default), or "all" (every Linear and conv, LoCon). `text_encoder`:
also the Linears of the CLIP text towers (an OpenCLIP tower's fused q/k/v projection is left out).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from latentgen.adapters.module_names import kohya_names, lora_targets
from latentgen.checkpoint import save_tensors
from latentgen.contracts.adapter import Adapter
from latentgen.errors import AdapterError

CHILD = "lora"
# Module paths of the transformer blocks' projections (UNet: transformer_blocks, proj_in/out; DiT: attn, mlp).
_ATTENTION = re.compile(r"(^|\.)(transformer_blocks|proj_in|proj_out|attn|attn1|attn2|mlp|ff)(\.|$)")


class LowRankBranch(nn.Module):
    """scale * up(down(x)) with down shaped like the target (a conv keeps its kernel, stride and padding)."""

    def __init__(self, target: nn.Module, rank: int, alpha: float):
        super().__init__()
        weight = target.weight
        factory = {"device": weight.device, "dtype": torch.float32}
        if isinstance(target, nn.Conv2d):
            self.lora_down = nn.Conv2d(target.in_channels, rank, target.kernel_size, target.stride, target.padding,
                                       target.dilation, bias=False, **factory)
            self.lora_up = nn.Conv2d(rank, target.out_channels, 1, bias=False, **factory)
        else:
            self.lora_down = nn.Linear(target.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # nn.Linear's own initialisation
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))


def _hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, CHILD)(inputs[0]).to(output.dtype)


class TrainableLoRA(Adapter):
    """New low-rank branches to train: `rank`, `alpha` (default: rank, i.e. scale 1), `modules`, `text_encoder`."""

    file_name = "lora.safetensors"  # what a training run calls the file it writes

    def __init__(self, rank: int = 4, alpha: float | None = None, modules: str = "attention",
                 text_encoder: bool = False):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"trainable_lora: rank must be a positive integer; got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"trainable_lora: alpha must be a positive number; got {alpha!r}")
        if modules not in ("attention", "all"):
            raise ValueError(f"trainable_lora: modules={modules!r}; choose 'attention' (the transformer blocks' "
                             f"projections) or 'all' (every Linear and conv: LoCon)")
        self.rank, self.alpha, self.modules, self.text_encoder = rank, alpha, modules, bool(text_encoder)
        self.branches: dict[str, LowRankBranch] = {}  # module path -> its branch
        self._hooks: list[Any] = []
        self._names: dict[str, str] = {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "modules": self.modules,
                "text_encoder": self.text_encoder}

    def parameters(self) -> list[nn.Parameter]:
        return [p for branch in self.branches.values() for p in branch.parameters()]

    def _chosen(self, pipeline) -> dict[str, nn.Module]:
        chosen = {}
        for target in lora_targets(pipeline).values():
            if target.rows is not None or target.path in chosen:
                continue
            if target.part == "text":
                if self.text_encoder:
                    chosen[target.path] = target.module
                continue
            module, path = target.module, target.path[len("denoiser."):]
            small = not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1)
            if self.modules == "all" or (small and _ATTENTION.search(path)):
                chosen[target.path] = module
        return chosen

    def check(self, pipeline) -> None:
        chosen = self._chosen(pipeline)
        if not chosen:
            raise AdapterError(f"trainable_lora (modules={self.modules}) finds no module to train in this pipeline's "
                               f"denoiser '{pipeline.denoiser.name}'; try modules=all")
        taken = [path for path, module in chosen.items() if hasattr(module, CHILD)]
        if taken:
            raise AdapterError(f"{taken[0]} already carries a trainable LoRA: detach that one first")

    def apply(self, pipeline) -> None:
        self._names = kohya_names(pipeline)
        for path, module in self._chosen(pipeline).items():
            branch = self.branches.get(path) or LowRankBranch(module, self.rank, self.alpha)
            branch.to(module.weight.device)
            self.branches[path] = branch
            module.add_module(CHILD, branch)
            self._hooks.append(module.register_forward_hook(_hook))

    def remove(self, pipeline) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for path in self.branches:
            module = _module(pipeline, path)
            if module is not None and CHILD in module._modules:
                del module._modules[CHILD]

    # ---- what a run saves ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{path}.{key}": value for path, branch in self.branches.items()
                for key, value in branch.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if set(state) != set(mine):
            raise AdapterError(f"trainable_lora: the saved branches ({len(state)} tensors) are not this adapter's "
                               f"({len(mine)}); resume with the same rank, modules and text_encoder")
        for path, branch in self.branches.items():
            branch.load_state_dict({key: state[f"{path}.{key}"] for key in branch.state_dict()})

    def save(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """The branches as a kohya-ss LoRA file (atomically): `<name>.lora_down.weight`, `.lora_up.weight`,
        `.alpha`, with kohya's `ss_*` metadata."""
        if not self.branches:
            raise AdapterError("trainable_lora: nothing to save; attach it to a pipeline first")
        tensors = {}
        for module_path, branch in self.branches.items():
            name = self._names[module_path]
            tensors[f"{name}.lora_down.weight"] = branch.lora_down.weight.detach().float()
            tensors[f"{name}.lora_up.weight"] = branch.lora_up.weight.detach().float()
            tensors[f"{name}.alpha"] = torch.tensor(self.alpha)
        header = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                  "ss_network_alpha": str(self.alpha), "latentgen.adapter": self.describe(), **(metadata or {})}
        return save_tensors(path, tensors, header)


def _module(pipeline, path: str) -> nn.Module | None:
    part, _, rest = path.partition(".")
    try:
        return getattr(pipeline, part).get_submodule(rest)
    except AttributeError:
        return None
