"""Stable Diffusion 3 / 3.5 single files through the registered `sd3` format, against Stability AI's reference
outputs in ../shared/golden/sd35-tiny-* (every size read from key shapes; the joint context, pooled vector, MMDiT
and VAE of the loaded pipeline), the released layouts in ../shared/spec, export back, separate text-encoder
files, T5 left out, and the refusals (missing towers and tokenizer, memory, another process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from latentgen import LatentDiffusionPipeline
from latentgen.assembly import build_component
from latentgen.errors import CheckpointError, ConfigError, IncompatibleComponentsError, InsufficientMemoryError
from latentgen.formats.dispatch import format_for
from latentgen.interop import sd3
from latentgen.kinds import module_parts

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "t5" / "tokenizer.json"
HEADS = {"clip_l": 2, "clip_g": 3}  # not in any weight shape (sd35-tiny-config.json)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def files(shared_dir):
    golden = shared_dir / "golden"
    return {"weights": golden / "sd35-tiny-weights.safetensors",
            "io": safetensors.torch.load_file(str(golden / "sd35-tiny-io.safetensors")),
            "config": json.loads((golden / "sd35-tiny-config.json").read_text())}


@pytest.fixture(scope="module")
def pipe(files):
    return LatentDiffusionPipeline.from_checkpoint(files["weights"], t5_tokenizer=TOKENIZER, text_heads=HEADS)


def _joint(pipe, io) -> dict[str, torch.Tensor]:
    """The conditioner's joint context from the reference's token ids (its T5 ids are stand-ins no tokenizer
    gives): each tower encodes its ids, the sequence stack joins them."""
    clips, t5 = pipe.conditioner.conditioners
    l_tower, g_tower = clips.conditioners
    parts = [clips._join([l_tower.encode(io["tokens.clip_l"]), g_tower.encode(io["tokens.clip_g"])]),
             t5.encode(io["tokens.t5xxl"])]
    return pipe.conditioner._join(parts)


def test_the_file_is_claimed_by_sd3_alone_and_every_size_comes_from_key_shapes(files, pipe):
    assert format_for(files["weights"]).name == "sd3"
    ref = files["config"]
    net, vae = pipe.denoiser, pipe.config["codec"]
    assert (net.hidden_size, len(net.joint_blocks), net.patch_size, net.pos_embed_max_size) == (
        ref["mmdit"]["hidden_size"], ref["mmdit"]["depth"], ref["mmdit"]["patch_size"], ref["mmdit"]["pos_embed_max_size"])
    assert pipe.config["denoiser"]["dual_attention_layers"] == ref["mmdit"]["x_block_self_attn_layers"]
    assert (net.context_dim, net.vector_dim) == (ref["mmdit"]["context_in_features"], ref["mmdit"]["adm_in_channels"])
    assert (vae["channels"], vae["channel_mult"], vae["num_res_blocks"], vae["quant_convs"]) == (
        ref["vae"]["ch"], ref["vae"]["ch_mult"], ref["vae"]["num_res_blocks"], False)
    t5 = pipe.config["conditioner"]["conditioners"][1]
    assert (t5["d_model"], t5["heads"], t5["d_ff"], t5["layers"], t5["d_kv"]) == (24, 3, 60, 2, 8)
    assert pipe.process.name == "rectified_flow" and pipe.config["process"]["shift"] == ref["sampling"]["shift"]


def test_joint_context_pooled_vector_mmdit_and_vae_match_the_reference(files, pipe):
    io = files["io"]
    with torch.no_grad():
        cond = _joint(pipe, io)
        assert relative_error(cond["crossattn"], io["cond.context"]) < 1e-5
        assert relative_error(cond["vector"], io["cond.pooled"]) < 1e-5
        out = pipe.denoiser(io["mmdit.x"], io["mmdit.timestep"], {"crossattn": io["cond.context"],
                                                                   "vector": io["cond.pooled"]})
        assert relative_error(out, io["mmdit.out"]) < 1e-5
        assert relative_error(pipe.codec.encoder(io["vae.image"]), io["vae.moments"]) < 1e-5
        assert relative_error(pipe.codec.decode(io["vae.z"]), io["vae.decoded"]) < 1e-5


def test_prompts_run_end_to_end_through_the_tokenizers(pipe, files):
    io = files["io"]
    with torch.no_grad():
        cond = pipe.conditioner({"prompt": ["a photograph of an astronaut riding a horse", ""]})
    assert cond["crossattn"].shape == (2, 154, 24) and cond["vector"].shape == (2, 20)
    # the CLIP half is the reference's exactly (real CLIP tokenizer); T5 tokens follow the given tokenizer
    assert relative_error(cond["crossattn"][:, :77], io["cond.context"][[0, 2], :77]) < 1e-5
    images = pipe("a red fox in the snow", steps=2, height=32, width=48, seed=0)
    again = pipe("a red fox in the snow", steps=2, height=32, width=48, seed=0)
    assert images[0].size == (48, 32) and np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_export_writes_the_same_file_back_and_reloads_without_options(files, pipe, tmp_path):
    out = pipe.save(tmp_path / "sd35.safetensors", format="sd3")
    original = safetensors.torch.load_file(str(files["weights"]))
    written = safetensors.torch.load_file(str(out))
    assert set(written) == set(original)  # CLIP-L's unused text_projection passed through
    assert all(torch.equal(written[key], original[key]) for key in original)
    again = LatentDiffusionPipeline.from_checkpoint(out, t5_tokenizer=TOKENIZER)  # head counts from the metadata
    assert format_for(out).name == "sd3"
    with torch.no_grad():
        assert torch.equal(_joint(again, files["io"])["crossattn"], _joint(pipe, files["io"])["crossattn"])


def test_separate_text_encoder_files_as_sd35_ships_them(files, pipe, tmp_path):
    tensors = safetensors.torch.load_file(str(files["weights"]))
    main = {k: v for k, v in tensors.items() if not k.startswith(sd3.TEXT)}
    safetensors.torch.save_file(main, str(tmp_path / "sd3.5_medium.safetensors"))
    towers = {}
    for name in sd3.TOWERS:
        prefix = sd3.tower_prefix(name)
        towers[name] = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)},
                                    str(towers[name]))
    with pytest.raises(CheckpointError, match="holds no clip_l and no clip_g text encoder.*clip_l=<text_encoders"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "sd3.5_medium.safetensors")
    with pytest.raises(CheckpointError, match="is not a clip_g text encoder"):
        LatentDiffusionPipeline.from_checkpoint(tmp_path / "sd3.5_medium.safetensors", clip_l=towers["clip_l"],
                                                clip_g=towers["t5xxl"])
    split = LatentDiffusionPipeline.from_checkpoint(tmp_path / "sd3.5_medium.safetensors", t5_tokenizer=TOKENIZER,
                                                    text_heads=HEADS, **towers)
    with torch.no_grad():
        assert torch.equal(_joint(split, files["io"])["crossattn"], _joint(pipe, files["io"])["crossattn"])


def test_t5_left_out_gives_zeros_in_its_place_and_loads_none_of_it(files):
    light = LatentDiffusionPipeline.from_checkpoint(files["weights"], t5=False, text_heads=HEADS)
    assert light.conditioner.conditioners[1].name == "zero_tokens"
    assert not any("t5" in name for name, _ in light.conditioner.named_parameters())
    with torch.no_grad():
        cond = light.conditioner({"prompt": ["a photograph of an astronaut riding a horse"]})
    assert cond["crossattn"].shape == (1, 154, 24) and not cond["crossattn"][:, 77:].any()
    assert relative_error(cond["crossattn"][:, :77], files["io"]["cond.context"][:1, :77]) < 1e-5


def test_missing_or_wrong_t5_tokenizer_is_refused_before_any_weight(files, shared_dir):
    with pytest.raises(ConfigError, match="no T5 tokenizer was given or found beside it.*t5=false"):
        LatentDiffusionPipeline.from_checkpoint(files["weights"], text_heads=HEADS)
    with pytest.raises((ConfigError, CheckpointError), match="clip-tokenizer-cases.json"):
        LatentDiffusionPipeline.from_checkpoint(files["weights"], text_heads=HEADS,
                                                t5_tokenizer=shared_dir / "golden" / "clip-tokenizer-cases.json")
    with pytest.raises(ConfigError, match=r"pass text_heads=\{clip_l: <heads>\}"):
        LatentDiffusionPipeline.from_checkpoint(files["weights"], t5=False)


def test_a_load_that_cannot_fit_says_what_it_needs_before_reading(files, monkeypatch):
    import latentgen.memory

    read = []
    monkeypatch.setattr(latentgen.memory, "available_bytes", lambda device: 1 << 20)
    monkeypatch.setattr(sd3.WeightsFile, "tensor", lambda self, *a, **k: read.append(a) or None)
    with pytest.raises(InsufficientMemoryError, match=r"needs 0\.0 GiB for the weights alone .* t5=false"):
        LatentDiffusionPipeline.from_checkpoint(files["weights"], t5_tokenizer=TOKENIZER, text_heads=HEADS)
    assert read == []


@pytest.mark.parametrize(("family", "spec", "denoiser_params"), [
    ("medium", "sd35-medium-keys.tsv", 2_469_663_936), ("large", "sd35-large-keys.tsv", 8_146_280_768)])
def test_full_size_layouts_equal_the_spec_and_the_memory_figure(shared_dir, family, spec, denoiser_params):
    config = sd3.standard_config(family, t5=True, t5_tokenizer=str(TOKENIZER))
    with torch.device("meta"):
        modules = {kind: build_component(kind, config[kind]) for kind in module_parts()}
    ours = {}
    for kind, module in modules.items():
        for name, value in module.state_dict().items():
            ours[sd3.SD3_LAYOUT.file_key(f"{kind}.{name}")] = tuple(value.shape)
    rows = [line.split("\t") for line in (shared_dir / "spec" / spec).read_text().splitlines()
            if line and not line.startswith("#")]
    theirs = {key: tuple(int(n) for n in shape.strip().split("x") if n) for key, shape in rows}
    unused = sd3.tower_prefix("clip_l") + "text_projection.weight"  # CLIP-L's pooled vector is not projected
    assert ours == {key: shape for key, shape in theirs.items() if key != unused}
    parts = sd3.load_bytes(None, modules, torch.bfloat16)
    assert parts["denoiser"] == 2 * denoiser_params  # the figure the memory check states for bf16


def test_the_process_keeps_its_kind_options_change_and_another_is_refused(files, pipe, golden_sd_v):
    assert pipe.process.name == "rectified_flow"
    light = LatentDiffusionPipeline.from_checkpoint(files["weights"], t5=False, text_heads=HEADS)
    light.replace_process(shift=4.0)
    assert light.process.shift == 4.0
    with pytest.raises(IncompatibleComponentsError, match="trained with the rectified_flow process"):
        light.replace_process(name="edm")
    with pytest.raises(IncompatibleComponentsError, match=r"trained with the discrete \(v prediction\) process; "
                                                          r"process rectified_flow"):
        golden_sd_v.replace_process(name="rectified_flow")
    with pytest.raises(IncompatibleComponentsError, match=r"process discrete \(eps prediction\)"):
        golden_sd_v.replace_process(prediction_type="eps")


@pytest.fixture(scope="module")
def golden_sd_v(shared_dir):
    golden = shared_dir / "golden"
    return LatentDiffusionPipeline.from_checkpoint(golden / "sd-tiny-weights.safetensors",
                                                   original_config=golden / "sd-tiny-config.yaml", prediction_type="v")


def test_latentgen_sample_runs_an_sd35_file_with_its_options(files, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([str(Path(sys.executable).parent / "latentgen-sample"), f"checkpoint={files['weights']}",
                             f"+format_options.t5_tokenizer={TOKENIZER}", "+format_options.text_heads.clip_l=2",
                             "+format_options.text_heads.clip_g=3", "+process.shift=2.0", "prompt=a red fox",
                             "num_images=1", "steps=2", "height=32", "width=48", "dtype=bfloat16",
                             f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "images").iterdir())) == 1


def test_latentgens_own_format_keeps_the_whole_sd3_pipeline(files, pipe, tmp_path):
    """T5's embedding is one tensor under two names; latentgen's format writes and reads it like any weight."""
    path = pipe.save(tmp_path / "native.safetensors")
    again = LatentDiffusionPipeline.from_checkpoint(path)
    assert format_for(path).name == "latentgen" and again.process.name == "rectified_flow"
    t5 = again.conditioner.conditioners[1].transformer
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(_joint(again, files["io"])["crossattn"], _joint(pipe, files["io"])["crossattn"])
