"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", Eq. 1, VGG16 variant), the perceptual term of the LDM first-stage loss.

latentgen ships no weights and downloads none: every weight comes from a file the user supplies
(`train.codec.perceptual_weights`). The file is a flat {name: tensor} mapping, as .safetensors or
as a torch state dict (read with weights_only=True), with the key layout of the LPIPS module of
taming-transformers / LDM, which `lpips.LPIPS(net="vgg").state_dict()` also has:

    net.slice1.{0,2}.{weight,bias}          VGG16 conv1_1, conv1_2
    net.slice2.{5,7}.{weight,bias}          conv2_*
    net.slice3.{10,12,14}.{weight,bias}     conv3_*
    net.slice4.{17,19,21}.{weight,bias}     conv4_*
    net.slice5.{24,26,28}.{weight,bias}     conv5_*
    lin{0..4}.model.1.weight                the learned 1x1 heads (1, C, 1, 1), non-negative

`scaling_layer.{shift,scale}` and `lins.*` (aliases of `lin*` in the lpips package) may be present;
the first must hold LPIPS's constants, the second is ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from latentgen.errors import CheckpointError

__all__ = ["LPIPS", "load_lpips"]

log = logging.getLogger(__name__)

# VGG16's convolution widths per tap, and the index of each layer in torchvision's `features`
# (which the checkpoint keys use): conv, relu pairs with max-pools between the five blocks.
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# ImageNet statistics expressed for inputs in [-1, 1] (LPIPS's ScalingLayer).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """d(x, y) (B,) for images in [-1, 1]: per VGG16 tap (relu1_2 .. relu5_3), unit-normalize the
    features over channels, square their difference, weight channels by a non-negative 1x1 head,
    average over space, sum over taps. Frozen and always in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = nn.Module()
        index, width = 0, 3
        for block, widths in enumerate(VGG_BLOCKS, start=1):
            stage = nn.Sequential()
            if block > 1:
                stage.add_module(str(index), nn.MaxPool2d(kernel_size=2, stride=2))
                index += 1
            for out in widths:
                stage.add_module(str(index), nn.Conv2d(width, out, kernel_size=3, padding=1))
                stage.add_module(str(index + 1), nn.ReLU())
                index, width = index + 2, out
            setattr(self.net, f"slice{block}", stage)
        for tap, widths in enumerate(VGG_BLOCKS):
            setattr(self, f"lin{tap}", _Head(widths[-1]))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: no dropout, whatever the caller's mode

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = (images - self.shift) / self.scale
        taps = []
        for block in range(1, len(VGG_BLOCKS) + 1):
            h = getattr(self.net, f"slice{block}")(h)
            taps.append(h)  # (B, C_tap, H / 2^(block-1), W / 2^(block-1))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS compares two image batches of one shape (B, 3, H, W); got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        distance = x.new_zeros(x.shape[0])
        for tap, (fx, fy) in enumerate(zip(self.features(x), self.features(y))):
            difference = (_unit_normalize(fx) - _unit_normalize(fy)).pow(2)
            distance = distance + getattr(self, f"lin{tap}")(difference).mean(dim=(1, 2, 3))
        return distance


class _Head(nn.Module):
    """A learned non-negative 1x1 conv from C channels to 1, as `lin{i}.model.1` of the original layout."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # The dropout only keeps the original key index `model.1`; it is inactive in eval mode.
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_lpips(path: str | Path) -> LPIPS:
    """An LPIPS network with every weight read from `path`; a clear error for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"perceptual loss weights '{path}' do not exist; set train.codec.perceptual_weights to an LPIPS-VGG16 "
            f"weights file (see latentgen.training.perceptual), or train.codec.perceptual_weight=0 to train without it"
        )
    state = _read_flat_tensors(path)
    with torch.device("meta"):  # shapes only: every weight comes from the file, so none is initialized
        model = LPIPS()
    expected = model.state_dict()
    for key in [k for k in state if k.startswith("lins.")]:
        del state[key]
    for name, constant in (("shift", SHIFT), ("scale", SCALE)):
        given = state.pop(f"scaling_layer.{name}", None)
        if given is not None and not torch.allclose(given.float().flatten(), torch.tensor(constant), atol=1e-4):
            raise CheckpointError(f"perceptual loss weights '{path}': scaling_layer.{name} is {given.flatten().tolist()}, "
                                  f"not LPIPS's {list(constant)}; this is not an LPIPS file")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [f"{label} {len(keys)} key(s), first: {', '.join(keys[:4])}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape of", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"perceptual loss weights '{path}' do not fit the LPIPS-VGG16 layout: {'; '.join(problems)}. "
                              f"The expected keys are documented in latentgen.training.perceptual")
    negative = [k for k in expected if k.startswith("lin") and (state[k] < 0).any()]
    if negative:
        raise CheckpointError(f"perceptual loss weights '{path}': the LPIPS heads must be non-negative, but "
                              f"{', '.join(negative)} have negative entries")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.shift, model.scale = (torch.tensor(c).view(1, 3, 1, 1) for c in (SHIFT, SCALE))  # not in the file
    model.requires_grad_(False)  # assign=True took the file's tensors as they are
    log.info("perceptual loss: LPIPS-VGG16 weights from %s", path)
    return model


def _read_flat_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets the same, actionable message
        raise CheckpointError(f"perceptual loss weights '{path}' could not be read ({type(exc).__name__}: {exc}); "
                              f"give a .safetensors file or a torch state dict of tensors") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"perceptual loss weights '{path}' is not a flat {{name: tensor}} state dict "
                              f"(got {type(state).__name__}); save `module.state_dict()` itself")
    return dict(state)
