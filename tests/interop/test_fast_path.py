"""The CPU speed-ups change nothing but speed: positioned reads equal safetensors' own reader, bf16
GroupNorm keeps float32 statistics, channels-last gives the contiguous results."""

import pytest
import safetensors.torch
import torch
from torch import nn

from latentgen.errors import CheckpointError
from latentgen.fast_path import optimize_for_inference
from latentgen.freed_memory import reuse_freed_memory
from latentgen.interop.stable_diffusion import load_pipeline
from latentgen.interop.weights_file import WeightsFile
from latentgen.nn.normalization import GroupNorm32


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_weights_file_reads_every_dtype_as_safetensors_does(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 2, 2, generator=generator).bfloat16(),
        "f64": torch.randn(4, generator=generator).double(),
        "i64": torch.arange(6).view(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "conv": torch.randn(4, 3, 3, 3, generator=generator).half(),
    }
    path = tmp_path / "all.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    expected = safetensors.torch.load_file(str(path))
    weights = WeightsFile(path)
    for key, value in expected.items():
        read = weights.tensor(key)
        assert read.dtype == value.dtype and read.shape == value.shape, key
        assert torch.equal(read, value), key
    # Casting happens straight from the file's dtype; integer tensors are never cast.
    assert torch.equal(weights.tensor("f16", torch.bfloat16), expected["f16"].to(torch.bfloat16))
    assert weights.tensor("i64", torch.bfloat16).dtype == torch.int64
    # Cast and relaid reads go through one staging buffer: each result owns its memory and keeps its values
    # after later reads reuse the buffer.
    staged = {key: weights.tensor(key, torch.float32, channels_last=True) for key in expected}
    for key, value in expected.items():
        assert torch.equal(staged[key], value.float() if value.is_floating_point() else value), key
        assert staged[key].untyped_storage().data_ptr() != weights._buffer.untyped_storage().data_ptr()
        if value.ndim == 4:
            assert staged[key].is_contiguous(memory_format=torch.channels_last), key
    weights.release()
    assert torch.equal(weights.tensor("f16", torch.bfloat16), expected["f16"].to(torch.bfloat16))


def test_a_file_cut_while_loading_is_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(path))
    weights = WeightsFile(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated or changed while loading"):
        weights.tensor("b")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bf16_group_norm_keeps_float32_statistics(memory_format):
    """A common offset of 20 standard deviations would wreck bf16-accumulated statistics (its sums
    keep 8 bits); float32 ones only round the output."""
    torch.manual_seed(0)
    norm = GroupNorm32(8, 64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 64, 16, 16) + 20).bfloat16().contiguous(memory_format=memory_format)
    reference = torch.nn.functional.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference) < 4e-3  # bf16 output rounding only (2^-9 per element)
    assert rel_err(norm.bfloat16()(x), reference) < 4e-3  # bf16 weights too


@pytest.fixture(scope="module")
def golden_files(shared_dir):
    g = shared_dir / "golden"
    return g / "sd-tiny-weights.safetensors", g / "sd-tiny-config.yaml"


def _layout(module):
    conv = next(p for p in module.parameters() if p.ndim == 4)
    return "channels_last" if conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous() \
        else "contiguous"


def test_channels_last_gives_the_contiguous_results(golden_files):
    weights, config = golden_files
    fast = load_pipeline(weights, original_config=config, channels_last=True)
    plain = load_pipeline(weights, original_config=config, channels_last=False)
    assert _layout(fast.denoiser) == _layout(fast.codec) == "channels_last"
    assert _layout(plain.denoiser) == _layout(plain.codec) == "contiguous"

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, plain.codec.latent_channels, 16, 16, generator=generator)
    context = torch.randn(2, 77, plain.denoiser.context_dim, generator=generator)
    t = torch.tensor([10.0, 900.0])
    with torch.inference_mode():
        assert rel_err(fast.denoiser(x, t, {"crossattn": context}), plain.denoiser(x, t, {"crossattn": context})) < 1e-5
        assert rel_err(fast.decode(x[:1]), plain.decode(x[:1])) < 1e-5


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_pipeline_uses_channels_last_by_default(golden_files, dtype):
    weights, config = golden_files
    pipe = load_pipeline(weights, original_config=config, dtype=dtype)
    # On the CPU load_pipeline also keeps freed memory in the process (where glibc takes the setting).
    assert pipe.fast_path == {"channels_last": True, "compile": False, "reuse_memory": reuse_freed_memory(),
                              "pack_weights": True}
    assert _layout(pipe.codec) == _layout(pipe.denoiser) == "channels_last"


def test_optimize_for_inference_switches_channels_last_back_off(golden_files):
    weights, config = golden_files
    pipe = optimize_for_inference(load_pipeline(weights, original_config=config), channels_last=False)
    assert all(p.is_contiguous() for p in [*pipe.denoiser.parameters(), *pipe.codec.parameters()])
    assert pipe.fast_path == {"channels_last": False, "compile": False, "reuse_memory": reuse_freed_memory(),
                              "pack_weights": True}


def test_compile_option_compiles_the_denoiser_to_the_same_results(golden_files):
    weights, config = golden_files
    plain = load_pipeline(weights, original_config=config)
    compiled = load_pipeline(weights, original_config=config, compile=True)
    assert compiled.fast_path["compile"] is True
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, plain.codec.latent_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, plain.denoiser.context_dim, generator=generator)
    t = torch.tensor([300.0])
    with torch.inference_mode():
        expected = plain.denoiser(x, t, {"crossattn": context})
        assert rel_err(compiled.denoiser(x, t, {"crossattn": context}), expected) < 1e-5
    assert compiled.denoiser._compiled_call_impl is not None  # nn.Module.compile's compiled forward


def test_from_checkpoint_passes_compile_to_both_formats(golden_files, tmp_path):
    from latentgen.pipeline import LatentDiffusionPipeline

    weights, config = golden_files
    original = LatentDiffusionPipeline.from_checkpoint(weights, original_config=config, compile=True)
    own = LatentDiffusionPipeline.from_checkpoint(original.save(tmp_path / "own.safetensors"), compile=True)
    for pipe in (original, own):
        assert pipe.fast_path["compile"] is True and pipe.denoiser._compiled_call_impl is not None
    assert LatentDiffusionPipeline.from_checkpoint(tmp_path / "own.safetensors").denoiser._compiled_call_impl is None


def test_an_unreadable_dtype_is_named(tmp_path):
    import json
    import struct

    header = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "complex.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"dtype \['C64'\].*convert them to F32, F16 or BF16"):
        WeightsFile(path)


def test_compile_runs_the_blocked_bf16_attention_eagerly_to_the_same_results(golden_files):
    # 16x16 latents give the tiny UNet's first level 256 tokens: the blocked path in bf16 (forced: on a CPU with
    # AMX torch's flash kernel is the default), an opaque operator to torch.compile.
    from latentgen.nn.blocked_attention import blocked_attention, uses_blocked_path

    with blocked_attention(True):
        _compile_matches_eager(golden_files, uses_blocked_path)


def _compile_matches_eager(golden_files, uses_blocked_path):

    weights, config = golden_files
    eager = load_pipeline(weights, original_config=config, dtype=torch.bfloat16)
    compiled = load_pipeline(weights, original_config=config, dtype=torch.bfloat16, compile=True)
    reference = load_pipeline(weights, original_config=config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, reference.denoiser.context_dim, generator=generator)
    t = torch.tensor([300.0])
    tokens = torch.empty(1, 16 * 16, 16, dtype=torch.bfloat16)
    assert uses_blocked_path(tokens, tokens)
    with torch.inference_mode():
        expected = reference.denoiser(x, t, {"crossattn": context})
        inputs = (x.bfloat16(), t, {"crossattn": context.bfloat16()})
        out_eager, out_compiled = eager.denoiser(*inputs), compiled.denoiser(*inputs)
    # Inductor's fused kernels round at other places than eager bf16 (they differ by 1.7e-2 here), so
    # each is held to bf16 accuracy against float32.
    assert rel_err(out_eager, expected) < 3e-2
    assert rel_err(out_compiled, expected) < 3e-2


def test_load_pipeline_packs_and_an_adapter_sees_fresh_weights(golden_files):
    """The SD fast path packs the UNet's convolutions; a LoRA merged into them (through the version counter)
    and an int8 adapter (which swaps the class) give the results of the unpacked pipeline."""
    from latentgen.adapters.int8_weights import Int8Weights
    from latentgen.nn.packed_convolution import PackedConv2d, pack_convolutions, unpack_convolutions

    weights, config = golden_files
    pipe = load_pipeline(weights, original_config=config, dtype=torch.bfloat16)
    assert pipe.fast_path["pack_weights"] is True
    convs = [m for m in pipe.denoiser.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is PackedConv2d for m in convs)
    x = torch.randn(2, 4, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    t, context = torch.tensor([10, 500]), torch.randn(2, 77, pipe.denoiser.context_dim).bfloat16()

    def step():
        with torch.inference_mode():
            return pipe.denoiser(x, t, {"crossattn": context})

    step()
    with torch.no_grad():  # as a LoRA merge does: in place on the Parameter
        convs[3].weight.add_(0.5)
    packed_after_change = step()
    unpack_convolutions(pipe.denoiser)
    assert torch.equal(step(), packed_after_change)
    pack_convolutions(pipe.denoiser)
    adapter = pipe.attach(Int8Weights())
    assert all(type(m) is not PackedConv2d for m in pipe.denoiser.modules())  # int8 takes the packed layers
    pipe.detach(adapter)
    assert all(type(m) is PackedConv2d for m in convs)  # and gives their class back
    torch.testing.assert_close(step(), packed_after_change, rtol=0, atol=0)
