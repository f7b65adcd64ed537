"""The encoder/decoder pair and latent bookkeeping that the KL and VQ codecs share (LDM `ddconfig`)."""

from __future__ import annotations

from collections.abc import Sequence

from latentgen.contracts import Codec
from latentgen.nn.autoencoder import Decoder, Encoder


def build_autoencoder_body(codec: Codec, label: str, *, latent_channels: int, channels: int,
                           channel_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                           resolution: int, dropout: float, z_channels: int | None, scale_factor: float,
                           image_channels: int, double_z: bool) -> int:
    """Validate the shared options, set the codec's declared capabilities and its `encoder` / `decoder`;
    returns z_channels (the width between encoder/decoder and the latent 1x1 convs)."""
    channel_mult = tuple(int(m) for m in channel_mult)
    if latent_channels <= 0 or not channel_mult:
        raise ValueError(f"codec '{label}' needs latent_channels > 0 and a non-empty channel_mult; got "
                         f"latent_channels={latent_channels}, channel_mult={channel_mult}")
    if scale_factor <= 0:
        raise ValueError(f"codec '{label}' needs scale_factor > 0; got {scale_factor}")
    z_channels = latent_channels if z_channels is None else z_channels
    codec.latent_channels = int(latent_channels)
    codec.downsampling_factor = 2 ** (len(channel_mult) - 1)
    codec.scale_factor = float(scale_factor)
    codec.image_channels = int(image_channels)
    architecture = dict(ch=channels, ch_mult=channel_mult, num_res_blocks=num_res_blocks,
                        attn_resolutions=tuple(attn_resolutions), dropout=dropout, resolution=resolution,
                        z_channels=z_channels)
    codec.encoder = Encoder(in_channels=image_channels, double_z=double_z, **architecture)
    codec.decoder = Decoder(out_ch=image_channels, **architecture)
    return z_channels
