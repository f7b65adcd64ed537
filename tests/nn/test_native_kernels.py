"""latentgen's compiled bf16 CPU kernels (softmax, GEGLU, GroupNorm+SiLU): accuracy against float64 beside torch's
bf16 operators, in-place use, the layers they serve, and every way of not using them (switched off, no compiler,
an input a kernel does not take, autograd)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import latentgen.nn.native_kernels as native
from latentgen.nn.blocked_attention import blocked_attention, dot_product_attention, uses_blocked_path
from latentgen.nn.normalization import GroupNorm32

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAN_BUILD = shutil.which("c++") is not None and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture
def fresh(monkeypatch):
    """The module as a new process finds it: nothing loaded yet (the compiled kernel stays cached on disk)."""
    monkeypatch.setattr(native.ENABLED, "value", True)
    monkeypatch.delenv(native.SWITCH, raising=False)
    native._build.cache_clear()
    yield native
    native._build.cache_clear()


@pytest.fixture(scope="module")
def compiled():
    if not CAN_BUILD:
        pytest.skip("no C++ compiler or no AVX2 on this machine: the kernel cannot be built here")
    module = native._build.__wrapped__()
    assert module is not None, "a C++ compiler and AVX2 are here, so the kernels must build"
    return module


@pytest.mark.parametrize("length", [1, 5, 31, 32, 77, 1024, 4100])
def test_matches_float64_as_closely_as_torch(compiled, length):
    torch.manual_seed(length)
    scores = (torch.randn(64, length) * 4).bfloat16()
    exact = torch.softmax(scores.double(), dim=-1)
    ours = compiled.softmax_bf16_(scores.clone()).double()
    theirs = torch.softmax(scores, dim=-1).double()
    # Both round the probabilities to bf16: half a bf16 ulp relative (2^-9), so compare relative errors.
    ours_error = ((ours - exact).abs() / exact.clamp_min(1e-30)).max()
    theirs_error = ((theirs - exact).abs() / exact.clamp_min(1e-30)).max()
    assert ours_error <= max(2 ** -8, 1.5 * theirs_error), (ours_error, theirs_error)
    torch.testing.assert_close(ours.sum(-1), torch.ones(64, dtype=torch.float64), atol=length * 2 ** -9, rtol=0)


def test_extreme_scores(compiled):
    scores = torch.tensor([[0.0, -1e4, -3e38, 1e4], [80.0, 80.0, -80.0, 0.0]]).bfloat16()
    ours = compiled.softmax_bf16_(scores.clone()).float()
    torch.testing.assert_close(ours, torch.softmax(scores.float(), -1).bfloat16().float(), atol=2 ** -8, rtol=0)


def test_works_in_place(compiled, fresh):
    scores = torch.randn(3, 8, 300).bfloat16()
    expected = torch.softmax(scores.double(), dim=-1)
    result = fresh.softmax_(scores)
    assert result.data_ptr() == scores.data_ptr()
    torch.testing.assert_close(result.double(), expected, atol=2 ** -8, rtol=0)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(300, 4).bfloat16().t(),  # not contiguous
    lambda: torch.randn(4, 300),  # float32
    lambda: torch.randn(0, 300).bfloat16(),  # empty
], ids=["transposed", "float32", "empty"])
def test_inputs_the_kernel_does_not_take_go_to_torch(fresh, make):
    scores = make()
    torch.testing.assert_close(fresh.softmax_(scores), torch.softmax(scores, dim=-1))


def test_attention_with_and_without_the_kernel(compiled):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 40).bfloat16() for _ in range(3))
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 40 ** 0.5, -1) @ v.double()
    with blocked_attention(True), native.native_kernels(True):
        assert uses_blocked_path(q, k)
        assert native.kernels() is not None
        ours = dot_product_attention(q, k, v).double()
    with blocked_attention(True), native.native_kernels(False):
        assert native.kernels() is None
        theirs = dot_product_attention(q, k, v).double()
    scale = exact.abs().max()
    assert (ours - exact).abs().max() / scale < 2e-2
    assert (ours - theirs).abs().max() / scale < 1e-2


def test_the_switch_turns_it_off(fresh, monkeypatch, caplog):
    monkeypatch.setenv(native.SWITCH, "0")
    with caplog.at_level(logging.INFO, logger="latentgen.native"):
        assert fresh.kernels() is None
    assert "LATENTGEN_NATIVE_KERNELS=0" in caplog.text
    scores = torch.randn(2, 300).bfloat16()
    torch.testing.assert_close(fresh.softmax_(scores), torch.softmax(scores, dim=-1))


def test_a_failed_build_falls_back_with_one_warning(fresh, monkeypatch, caplog):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("on this CPU the kernel is not even tried")
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="latentgen.native"):
        assert fresh.kernels() is None
        assert fresh.kernels() is None  # tried once per process
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "c++: command not found" in warnings[0].getMessage()
    assert "LATENTGEN_NATIVE_KERNELS=0" in warnings[0].getMessage()
    scores = torch.randn(2, 300).bfloat16()
    torch.testing.assert_close(fresh.softmax_(scores), torch.softmax(scores, dim=-1))


def _max_error(result: torch.Tensor, exact: torch.Tensor) -> float:
    return (result.double() - exact).abs().max().item()


@pytest.mark.parametrize("shape", [(3, 2, 64), (5, 2 * 1280), (7, 2 * 37)], ids=["small", "sd-width", "odd-width"])
def test_geglu_matches_float64_as_closely_as_torch(compiled, shape):
    torch.manual_seed(sum(shape))
    projected = (torch.randn(*shape) * 3).bfloat16()
    value, gate = projected.double().chunk(2, dim=-1)
    exact = value * torch.nn.functional.gelu(gate)
    ours = compiled.geglu_bf16(projected)
    bf_value, bf_gate = projected.chunk(2, dim=-1)
    theirs = bf_value * torch.nn.functional.gelu(bf_gate)
    assert ours.shape == theirs.shape and ours.dtype == torch.bfloat16
    # One rounding to bf16 where torch rounds twice: never worse than torch, within one bf16 ulp of the exact value.
    assert _max_error(ours, exact) <= _max_error(theirs, exact) + 1e-6
    assert ((ours.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4).all()


def _group_norm_silu_exact(x, norm, shift):
    shifted = x.double() + (0 if shift is None else shift.double()[:, :, None, None])
    normed = torch.nn.functional.group_norm(shifted, norm.num_groups, norm.weight.double(), norm.bias.double(),
                                            norm.eps)
    return torch.nn.functional.silu(normed)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
@pytest.mark.parametrize("channels,groups,size", [(320, 32, (16, 16)), (48, 16, (7, 9)), (64, 32, (1, 1))],
                         ids=["sd", "odd-sizes", "one-pixel"])
@pytest.mark.parametrize("with_shift", [True, False], ids=["shift", "no-shift"])
def test_group_norm_silu_matches_float64_as_closely_as_torch(compiled, fresh, channels_last, channels, groups,
                                                             size, with_shift):
    torch.manual_seed(channels)
    # A mean far from zero against the spread: the statistics must not cancel.
    x = (torch.randn(2, channels, *size) * 0.5 + 40).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = GroupNorm32(groups, channels, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    shift = (torch.randn(2, channels) * 3).bfloat16() if with_shift else None
    exact = _group_norm_silu_exact(x, norm, shift)
    with torch.no_grad():
        ours = fresh.group_norm_silu(x, norm, shift)
        with fresh.native_kernels(False):
            theirs = fresh.group_norm_silu(x, norm, shift)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _max_error(ours, exact) <= _max_error(theirs, exact) + 1e-6
    assert _max_error(ours, exact) <= 2 ** -7 * max(1.0, exact.abs().max().item())


def test_what_the_kernels_do_not_take_goes_to_torch(compiled, fresh):
    torch.manual_seed(0)
    norm = GroupNorm32(8, 16)
    x = torch.randn(2, 16, 5, 5)
    # float32: torch's operators, exactly.
    torch.testing.assert_close(fresh.group_norm_silu(x, norm), torch.nn.functional.silu(norm(x)))
    projected = torch.randn(3, 8)
    value, gate = projected.chunk(2, dim=-1)
    torch.testing.assert_close(fresh.geglu(projected), value * torch.nn.functional.gelu(gate))
    # A layout the kernel does not take (a strided view): torch's operators.
    strided = torch.randn(2, 16, 10, 10).bfloat16()[:, :, ::2, ::2]
    torch.testing.assert_close(fresh.group_norm_silu(strided, norm), torch.nn.functional.silu(norm(strided)))


def test_autograd_runs_through_torch(compiled, fresh):
    """Training: inputs or weights that autograd records go through torch's operators, so gradients flow."""
    torch.manual_seed(0)
    norm = GroupNorm32(8, 16).bfloat16()
    x = torch.randn(2, 16, 4, 4).bfloat16().requires_grad_()
    shift = torch.randn(2, 16).bfloat16()
    fresh.group_norm_silu(x, norm, shift).float().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None and x.grad.abs().sum() > 0
    projected = torch.randn(3, 8).bfloat16().requires_grad_()
    fresh.geglu(projected).float().sum().backward()
    assert projected.grad is not None and projected.grad.abs().sum() > 0
    # Weights that train, an input that does not: still torch's path, the weights get gradients.
    norm.weight.grad = None
    fresh.group_norm_silu(x.detach(), norm).float().sum().backward()
    assert norm.weight.grad is not None


def test_unet_with_and_without_the_kernels(compiled):
    """The bf16 UNet (ResBlocks, spatial transformers with GEGLU) agrees with its torch-operator self and with
    float32, in both memory formats."""
    from latentgen.denoisers.unet import UNet

    torch.manual_seed(0)
    unet = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                attention_resolutions=[2], num_head_channels=16, context_dim=24).eval()
    for p in unet.parameters():  # the zero-initialised out convs would hide every difference
        torch.nn.init.normal_(p, std=0.2)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 24)
    with torch.inference_mode():
        reference = unet(x, t, {"crossattn": context}).double()
        low = unet.to(torch.bfloat16)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            low = low.to(memory_format=memory_format)
            with native.native_kernels(True):
                assert native.kernels() is not None
                ours = low(x.bfloat16().contiguous(memory_format=memory_format), t,
                           {"crossattn": context.bfloat16()}).double()
            with native.native_kernels(False):
                theirs = low(x.bfloat16().contiguous(memory_format=memory_format), t,
                             {"crossattn": context.bfloat16()}).double()
            scale = reference.abs().max()
            assert (ours - reference).abs().max() / scale < 0.05
            assert (ours - reference).norm() <= 1.1 * (theirs - reference).norm()


def test_float32_and_training_never_build_the_kernels(fresh):
    """Only a call that could use a kernel builds them (a minute on first use): not float32, not training."""
    from latentgen.denoisers.unet import UNet

    unet = UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1], num_res_blocks=1,
                attention_resolutions=[1], num_head_channels=16, context_dim=8)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 2, 8)
    with torch.no_grad():
        unet(x, t, {"crossattn": context})  # float32 inference
    with torch.enable_grad():  # bf16 training
        unet.bfloat16()(x.bfloat16(), t, {"crossattn": context.bfloat16()}).float().sum().backward()
    assert fresh._build.cache_info().currsize == 0
