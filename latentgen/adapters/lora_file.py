"""Reading a LoRA file into low-rank pairs by module name, whichever tool wrote it.

Two layouts are read (facts from kohya-ss sd-scripts `networks/lora.py` and diffusers/PEFT):

- kohya-ss (also A1111, ComfyUI, most shared files): `<name>.lora_down.weight` (rank, in[, kh, kw]),
  `<name>.lora_up.weight` (out, rank[, 1, 1]) and an optional 0-dim `<name>.alpha`; the scale is
  alpha / rank (alpha missing: 1). `<name>` is `lora_unet_...` or `lora_te_...` (`lora_te1_`/`lora_te2_`
  for SDXL's two text encoders): a module path with its dots written as underscores.
- diffusers/PEFT: `<prefix>.<module path>.lora_A.weight` (= down) and `.lora_B.weight` (= up), prefix
  `unet.`, `text_encoder.` or `text_encoder_2.`. The scale is lora_alpha / r from a PEFT config in the
  metadata, an `.alpha` entry per module, or else 1 (the alpha folded into B, as diffusers assumes).

LyCORIS variants (LoHa `hada_*`, LoKr `lokr_*`, Tucker convs `lora_mid`, DoRA `dora_scale`) are refused by
name rather than misread.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from latentgen.errors import AdapterError, CheckpointError
from latentgen.interop.weights_file import WeightsFile

_KOHYA = re.compile(r"^(?P<name>lora_(?:unet|te\d?)_.+)\.(?P<which>lora_down|lora_up)\.weight$")
_PEFT = re.compile(r"^(?P<name>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")
_UNSUPPORTED = {"hada_w1_a": "LoHa (LyCORIS)", "lokr_w1": "LoKr (LyCORIS)", "lora_mid": "LoCon with Tucker "
                "decomposition (lora_mid)", "dora_scale": "DoRA (dora_scale)", "lora.down.weight": "the old diffusers "
                "attention-processor layout (to_q_lora.down.weight)"}


@dataclass
class LowRank:
    """One module's pair: y = W x + scale * up(down(x)), with scale = alpha / rank (times the user's multiplier)."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor    # (out, rank) or (out, rank, 1, 1)
    scale: float        # alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """scale * up @ down as a weight shaped like the target's: (out, in) or (out, in, kh, kw); float32."""
        down, up = self.down.float(), self.up.float().flatten(1)  # up (out, rank)
        if down.ndim == 2:
            return self.scale * (up @ down)
        return self.scale * torch.einsum("or,rihw->oihw", up, down)


@dataclass
class LoRAFile:
    """A file's pairs by module name (kohya's `lora_unet_...`, or PEFT's `unet.<path>`), and its layout."""

    path: Path
    layout: str                    # "kohya" or "peft"
    modules: dict[str, LowRank]


def read_lora_file(path: str | Path) -> LoRAFile:
    """Every low-rank pair of the file at `path`, checked (ranks agree, scales finite); clear errors for a
    missing, empty, foreign or inconsistent file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"LoRA file '{path}' does not exist; check the path")
    try:
        weights = WeightsFile(path)
    except CheckpointError as exc:
        raise AdapterError(f"LoRA file '{path}' cannot be read: {exc}") from None
    keys = weights.keys()
    if not keys:
        raise AdapterError(f"LoRA file '{path}' holds no tensors (an empty file); re-export it from the tool that "
                           f"trained it")
    for marker, what in _UNSUPPORTED.items():
        found = [key for key in keys if marker in key]
        if found:
            raise AdapterError(f"LoRA file '{path}' is in the {what} layout ({found[0]}), which latentgen does not "
                               f"read; it reads kohya-ss LoRA/LoCon (lora_down/lora_up) and diffusers/PEFT "
                               f"(lora_A/lora_B) files")
    kohya = {key: match for key in keys if (match := _KOHYA.match(key))}
    peft = {key: match for key in keys if (match := _PEFT.match(key))}
    if kohya and peft:
        raise AdapterError(f"LoRA file '{path}' mixes kohya-ss (lora_down/lora_up) and PEFT (lora_A/lora_B) keys; "
                           f"save it again in one layout")
    if not kohya and not peft:
        raise AdapterError(f"'{path}' is not a LoRA file: no '<module>.lora_down.weight' (kohya-ss) or "
                           f"'<module>.lora_A.weight' (diffusers/PEFT) keys; first keys: {sorted(keys)[:4]}")
    layout, matches = ("kohya", kohya) if kohya else ("peft", peft)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, match in matches.items():
        which = {"lora_down": "down", "lora_up": "up", "A": "down", "B": "up"}[match["which"]]
        pairs.setdefault(match["name"], {})[which] = weights.tensor(key, torch.float32)
    peft_alpha = _peft_alpha(weights.metadata) if layout == "peft" else None
    modules = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            missing = "up" if "down" in pair else "down"
            raise AdapterError(f"LoRA file '{path}': module '{name}' has no {missing} matrix; the file is incomplete")
        down, up = pair["down"], pair["up"]
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0] \
                or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise AdapterError(f"LoRA file '{path}': module '{name}' has a rank mismatch: down {tuple(down.shape)}, "
                               f"up {tuple(up.shape)} (expected down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]) "
                               f"with the same rank)")
        rank = down.shape[0]
        alpha_key = f"{name}.alpha"
        if alpha_key in weights:
            alpha = float(weights.tensor(alpha_key, torch.float32).reshape(-1)[0])
        elif peft_alpha is not None:
            alpha = peft_alpha(name, rank)
        else:
            alpha = float(rank)  # kohya without alpha, PEFT with alpha folded in: scale 1
        if not torch.isfinite(torch.tensor(alpha)) or not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise AdapterError(f"LoRA file '{path}': module '{name}' holds non-finite values; the file is corrupt")
        modules[name] = LowRank(down, up, alpha / rank)
    weights.release()
    return LoRAFile(path, layout, modules)


def _peft_alpha(metadata: dict[str, str]):
    """alpha(name, rank) from a PEFT LoraConfig stored as JSON in the metadata (diffusers writes one per
    component), or None when the file has none."""
    configs = []
    for value in metadata.values():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(parsed, dict):
            candidates = [parsed, *[v for v in parsed.values() if isinstance(v, dict)]]
            configs += [c for c in candidates if "lora_alpha" in c]
    if not configs:
        return None

    def alpha(name: str, rank: int) -> float:
        for config in configs:
            for pattern, value in (config.get("alpha_pattern") or {}).items():
                if re.search(pattern, name):
                    return float(value)
        return float(configs[0]["lora_alpha"])

    return alpha
