"""The names other tools give a pipeline's modules, so a LoRA file's names can be looked up.

LoRA files name the module each pair patches in the layout of the tool that trained it: kohya-ss writes
`lora_unet_` + the diffusers `UNet2DConditionModel` path for SD v1/v2 (and the original LDM path for SDXL,
whose kohya names follow sgm), `lora_te_` (`lora_te1_`, `lora_te2_`) + the transformers `CLIPTextModel` path;
diffusers/PEFT writes `unet.<diffusers path>` and `text_encoder.<transformers path>`. Module names contain
underscores themselves, so a name is never split: the table is built from the pipeline's own modules, every
foreign name each could have, then names are looked up in it (as A1111 and ComfyUI do).

latentgen's UNet uses the original LDM names (`input_blocks.4.1.proj_in`); the diffusers path follows from
the block structure (facts from diffusers' single-file conversion): `input_blocks.n.0` is
`down_blocks.i.resnets.j`, `input_blocks.n.1` `down_blocks.i.attentions.j`, a downsampling block
`down_blocks.i.downsamplers.0`; `middle_block.{0,1,2}` `mid_block.{resnets.0, attentions.0, resnets.1}`;
`output_blocks.n.*` `up_blocks.i.*` in reverse level order; inside a ResBlock `in_layers.2` is `conv1`,
`out_layers.3` `conv2`, `emb_layers.1` `time_emb_proj`, `skip_connection` `conv_shortcut`. OpenCLIP text
towers (SD v2, SDXL's second) fuse q, k and v into `attn.in_proj_weight`: their transformers names point at
row slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_OPENCLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class Target:
    """A module a LoRA pair can patch: a Linear or Conv2d, or rows of a fused q/k/v projection."""

    path: str                 # its path in the pipeline: "denoiser.input_blocks.1.1.proj_in"
    module: nn.Module
    part: str                 # "unet" or "text": which multiplier applies
    rows: slice | None = None  # for a fused projection: the rows of q, k or v in `in_proj_weight`

    @property
    def weight(self):
        return self.module.in_proj_weight if self.rows is not None else self.module.weight

    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this target's pair must produce."""
        weight = self.weight
        return tuple(weight[self.rows].shape) if self.rows is not None else tuple(weight.shape)


def lora_targets(pipeline) -> dict[str, Target]:
    """Every name a LoRA file may use for a patchable module of `pipeline` (kohya-ss and PEFT, UNet and text
    towers) -> the target."""
    table: dict[str, Target] = {}
    blocks = unet_blocks(pipeline.denoiser)
    for path, module in pipeline.denoiser.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        target = Target(f"denoiser.{path}", module, "unet")
        names = {path}
        diffusers = unet_diffusers_path(pipeline.denoiser, path, blocks)
        if diffusers:
            names.add(diffusers)
        for name in names:
            table["lora_unet_" + name.replace(".", "_")] = target
            table["unet." + name] = target
    towers = text_towers(pipeline.conditioner)
    for index, (tower_path, tower) in enumerate(towers):
        kohya = "lora_te_" if len(towers) == 1 else f"lora_te{index + 1}_"
        peft = "text_encoder." if index == 0 else f"text_encoder_{index + 1}."
        for name, target in _tower_names(f"conditioner.{tower_path}", tower).items():
            table[kohya + name.replace(".", "_")] = target
            table[peft + name] = target
    return table


def kohya_names(pipeline) -> dict[str, str]:
    """Each patchable module's path -> the kohya-ss name other tools read: `lora_unet_` + the diffusers path for
    SD v1/v2 (the original LDM path for SDXL, as sgm-era trainers write it, and for a denoiser diffusers has no
    name for), `lora_te_` (`lora_te1_`/`lora_te2_`) + the transformers path for a text tower's Linears."""
    sdxl = len(text_towers(pipeline.conditioner)) == 2
    blocks = unet_blocks(pipeline.denoiser)
    names: dict[str, str] = {}
    for name, target in lora_targets(pipeline).items():
        if not name.startswith("lora_") or target.rows is not None:
            continue
        if target.part == "unet":
            path = target.path[len("denoiser."):]
            diffusers = unet_diffusers_path(pipeline.denoiser, path, blocks)
            name = "lora_unet_" + (path if sdxl or diffusers is None else diffusers).replace(".", "_")
        names[target.path] = name
    return names


def text_towers(conditioner: nn.Module) -> list[tuple[str, nn.Module]]:
    """The CLIP / OpenCLIP text transformers inside a conditioner (a stack's in its order), with their paths."""
    from latentgen.text.clip_text_model import CLIPTextTransformer
    from latentgen.text.openclip_text_model import OpenCLIPTextTower

    return [(path, module) for path, module in conditioner.named_modules()
            if isinstance(module, (CLIPTextTransformer, OpenCLIPTextTower))]


def _tower_names(prefix: str, tower: nn.Module) -> dict[str, Target]:
    """transformers `CLIPTextModel` names (`text_model.encoder.layers.0.self_attn.q_proj`) -> targets."""
    from latentgen.text.openclip_text_model import OpenCLIPTextTower

    names = {}
    if isinstance(tower, OpenCLIPTextTower):
        for index, block in enumerate(tower.transformer.resblocks):
            layer = f"text_model.encoder.layers.{index}."
            path = f"{prefix}.transformer.resblocks.{index}."
            width = block.attn.in_proj_weight.shape[1]
            for i, which in enumerate("qkv"):
                names[f"{layer}self_attn.{which}_proj"] = Target(path + "attn", block.attn, "text",
                                                                 slice(i * width, (i + 1) * width))
            for ours, theirs in _OPENCLIP.items():
                names[layer + theirs] = Target(path + ours, block.get_submodule(ours), "text")
        return names
    for path, module in tower.named_modules():
        if isinstance(module, nn.Linear):
            names[f"text_model.{path}"] = Target(f"{prefix}.{path}", module, "text")
    return names


def unet_diffusers_path(unet: nn.Module, path: str, blocks: dict[str, str] | None = None) -> str | None:
    """The diffusers `UNet2DConditionModel` path of a module of latentgen's (LDM-layout) UNet, or None.
    `blocks`: `unet_blocks(unet)`, when asking for many paths."""
    blocks = unet_blocks(unet) if blocks is None else blocks
    for ours, theirs in sorted(blocks.items(), key=lambda item: -len(item[0])):
        if path == ours or path.startswith(ours + "."):
            rest = path[len(ours) + 1:]
            if "resnets" in theirs.split("."):
                for inner, name in _RESBLOCK.items():
                    if rest == inner or rest.startswith(inner + "."):
                        rest = name + rest[len(inner):]
                        break
            return f"{theirs}.{rest}" if rest else theirs
    return None


def unet_blocks(unet: nn.Module) -> dict[str, str]:
    """LDM block paths -> diffusers block paths, walked from the UNet's own structure."""
    from latentgen.denoisers.unet import Downsample, Upsample
    from latentgen.nn.attention import SpatialTransformer

    if not hasattr(unet, "input_blocks"):
        return {}
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    level = block = 0
    for n, layers in enumerate(unet.input_blocks):
        if n == 0:
            continue
        if isinstance(layers[0], Downsample):
            table[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, block = level + 1, 0
            continue
        table[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{block}"
        if len(layers) > 1 and isinstance(layers[1], SpatialTransformer):
            table[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{block}"
        block += 1
    level = block = 0
    for n, layers in enumerate(unet.output_blocks):
        table[f"output_blocks.{n}.0"] = f"up_blocks.{level}.resnets.{block}"
        upsampled = False
        for k, layer in enumerate(layers):
            if isinstance(layer, SpatialTransformer):
                table[f"output_blocks.{n}.{k}"] = f"up_blocks.{level}.attentions.{block}"
            elif isinstance(layer, Upsample):
                table[f"output_blocks.{n}.{k}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
                upsampled = True
        level, block = (level + 1, 0) if upsampled else (level, block + 1)
    return table
