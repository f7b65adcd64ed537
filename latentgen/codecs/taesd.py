"""A tiny autoencoder for latent diffusion latents: the TAESD architecture (Ollin Boer Bohan, 2023), about 1.2 M
parameters per half, three-conv residual blocks of 64 channels and one nearest-neighbour upsampling (or strided
conv) per factor of two.

It works in the denoiser's latent space directly (the scaled latents a KL codec's `encode` returns), so it can
stand in for a big decoder at sampling time (the `tiny_decoder` adapter) or be trained as a codec of its own.
The module order is the published one, so the released `taesd_decoder.pth` / `taesd_encoder.pth` state dicts
(keys `1.weight`, `3.conv.0.weight`, ...) and the diffusers `AutoencoderTiny` layout (`decoder.layers.N`,
`encoder.layers.N`) load as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from latentgen.contracts import Codec
from latentgen.errors import CheckpointError


def _conv(n_in: int, n_out: int, **options) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **options)


class _Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + skip(x))."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_decoder(latent_channels: int = 4, channels: int = 64, upsamplings: int = 3) -> nn.Sequential:
    """Latents -> images in about [0, 1]; the published decoder for 3 upsamplings (factor 8)."""
    layers: list[nn.Module] = [_Clamp(), _conv(latent_channels, channels), nn.ReLU()]
    for _ in range(upsamplings):
        layers += [_Block(channels, channels), _Block(channels, channels), _Block(channels, channels),
                   nn.Upsample(scale_factor=2), _conv(channels, channels, bias=False)]
    layers += [_Block(channels, channels), _conv(channels, 3)]
    return nn.Sequential(*layers)


def tiny_encoder(latent_channels: int = 4, channels: int = 64, downsamplings: int = 3) -> nn.Sequential:
    """Images in [0, 1] -> latents; the published encoder for 3 downsamplings."""
    layers: list[nn.Module] = [_conv(3, channels), _Block(channels, channels)]
    for _ in range(downsamplings):
        layers += [_conv(channels, channels, stride=2, bias=False), _Block(channels, channels),
                   _Block(channels, channels), _Block(channels, channels)]
    layers.append(_conv(channels, latent_channels))
    return nn.Sequential(*layers)


def read_half(path: str | Path, half: str) -> dict[str, torch.Tensor]:
    """A published TAESD half ("encoder" or "decoder") as this module's state dict: a taesd_*.pth state dict
    (read with weights_only), a .safetensors of the same keys, or a diffusers AutoencoderTiny file."""
    from latentgen.interop.weights_file import WeightsFile

    weights = WeightsFile(path)
    keys = weights.keys()
    prefix = f"{half}.layers."
    if any(key.startswith(prefix) for key in keys):  # diffusers: the decoder's clamp is not a layer
        shift = 1 if half == "decoder" else 0
        state = {}
        for key in keys:
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                state[f"{int(index) + shift}.{rest}"] = weights.tensor(key, torch.float32)
    else:
        state = {key: weights.tensor(key, torch.float32) for key in keys}
    weights.release()
    if not state or not all(key.split(".", 1)[0].isdigit() for key in state):
        raise CheckpointError(f"'{path}' is not a TAESD {half}: expected the keys of taesd_{half}.pth ('1.weight', "
                              f"'3.conv.0.weight', ...) or of a diffusers AutoencoderTiny ('{prefix}N...'); "
                              f"got {sorted(state)[:3]}")
    return state


def decoder_sizes(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(latent_channels, channels, upsamplings) of a decoder state dict in this layout."""
    last = max(int(key.split(".", 1)[0]) for key in state)  # 3 + 5 per upsampling + 1
    if "1.weight" not in state or (last - 4) % 5:
        raise CheckpointError(f"a TAESD decoder's layers are numbered 1 (first conv) to 4 + 5 n (last conv); got "
                              f"{sorted(state)[:3]} ... {last}")
    channels, latent_channels = state["1.weight"].shape[:2]
    return int(latent_channels), int(channels), (last - 4) // 5


class TinyAutoencoder(Codec):
    """TAESD as a codec: `encode` gives latents in the space the decoder reads (with `scale_factor`, 1 for the
    published weights, which read SD's scaled latents), `decode` images in [-1, 1].

    `decoder_path` / `encoder_path` load published halves (their sizes must match `latent_channels`,
    `channels` and `downsamplings`); `downsamplings` 3 is the published factor 8, 2 gives factor 4 (the shapes
    demo's codec).
    """

    def __init__(self, latent_channels: int = 4, channels: int = 64, downsamplings: int = 3,
                 scale_factor: float = 1.0, decoder_path: str | None = None, encoder_path: str | None = None):
        super().__init__()
        for option, value, low in (("latent_channels", latent_channels, 1), ("channels", channels, 1),
                                   ("downsamplings", downsamplings, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"codec 'taesd': {option} must be an integer >= {low}; got {value!r}")
        if not scale_factor > 0:
            raise ValueError(f"codec 'taesd': scale_factor must be positive; got {scale_factor!r}")
        self.latent_channels, self.downsamplings = latent_channels, downsamplings
        self.downsampling_factor = 2 ** downsamplings
        self.scale_factor = float(scale_factor)
        self.encoder = tiny_encoder(latent_channels, channels, downsamplings)
        self.decoder = tiny_decoder(latent_channels, channels, downsamplings)
        for half, path in (("decoder", decoder_path), ("encoder", encoder_path)):
            if path is not None:
                self._load_half(half, path)

    def _load_half(self, half: str, path: str | Path) -> None:
        module = getattr(self, half)
        state = read_half(path, half)
        own = module.state_dict()
        wrong = [f"{key}: file {tuple(state[key].shape)} vs codec {tuple(own[key].shape)}" for key in own
                 if key in state and state[key].shape != own[key].shape]
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if wrong or missing or extra:
            raise CheckpointError(f"TAESD {half} '{path}' does not fit codec 'taesd' with latent_channels="
                                  f"{self.latent_channels}, downsamplings={self.downsamplings}: "
                                  f"{(wrong + [f'missing {k}' for k in missing] + [f'unexpected {k}' for k in extra])[:3]}")
        if module.state_dict()[next(iter(own))].device.type == "meta":
            module.load_state_dict(state, assign=True)
        else:
            module.load_state_dict(state)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.check_images(images)
        return self.encoder((images + 1) / 2) * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        return self.decoder(latents / self.scale_factor) * 2 - 1

    def last_layer(self) -> nn.Parameter:
        return self.decoder[-1].weight
