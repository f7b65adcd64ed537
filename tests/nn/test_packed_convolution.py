"""PackedConv2d: the same convolution bit for bit, a packed copy that follows its weight (in-place updates,
reassigned storage, another input shape, adapters that write through .data), and nn.Conv2d's own path for
everything it does not take."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from latentgen.nn import packed_convolution as packing
from latentgen.nn.packed_convolution import PackedConv2d, forget_packed_weights, pack_convolutions, unpack_convolutions

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not packing._has_mkldnn_ops(), reason="this torch has no oneDNN convolution ops")]


def _layer(cin=64, cout=32, **options) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, 3, padding=1, **options).bfloat16().to(memory_format=torch.channels_last)


def _input(cin=64, size=8, batch=2) -> torch.Tensor:
    return torch.randn(batch, cin, size, size).bfloat16().contiguous(memory_format=torch.channels_last)


def test_same_result_bit_for_bit_and_one_packed_copy():
    layer, x = _layer(), _input()
    with torch.inference_mode():
        expected = layer(x)
        assert pack_convolutions(layer) == 1 and type(layer) is PackedConv2d
        assert torch.equal(layer(x), expected)
        assert layer in packing._PACKED
        packed = packing._PACKED[layer][1]
        assert torch.equal(layer(x), expected) and packing._PACKED[layer][1] is packed  # reused, not repacked
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert unpack_convolutions(layer) == 1 and type(layer) is nn.Conv2d and layer not in packing._PACKED


def test_the_packed_copy_follows_the_weight():
    layer, x = _layer(), _input()
    pack_convolutions(layer)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(-1)  # in place: the version counter moves
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, layer.weight, layer.bias, padding=1),
                                   rtol=0, atol=0)
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # new storage
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, layer.weight, layer.bias, padding=1),
                                   rtol=0, atol=0)
        other = _input(size=4, batch=1)  # another shape: packed again for it
        torch.testing.assert_close(layer(other), nn.functional.conv2d(other, layer.weight, layer.bias, padding=1),
                                   rtol=0, atol=0)
    # Through .data nothing sees the change until the packed copies are dropped (as attach/detach do).
    layer.weight.data.copy_(torch.randn_like(layer.weight))
    forget_packed_weights(layer)
    with torch.inference_mode():
        torch.testing.assert_close(layer(other), nn.functional.conv2d(other, layer.weight, layer.bias, padding=1),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("case", ["float32", "large-map", "contiguous-input", "training"])
def test_what_it_does_not_take_runs_nn_conv2d(case):
    layer = _layer()
    x = _input(size=48 if case == "large-map" else 8)
    if case == "float32":
        layer, x = layer.float(), x.float()
    if case == "contiguous-input":
        x = x.contiguous()
    pack_convolutions(layer)
    context = torch.enable_grad() if case == "training" else torch.inference_mode()
    with context:
        result = layer(x)
        expected = nn.functional.conv2d(x, layer.weight, layer.bias, stride=layer.stride, padding=1)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert layer not in packing._PACKED
    if case == "training":
        assert result.requires_grad
        result.float().sum().backward()
        assert layer.weight.grad is not None


def test_strided_and_unpadded_layers_pack_too():
    for layer in (_layer(stride=2), nn.Conv2d(64, 16, 1).bfloat16()):
        x = _input()
        with torch.inference_mode():
            expected = layer(x)
            pack_convolutions(layer)
            assert torch.equal(layer(x), expected) and layer in packing._PACKED


def test_copies_pack_their_own_and_string_padding_is_left_alone():
    layer = _layer()
    pack_convolutions(layer)
    with torch.inference_mode():
        layer(_input())
    twin = copy.deepcopy(layer)  # the packed copy stays behind: the twin packs its own
    assert type(twin) is PackedConv2d and twin not in packing._PACKED
    grouped = nn.Conv2d(8, 8, 3, padding="same", groups=2)
    assert pack_convolutions(nn.Sequential(grouped)) == 0  # padding given as a string: left as it is

