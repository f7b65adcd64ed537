"""The blocked bf16 CPU attention computes softmax(Q K^T / sqrt(d)) V to bf16 accuracy, and only takes
the inputs it was measured on; everything else reaches scaled_dot_product_attention unchanged."""

import pytest
import torch
import torch.nn.functional as F

from latentgen.nn import blocked_attention as blocked
from latentgen.nn.attention import Attention
from latentgen.nn.autoencoder import AttnBlock


@pytest.fixture(autouse=True)
def forced_on():
    """The blocked path under test also on a CPU with AMX, where torch's flash kernel is the default."""
    with blocked.blocked_attention(True):
        yield


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(q_shape, kv_shape, v_dim=None, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    v_shape = kv_shape if v_dim is None else (*kv_shape[:-1], v_dim)
    return tuple(torch.randn(shape, generator=generator).to(dtype) for shape in (q_shape, kv_shape, v_shape))


@pytest.mark.parametrize(
    "q_shape, kv_shape, v_dim",
    [
        ((2, 3, 300, 40), (2, 3, 300, 40), None),  # self-attention, heads
        ((1, 200, 64), (1, 520, 64), None),  # fewer queries than keys, 3-D like the VAE's single head
        ((2, 2, 130, 16), (2, 2, 700, 16), 24),  # values wider than the queries
    ],
)
def test_blocked_path_matches_float64_to_bf16_accuracy(monkeypatch, q_shape, kv_shape, v_dim):
    # Small blocks so that several query blocks, the last one short, run per head.
    monkeypatch.setattr(blocked, "BLOCK_SCORES", 48 * kv_shape[-2])
    q, k, v = inputs(q_shape, kv_shape, v_dim)
    assert blocked.uses_blocked_path(q, k)
    with torch.inference_mode():
        out = blocked.dot_product_attention(q, k, v)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    flash = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3). The flash kernel rounds the
    # probabilities and the output; the blocked path also rounds the scores, which about doubles that.
    assert rel_err(out, reference) < 1e-2
    assert rel_err(out, reference) < 3 * rel_err(flash, reference)


def test_one_block_per_head_when_the_scores_fit(monkeypatch):
    q, k, v = inputs((1, 2, 300, 32), (1, 2, 300, 32))
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args, **kwargs: calls.append(1) or real_bmm(*args, **kwargs))
    with torch.inference_mode():
        blocked.dot_product_attention(q, k, v)
    assert len(calls) == 2 * 2  # two heads, one block each, two products per block


@pytest.mark.parametrize(
    "case",
    ["float32", "short keys", "mask", "needs grad", "switched off", "broadcast heads"],
)
def test_other_inputs_go_to_sdpa_unchanged(case):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    keys = 77 if case == "short keys" else 300
    q, k, v = inputs((2, 2, 300, 16), (2, 1 if case == "broadcast heads" else 2, keys, 16), dtype=dtype)
    mask = torch.ones(300, keys, dtype=torch.bool).tril() if case == "mask" else None
    if case == "needs grad":
        q.requires_grad_(True)
    with blocked.blocked_attention(case != "switched off"):
        assert not blocked.uses_blocked_path(q, k, mask)
        out = blocked.dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    if case == "needs grad":
        out.float().sum().backward()
        assert q.grad is not None and q.grad.abs().sum() > 0


def test_switch_restores_the_previous_setting():
    q, k, _ = inputs((1, 300, 8), (1, 300, 8))
    with blocked.blocked_attention(False):
        with blocked.blocked_attention(True):
            assert blocked.uses_blocked_path(q, k)
        assert not blocked.uses_blocked_path(q, k)
    assert blocked.uses_blocked_path(q, k)


@pytest.mark.parametrize("amx", [True, False])
def test_by_default_it_runs_where_the_cpu_has_no_amx(monkeypatch, amx):
    q, k, _ = inputs((1, 300, 8), (1, 300, 8))
    monkeypatch.setattr(blocked, "FLASH_KERNEL_HAS_AMX", amx)
    with blocked.blocked_attention(None):
        assert blocked.uses_blocked_path(q, k) is not amx
        with blocked.blocked_attention(True):
            assert blocked.uses_blocked_path(q, k)
        with blocked.blocked_attention(False):
            assert not blocked.uses_blocked_path(q, k)


def test_amx_detection_answers_a_bool():
    assert isinstance(blocked.FLASH_KERNEL_HAS_AMX, bool) and blocked._cpu_has_amx() is blocked.FLASH_KERNEL_HAS_AMX


@pytest.mark.parametrize("layer", ["unet", "vae"])
def test_layers_take_the_blocked_path_in_bf16_within_bf16_accuracy_of_float32(monkeypatch, layer):
    # The UNet's multi-head layer at 16x16 = 256 tokens and the VAE's single 64-wide head; their float32
    # output (the flash kernel, exact up to summation order) is the reference.
    generator = torch.Generator().manual_seed(1)
    if layer == "unet":
        module = Attention(64, heads=4, dim_head=16)
        x = torch.randn(2, 256, 64, generator=generator)
    else:
        module = AttnBlock(64)
        with torch.no_grad():  # attention as large as the residual input, so that the test sees it
            module.proj_out.weight.mul_(30.0)
        x = torch.randn(1, 64, 16, 16, generator=generator)
    with torch.inference_mode():
        expected = module(x)
        module.bfloat16()
        x_bf16 = x.bfloat16()

        def no_sdpa(*args, **kwargs):
            raise AssertionError("scaled_dot_product_attention called: the blocked path was not taken")

        monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
        out = module(x_bf16)
    assert rel_err(out, expected) < 2e-2


def test_autocast_without_grad_takes_the_blocked_path():
    # Sampling previews during bf16-autocast training: linears give bf16 queries, no gradients wanted.
    module = Attention(64, heads=4, dim_head=16)
    x = torch.randn(2, 256, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = module.to_q(x)
            assert q.dtype == torch.bfloat16 and blocked.uses_blocked_path(q, q)
            out = module(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) < 1e-2


def test_under_torch_compile_it_is_one_operator_in_one_graph():
    # An opaque operator whose declared output (the fake) matches what it returns: a compiled UNet keeps its
    # attention in the graph instead of breaking it at every layer (and recompiling per block past the limit).
    q, k, v = (torch.randn(1, 2, 300, 40).bfloat16() for _ in range(3))
    torch.library.opcheck(blocked.blocked_attention_op, (q, k, v))
    with torch.no_grad():
        explained = torch._dynamo.explain(blocked.dot_product_attention)(q, k, v)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(blocked.dot_product_attention, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(q, k, v), blocked.dot_product_attention(q, k, v))
