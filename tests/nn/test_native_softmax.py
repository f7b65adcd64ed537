"""The compiled bf16 softmax of the blocked attention: accuracy against float64, in-place use, the attention it
serves, and every way of not using it (switched off, no compiler, an input it does not take)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import latentgen.nn.native_softmax as native
from latentgen.nn.blocked_attention import blocked_attention, dot_product_attention, uses_blocked_path

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
    kernel = native._build.__wrapped__()
    assert kernel is not None, "a C++ compiler and AVX2 are here, so the kernel must build"
    return kernel


@pytest.mark.parametrize("length", [1, 5, 31, 32, 77, 1024, 4100])
def test_matches_float64_as_closely_as_torch(compiled, length):
    torch.manual_seed(length)
    scores = (torch.randn(64, length) * 4).bfloat16()
    exact = torch.softmax(scores.double(), dim=-1)
    ours = compiled(scores.clone()).double()
    theirs = torch.softmax(scores, dim=-1).double()
    # Both round the probabilities to bf16: half a bf16 ulp relative (2^-9), so compare relative errors.
    ours_error = ((ours - exact).abs() / exact.clamp_min(1e-30)).max()
    theirs_error = ((theirs - exact).abs() / exact.clamp_min(1e-30)).max()
    assert ours_error <= max(2 ** -8, 1.5 * theirs_error), (ours_error, theirs_error)
    torch.testing.assert_close(ours.sum(-1), torch.ones(64, dtype=torch.float64), atol=length * 2 ** -9, rtol=0)


def test_extreme_scores(compiled):
    scores = torch.tensor([[0.0, -1e4, -3e38, 1e4], [80.0, 80.0, -80.0, 0.0]]).bfloat16()
    ours = compiled(scores.clone()).float()
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
    with blocked_attention(True), native.native_softmax(True):
        assert uses_blocked_path(q, k)
        assert native.kernel() is not None
        ours = dot_product_attention(q, k, v).double()
    with blocked_attention(True), native.native_softmax(False):
        assert native.kernel() is None
        theirs = dot_product_attention(q, k, v).double()
    scale = exact.abs().max()
    assert (ours - exact).abs().max() / scale < 2e-2
    assert (ours - theirs).abs().max() / scale < 1e-2


def test_the_switch_turns_it_off(fresh, monkeypatch, caplog):
    monkeypatch.setenv(native.SWITCH, "0")
    with caplog.at_level(logging.INFO, logger="latentgen.native"):
        assert fresh.kernel() is None
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
        assert fresh.kernel() is None
        assert fresh.kernel() is None  # tried once per process
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "c++: command not found" in warnings[0].getMessage()
    assert "LATENTGEN_NATIVE_KERNELS=0" in warnings[0].getMessage()
    scores = torch.randn(2, 300).bfloat16()
    torch.testing.assert_close(fresh.softmax_(scores), torch.softmax(scores, dim=-1))
