"""Weight-only int8 (`int8_weights`): the per-channel quantiser's error bound, int8 weights and a close output
while attached, the exact float denoiser back when detached (also in bf16 and channels-last), the originals'
temporary file, the layer filters, and refused options."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

from latentgen import registry
from latentgen.adapters.int8_weights import Int8Conv2d, Int8Linear, dequantize, quantize
from latentgen.errors import AdapterError
from latentgen.fast_path import optimize_for_inference


def test_the_quantisation_error_is_at_most_half_a_scale_step_per_channel():
    torch.manual_seed(0)
    linear = torch.randn(6, 10) * torch.logspace(-3, 1, 6)[:, None]  # channels of very different sizes
    linear[2] = 0  # an all-zero channel: scale 1, values 0
    conv = torch.randn(5, 3, 3, 3).to(memory_format=torch.channels_last)
    for weight in (linear, conv, conv.bfloat16()):
        values, scale = quantize(weight)
        assert values.dtype == torch.int8 and scale.dtype == torch.float32
        assert scale.shape == (weight.shape[0],) + (1,) * (weight.ndim - 1)
        assert values.stride() == weight.stride()  # the layout is kept
        assert values.abs().max() <= 127
        w = weight.float()
        absmax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
        nonzero = absmax.flatten() > 0
        assert torch.allclose(scale.flatten()[nonzero], absmax.flatten()[nonzero] / 127, rtol=1e-6, atol=0)
        assert torch.equal(scale.flatten()[~nonzero], torch.ones(int((~nonzero).sum())))
        assert torch.equal(values.flatten(1).abs().amax(1)[nonzero], torch.full((int(nonzero.sum()),), 127,
                                                                                 dtype=torch.int8))
        error = (w - values.float() * scale).abs()
        assert (error <= scale / 2 * (1 + 1e-5)).all(), (error / scale).max()
        restored = dequantize(values, scale, weight.dtype)
        assert restored.dtype == weight.dtype and restored.stride() == weight.stride()
    assert torch.equal(quantize(linear)[0][2], torch.zeros(10, dtype=torch.int8))


@pytest.fixture()
def pipe(smoke):
    return copy.deepcopy(smoke)


def _inputs(pipe, dtype=torch.float32):
    x = torch.randn(2, pipe.codec.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    return x, torch.tensor([500, 500]), pipe.conditioner({"prompt": ["a red circle", "a blue star"]})


def _layers(denoiser):
    return {name: module for name, module in denoiser.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def _state(denoiser):
    """Each parameter: the object, its values, dtype, strides and requires_grad, in order."""
    return [(name, p, p.detach().clone(), p.dtype, p.stride(), p.requires_grad)
            for name, p in denoiser.named_parameters()]


def _assert_restored(denoiser, state):
    now = list(denoiser.named_parameters())
    assert [name for name, _ in now] == [entry[0] for entry in state]
    for (name, p), (_, before, values, dtype, stride, requires_grad) in zip(now, state):
        assert p is before, name
        assert p.dtype == dtype and p.stride() == stride and p.requires_grad == requires_grad, name
        assert torch.equal(p, values), name


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_attached_the_weights_are_int8_detached_the_denoiser_is_exactly_back(pipe):
    denoiser = pipe.denoiser
    x, t, cond = _inputs(pipe)
    state, keys = _state(denoiser), list(denoiser.state_dict())
    with torch.no_grad():
        before = denoiser(x, t, cond)
    adapter = pipe.attach(registry.build("adapter", "int8_weights"))
    path = adapter.originals_file
    assert path is not None and os.path.exists(path)
    layers = _layers(denoiser)
    assert layers and all(type(module) in (Int8Linear, Int8Conv2d) for module in layers.values())
    for name, module in layers.items():
        assert module.weight_int8.dtype == torch.int8 and "weight" not in dict(module.named_parameters()), name
        assert module.weight.dtype == torch.float32  # what code reading `layer.weight` sees
    assert all(p.ndim == 1 for p in denoiser.parameters())  # only biases and norms stay float parameters
    assert all(p.numel() == 0 for _, p, *_ in state if p.ndim > 1)  # the originals' memory is freed
    with torch.no_grad():
        quantised = denoiser(x, t, cond)
    assert not torch.equal(quantised, before) and _relative(quantised, before) < 1e-2
    assert adapter.describe() == {"name": "int8_weights", "min_size": 0, "modules": None,
                                  "keep_originals_in_memory": False}
    pipe.detach(adapter)
    assert not os.path.exists(path) and adapter.originals_file is None
    assert all(type(module) in (nn.Linear, nn.Conv2d) for module in _layers(denoiser).values())
    _assert_restored(denoiser, state)
    assert list(denoiser.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(denoiser(x, t, cond), before)


def test_bf16_and_channels_last_come_back_exactly(pipe):
    optimize_for_inference(pipe.to(dtype=torch.bfloat16), channels_last=True)
    denoiser = pipe.denoiser
    x, t, cond = _inputs(pipe, torch.bfloat16)
    state = _state(denoiser)
    conv = next(name for name, m in _layers(denoiser).items() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    stride = _layers(denoiser)[conv].weight.stride()
    assert stride != _layers(denoiser)[conv].weight.contiguous().stride()  # channels-last
    with torch.no_grad():
        before = denoiser(x, t, cond)
    adapter = pipe.attach(registry.build("adapter", "int8_weights"))
    layer = _layers(denoiser)[conv]
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.stride() == stride  # dequantised as before
    with torch.no_grad():
        quantised = denoiser(x, t, cond)
    assert quantised.dtype == torch.bfloat16
    assert not torch.equal(quantised, before) and _relative(quantised, before) < 1e-2
    pipe.detach(adapter)
    _assert_restored(denoiser, state)
    with torch.no_grad():
        assert torch.equal(denoiser(x, t, cond), before)


def test_keep_originals_in_memory_writes_no_file_and_keeps_the_storage(pipe):
    denoiser = pipe.denoiser
    state = _state(denoiser)
    pointers = [p.data_ptr() for p in denoiser.parameters()]
    adapter = pipe.attach(registry.build("adapter", "int8_weights", keep_originals_in_memory=True))
    assert adapter.originals_file is None
    assert all(type(module) in (Int8Linear, Int8Conv2d) for module in _layers(denoiser).values())
    pipe.detach(adapter)
    _assert_restored(denoiser, state)
    assert [p.data_ptr() for p in denoiser.parameters()] == pointers


def test_min_size_and_modules_choose_the_layers(pipe):
    denoiser = pipe.denoiser
    sizes = {name: module.weight.numel() for name, module in _layers(denoiser).items()}
    adapter = pipe.attach(registry.build("adapter", "int8_weights", min_size=4096))
    quantised = {name for name, module in _layers(denoiser).items() if type(module) in (Int8Linear, Int8Conv2d)}
    assert quantised == {name for name, size in sizes.items() if size >= 4096} and quantised != set(sizes)
    pipe.detach(adapter)
    adapter = pipe.attach(registry.build("adapter", "int8_weights", modules=["middle_block", "out"]))
    quantised = {name for name, module in _layers(denoiser).items() if type(module) in (Int8Linear, Int8Conv2d)}
    assert quantised == {name for name in sizes if name.startswith(("middle_block.", "out."))}
    pipe.detach(adapter)
    assert all(type(module) in (nn.Linear, nn.Conv2d) for module in _layers(denoiser).values())


def test_gradients_reach_inputs_and_biases_not_the_int8_weights(pipe):
    denoiser = pipe.denoiser.train()
    x, t, cond = _inputs(pipe)
    x.requires_grad_(True)
    adapter = pipe.attach(registry.build("adapter", "int8_weights", keep_originals_in_memory=True))
    denoiser(x, t, cond).square().mean().backward()
    assert x.grad is not None and denoiser.out[2].bias.grad is not None
    pipe.detach(adapter)
    assert denoiser.out[2].weight.grad is None


def test_non_finite_weights_are_refused_with_nothing_changed(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    denoiser = pipe.denoiser
    with torch.no_grad():
        denoiser.out[2].weight[0, 0, 0, 0] = float("nan")
    pointers = [p.data_ptr() for p in denoiser.parameters()]
    with pytest.raises(AdapterError, match="layer 'out.2' of denoiser 'unet' has non-finite weights"):
        pipe.attach(registry.build("adapter", "int8_weights"))
    assert pipe.adapters == [] and os.listdir(tmp_path) == []
    assert all(type(module) in (nn.Linear, nn.Conv2d) for module in _layers(denoiser).values())
    assert [p.data_ptr() for p in denoiser.parameters()] == pointers


def test_a_failure_half_way_through_apply_is_undone(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    denoiser = pipe.denoiser
    state = _state(denoiser)
    register, calls = nn.Module.register_buffer, []

    def failing(module, name, tensor, persistent=True):
        calls.append(name)
        if len(calls) == 9:
            raise RuntimeError("out of memory")
        return register(module, name, tensor, persistent)

    monkeypatch.setattr(nn.Module, "register_buffer", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.attach(registry.build("adapter", "int8_weights"))
    monkeypatch.undo()
    assert pipe.adapters == [] and os.listdir(tmp_path) == []
    assert all(type(module) in (nn.Linear, nn.Conv2d) and not module._buffers
               for module in _layers(denoiser).values())
    _assert_restored(denoiser, state)


def test_sampling_runs_with_the_adapter_attached(pipe):
    options = dict(steps=2, height=32, width=32, seed=0, output_type="latent")
    plain = pipe(["a red circle"], **options)
    adapter = pipe.attach(registry.build("adapter", "int8_weights", min_size=1024))
    quantised = pipe(["a red circle"], **options)
    pipe.detach(adapter)
    assert quantised.shape == plain.shape and torch.isfinite(quantised).all()
    assert not torch.equal(quantised, plain) and _relative(quantised, plain) < 1e-2
    assert torch.equal(pipe(["a red circle"], **options), plain)


def test_bad_options_and_denoisers_without_layers_to_quantise_are_refused(pipe):
    for options, message in [(dict(min_size=-1), "min_size must be a whole number >= 0"),
                             (dict(min_size=True), "min_size must be a whole number >= 0"),
                             (dict(modules=[]), "modules must be a non-empty list"),
                             (dict(modules=["out", 3]), "modules must be a non-empty list"),
                             (dict(keep_originals_in_memory="yes"), "keep_originals_in_memory must be true or false")]:
        with pytest.raises(AdapterError, match=message):
            registry.build("adapter", "int8_weights", **options)
    with pytest.raises(AdapterError, match="modules entry 'output_block' names no nn.Linear"):
        pipe.attach(registry.build("adapter", "int8_weights", modules=["output_block"]))
    with pytest.raises(AdapterError, match="has none with at least min_size=100000000 .*lower min_size"):
        pipe.attach(registry.build("adapter", "int8_weights", min_size=10**8))
    first = pipe.attach(registry.build("adapter", "int8_weights", keep_originals_in_memory=True))
    with pytest.raises(AdapterError, match="denoiser 'unet' has none .*already quantised"):
        pipe.attach(registry.build("adapter", "int8_weights"))
    pipe.detach(first)
    assert registry.build("adapter", "int8_weights", modules="out").modules == ["out"]


def test_a_process_that_exits_while_attached_leaves_no_temporary_file(tmp_path):
    # Benchmarks and scripts often end with the adapter still attached: the originals' file goes with them.
    script = ("from latentgen import LatentDiffusionPipeline, registry\n"
              "from latentgen.config import compose\n"
              "pipe = LatentDiffusionPipeline.from_config(compose('train', ['experiment=smoke']))\n"
              "adapter = pipe.attach(registry.build('adapter', 'int8_weights'))\n"
              "import os; assert os.path.exists(adapter.originals_file); print(adapter.originals_file)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path))  # the file was made where this test looks
    assert os.listdir(tmp_path) == []
