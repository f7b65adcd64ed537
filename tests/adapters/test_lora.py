"""LoRA: the golden kohya-ss and PEFT files on sd-tiny (merged and unmerged, both multipliers, to 1e-4), exact
detach, switchable scale, several at once, the name tables for SD v1, v2 and SDXL, and every bad file refused
before anything is attached."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.adapters.module_names import lora_targets, unet_diffusers_path
from latentgen.denoisers.unet import UNet
from latentgen.errors import AdapterError, ConfigError

FILES = ("kohya", "peft")


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unet_out(pipe, io):
    with torch.no_grad():
        return pipe.denoiser(io["unet.x"], io["unet.t"], {"crossattn": io["unet.context"]})


def clip_out(pipe, io):
    with torch.no_grad():
        return pipe.conditioner.encode_ids(io["clip.input_ids"])


def lora(golden, layout="kohya", **options):
    return registry.build("adapter", "lora", path=golden / f"lora-tiny-{layout}.safetensors", **options)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("layout", FILES)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_golden_outputs(sd_tiny, golden, lora_io, layout, merge, multiplier):
    adapter = sd_tiny.attach(lora(golden, layout, scale=multiplier, merge=merge))
    assert len(adapter._plan) == 108  # 96 UNet modules (LoCon convs included) and 12 text Linears
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io[f"unet.out_lora_{multiplier}"]) < 1e-4
    assert rel_err(clip_out(sd_tiny, lora_io), lora_io[f"clip.last_hidden_state_lora_{multiplier}"]) < 1e-4


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_detach_restores_every_weight_and_output_bit_for_bit(sd_tiny, golden, lora_io, merge):
    before = {name: value.clone() for name, value in sd_tiny.denoiser.state_dict().items()}
    before_text = {name: value.clone() for name, value in sd_tiny.conditioner.state_dict().items()}
    unet, text = unet_out(sd_tiny, lora_io), clip_out(sd_tiny, lora_io)
    adapter = sd_tiny.attach(lora(golden, merge=merge))
    assert not torch.equal(unet_out(sd_tiny, lora_io), unet)
    sd_tiny.detach(adapter)
    assert sd_tiny.adapters == []
    assert all(torch.equal(before[name], value) for name, value in sd_tiny.denoiser.state_dict().items())
    assert all(torch.equal(before_text[name], value) for name, value in sd_tiny.conditioner.state_dict().items())
    assert torch.equal(unet_out(sd_tiny, lora_io), unet) and torch.equal(clip_out(sd_tiny, lora_io), text)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_unet_and_text_multipliers_are_separate_and_switchable(sd_tiny, golden, lora_io, merge):
    base_text = clip_out(sd_tiny, lora_io)
    adapter = sd_tiny.attach(lora(golden, scale=1.0, text_scale=0.0, merge=merge))
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io["unet.out_lora_1.0"]) < 1e-4
    assert torch.allclose(clip_out(sd_tiny, lora_io), base_text, atol=1e-6)
    adapter.scale, adapter.text_scale = 0.5, None  # text follows scale again
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io["unet.out_lora_0.5"]) < 1e-4
    assert rel_err(clip_out(sd_tiny, lora_io), lora_io["clip.last_hidden_state_lora_0.5"]) < 1e-4


def test_two_loras_add_up_in_order_and_detaching_the_first_keeps_the_second(sd_tiny, golden, lora_io):
    base = unet_out(sd_tiny, lora_io)
    first = sd_tiny.attach(lora(golden, "kohya", scale=0.5))
    second = sd_tiny.attach(lora(golden, "peft", scale=0.5, merge=False))
    assert sd_tiny.adapters == [first, second]
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io["unet.out_lora_1.0"]) < 1e-4  # the same deltas twice at 0.5
    sd_tiny.detach(first)
    assert sd_tiny.adapters == [second]
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io["unet.out_lora_0.5"]) < 1e-4
    sd_tiny.detach(second)
    assert torch.equal(unet_out(sd_tiny, lora_io), base)


def test_rescaling_a_merged_lora_keeps_the_ones_merged_after_it(sd_tiny, golden, lora_io):
    base = unet_out(sd_tiny, lora_io)
    first = sd_tiny.attach(lora(golden, "kohya", scale=0.25))
    second = sd_tiny.attach(lora(golden, "peft", scale=0.5))
    first.scale = 0.5  # 0.5 + 0.5: the golden output at 1.0
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io["unet.out_lora_1.0"]) < 1e-4
    sd_tiny.detach(second)
    sd_tiny.detach(first)
    assert torch.equal(unet_out(sd_tiny, lora_io), base)


def test_sampling_with_a_lora_and_moving_the_pipeline(sd_tiny_sampler, golden):
    sd_tiny = sd_tiny_sampler
    plain = sd_tiny(["x"], steps=2, height=128, width=128, seed=0, output_type="latent")
    adapter = sd_tiny.attach(lora(golden))
    styled = sd_tiny(["x"], steps=2, height=128, width=128, seed=0, output_type="latent")
    assert not torch.allclose(plain, styled)
    sd_tiny.to(dtype=torch.float64)  # adapters are detached, the parts moved, the adapters attached again
    assert sd_tiny.adapters == [adapter]
    assert next(sd_tiny.denoiser.parameters()).dtype == torch.float64
    again = sd_tiny(["x"], steps=2, height=128, width=128, seed=0, output_type="latent")
    assert rel_err(again, styled) < 1e-4
    with pytest.raises(AdapterError, match="cannot save with adapters attached"):
        sd_tiny.save("/nonexistent/never-written.safetensors")


# ---- the name tables ---------------------------------------------------------------------------------

def test_diffusers_names_of_the_full_size_sd_v1_unet():
    """Known pairs from diffusers' single-file conversion of SD v1 (levels 0-2 with attention, 3 without)."""
    with torch.device("meta"):
        unet = UNet(model_channels=320, channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2, 1], num_heads=8,
                    context_dim=768)
    known = {
        "input_blocks.0.0": "conv_in",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
        "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
        "middle_block.1.proj_in": "mid_block.attentions.0.proj_in",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
        "output_blocks.6.0.in_layers.2": "up_blocks.2.resnets.0.conv1",
        "time_embed.2": "time_embedding.linear_2",
        "out.2": "conv_out",
    }
    for ours, theirs in known.items():
        assert unet_diffusers_path(unet, ours) == theirs, ours
    convs = [path for path, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    names = [unet_diffusers_path(unet, path) for path in convs]
    assert None not in names and len(set(names)) == len(names)  # every patchable module, one name each


def _random_lora(pipe, names, rank=2, peft=False, seed=0):
    """A LoRA file for `pipe` with random pairs on the named modules (kohya names, or PEFT names)."""
    table = lora_targets(pipe)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        shape = table[name].shape()
        down = torch.randn(rank, *shape[1:], generator=generator) * 0.3
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.3
        if peft:
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        else:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


def test_sdxl_kohya_names_both_text_towers_and_fused_rows(sdxl_tiny, tmp_path):
    """SDXL: original-layout UNet names, lora_te1_ (CLIP-L) and lora_te2_ (OpenCLIP bigG, whose q/k/v are rows of
    one fused projection); merged equals unmerged, and the merge lands where the names say."""
    names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_output_blocks_0_0_in_layers_2",
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
             "lora_te2_text_model_encoder_layers_2_mlp_fc2"]
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(_random_lora(sdxl_tiny, names), str(path))
    k_before = sdxl_tiny.conditioner.conditioners[1].model.transformer.resblocks[1].attn.in_proj_weight.detach().clone()
    tensors = safetensors.torch.load_file(str(path))
    batch = {"prompt": ["a red fox"], "original_size": torch.tensor([[64, 64]]),
             "crop_coords_top_left": torch.zeros(1, 2), "target_size": torch.tensor([[64, 64]])}
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    outputs = {}
    for merge in (True, False):
        adapter = sdxl_tiny.attach(registry.build("adapter", "lora", path=path, merge=merge))
        with torch.no_grad():
            cond = sdxl_tiny.conditioner(batch)
            outputs[merge] = (cond, sdxl_tiny.denoiser(x, t, cond))
        if merge:  # the k rows of the second tower's fused projection, by hand: alpha / rank = 0.5
            name = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
            delta = 0.5 * tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
            merged = sdxl_tiny.conditioner.conditioners[1].model.transformer.resblocks[1].attn.in_proj_weight
            width = merged.shape[1]
            assert torch.allclose(merged[width:2 * width], k_before[width:2 * width] + delta, atol=1e-6)
            assert torch.equal(merged[:width], k_before[:width])
        sdxl_tiny.detach(adapter)
    (cond_m, out_m), (cond_u, out_u) = outputs[True], outputs[False]
    for key in cond_m:
        assert rel_err(cond_m[key], cond_u[key]) < 1e-5
    assert rel_err(out_m, out_u) < 1e-5
    assert torch.equal(sdxl_tiny.conditioner.conditioners[1].model.transformer.resblocks[1].attn.in_proj_weight,
                       k_before)


def test_sd_v2_openclip_peft_file(shared_dir, tmp_path):
    """A one-tower OpenCLIP pipeline (SD v2's text tower): PEFT `text_encoder.` names reach the fused rows."""
    pipe = LatentDiffusionPipeline.from_config({
        "codec": {"name": "identity"},
        "denoiser": {"name": "unet", "in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1],
                     "num_res_blocks": 1, "attention_resolutions": [1], "num_head_channels": 16, "context_dim": 32},
        "conditioner": {"name": "clip_text", "layout": "openclip", "context_dim": 32, "layers": 2, "heads": 2}})
    names = ["text_encoder.text_model.encoder.layers.0.self_attn.v_proj", "text_encoder.text_model.encoder.layers.1.mlp.fc1",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "unet.down_blocks.0.resnets.0.conv1"]
    path = tmp_path / "v2-peft.safetensors"
    safetensors.torch.save_file(_random_lora(pipe, names, peft=True), str(path))
    ids = pipe.conditioner.tokenize(["a photo"])
    with torch.no_grad():
        base = pipe.conditioner.encode_ids(ids)
    results = []
    for merge in (True, False):
        adapter = pipe.attach(registry.build("adapter", "lora", path=path, merge=merge))
        assert {target.path for target, _ in adapter._plan} >= {"conditioner.model.transformer.resblocks.0.attn",
                                                                 "denoiser.input_blocks.1.0.in_layers.2"}
        with torch.no_grad():
            results.append(pipe.conditioner.encode_ids(ids))
        pipe.detach(adapter)
    assert rel_err(results[0], results[1]) < 1e-5 and rel_err(results[0], base) > 1e-3
    with torch.no_grad():
        assert torch.equal(pipe.conditioner.encode_ids(ids), base)


# ---- bad files, refused before anything is attached ------------------------------------------------------

def _refused(pipe, path, match, **options):
    weights = {name: value.clone() for name, value in pipe.denoiser.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        pipe.attach(registry.build("adapter", "lora", path=path, **options))
    assert pipe.adapters == []
    assert all(torch.equal(weights[name], value) for name, value in pipe.denoiser.state_dict().items())


def test_sdxl_lora_on_a_v1_pipeline_is_refused_naming_both(sd_tiny, sdxl_tiny, tmp_path):
    path = tmp_path / "xl.safetensors"
    safetensors.torch.save_file(_random_lora(sdxl_tiny, ["lora_unet_input_blocks_4_1_proj_in",
                                                         "lora_te2_text_model_encoder_layers_0_mlp_fc1"]), str(path))
    _refused(sd_tiny, path, r"match nothing in this pipeline \(denoiser 'unet' with 32-wide cross-attention.*SDXL LoRA")


def test_a_lora_for_other_widths_is_refused_with_the_shapes(sd_tiny, golden, tmp_path):
    tensors = safetensors.torch.load_file(str(golden / "lora-tiny-kohya.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors[f"{name}.lora_down.weight"] = torch.randn(4, 768)  # SD v1's text width
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    _refused(sd_tiny, path, r"does not fit this pipeline .* down \(4, 768\).* made for SD v1")


@pytest.mark.parametrize(("tensors", "match"), [
    ({}, "holds no tensors"),
    ({"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3),
      "lora_unet_conv_in.lora_up.weight": torch.randn(32, 3, 1, 1)}, "rank mismatch"),
    ({"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3)}, "has no up matrix"),
    ({"model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3)}, "is not a LoRA file"),
    ({"lora_unet_conv_in.hada_w1_a": torch.randn(4, 4)}, "LoHa"),
    ({"lora_unet_conv_in.lora_down.weight": torch.full((4, 4, 3, 3), float("nan")),
      "lora_unet_conv_in.lora_up.weight": torch.randn(32, 4, 1, 1)}, "non-finite"),
], ids=["empty", "rank-mismatch", "half-pair", "not-lora", "loha", "nan"])
def test_bad_files_are_refused_by_name(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(AdapterError, match=match):
        registry.build("adapter", "lora", path=path)


def test_missing_truncated_and_mixed_files(tmp_path, golden):
    with pytest.raises(AdapterError, match="does not exist"):
        registry.build("adapter", "lora", path=tmp_path / "nope.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((golden / "lora-tiny-kohya.safetensors").read_bytes()[:5000])
    with pytest.raises(AdapterError, match="cannot be read"):
        registry.build("adapter", "lora", path=truncated)
    with pytest.raises(ConfigError, match="lora' .* refused its parameters: lora: scale must be a finite number"):
        registry.build("adapter", "lora", path=golden / "lora-tiny-kohya.safetensors", scale="strong")


def test_partial_match_needs_strict_false_and_then_applies_what_matches(sd_tiny, golden, lora_io, tmp_path):
    tensors = safetensors.torch.load_file(str(golden / "lora-tiny-kohya.safetensors"))
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.randn(4, 8)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.randn(8, 4)
    path = tmp_path / "extra.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    _refused(sd_tiny, path, r"1 of 109 module name\(s\) match nothing.*lora_unet_not_a_module.*strict=False")
    with pytest.warns(UserWarning, match="lora_unet_not_a_module"):
        sd_tiny.attach(registry.build("adapter", "lora", path=path, strict=False))
    assert rel_err(unet_out(sd_tiny, lora_io), lora_io["unet.out_lora_1.0"]) < 1e-4


def test_a_merge_into_int8_weights_is_refused_and_works_in_the_documented_order(sd_tiny, golden, lora_io):
    # Merged into a weight int8_weights computes per call, the LoRA would change a copy and do nothing.
    int8 = sd_tiny.attach(registry.build("adapter", "int8_weights"))
    with pytest.raises(AdapterError, match="cannot merge into .* computed at each call.*detach that adapter"):
        sd_tiny.attach(lora(golden, merge=True))
    unmerged = sd_tiny.attach(lora(golden, merge=False))  # hooks on the outputs: fine over int8 weights
    hooked = unet_out(sd_tiny, lora_io)
    sd_tiny.detach(unmerged)
    sd_tiny.detach(int8)
    merged = sd_tiny.attach(lora(golden, merge=True))  # the documented order: LoRA merged first, then int8
    sd_tiny.attach(registry.build("adapter", "int8_weights"))
    expected = lora_io["unet.out_lora_1.0"]
    assert rel_err(unet_out(sd_tiny, lora_io), expected) < 3e-2 and rel_err(hooked, expected) < 3e-2
    assert merged in sd_tiny.adapters
