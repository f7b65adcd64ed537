"""Decoding with a tiny TAESD decoder instead of the pipeline's codec: an accelerator for sampling on a CPU (the
full VAE decoder is most of a few-step image's time; TAESD's is a small fraction of it), paid for in detail
(benchmarks/tiny_decoder.py measures both).

Encoding (img2img, inpainting) stays with the pipeline's own codec: only `decode` is replaced while attached.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from latentgen.contracts import Adapter
from latentgen.errors import AdapterError


class TinyDecoder(Adapter):
    """`path`: a TAESD decoder (the published taesd_decoder.pth / .safetensors, a diffusers AutoencoderTiny file,
    or one `latentgen-train experiment=tiny_decoder` distilled), reading the pipeline's latents."""

    def __init__(self, path: str):
        if not isinstance(path, (str, Path)) or not Path(path).is_file():
            raise AdapterError(f"adapter 'tiny_decoder': no TAESD decoder file '{path}'; pass path=<taesd_decoder.pth "
                               f"or a distilled tiny_decoder.safetensors>")
        self.path = str(path)
        self._decoder = None
        self._replaced = None

    def check(self, pipeline: Any) -> None:
        factor = pipeline.codec.downsampling_factor
        if factor < 2 or 2 ** round(math.log2(factor)) != factor:
            raise AdapterError(f"adapter 'tiny_decoder': codec '{pipeline.codec.name}' downsamples by {factor}; a "
                               f"TAESD decoder upsamples by a power of two")
        self._decoder = self._build(pipeline)  # reads and checks the file before anything changes

    def _build(self, pipeline: Any) -> Any:
        from latentgen.codecs.taesd import TinyAutoencoder, decoder_sizes, read_half

        codec = pipeline.codec
        try:
            state = read_half(self.path, "decoder")
            latent_channels, channels, upsamplings = decoder_sizes(state)
        except Exception as exc:
            raise AdapterError(f"adapter 'tiny_decoder': {exc}") from exc
        if (latent_channels, 2 ** upsamplings) != (codec.latent_channels, codec.downsampling_factor):
            raise AdapterError(f"adapter 'tiny_decoder' cannot decode for codec '{codec.name}' "
                               f"({codec.latent_channels} latent channels, factor {codec.downsampling_factor}): "
                               f"'{self.path}' decodes {latent_channels} channels by a factor {2 ** upsamplings}")
        tiny = TinyAutoencoder(latent_channels=latent_channels, channels=channels, downsamplings=upsamplings)
        tiny.decoder.load_state_dict(state)
        parameter = next(codec.parameters(), None)
        if parameter is not None:
            tiny.to(device=parameter.device, dtype=parameter.dtype)
        return tiny.eval()

    def apply(self, pipeline: Any) -> None:
        tiny = self._decoder if self._decoder is not None else self._build(pipeline)
        self._replaced = pipeline.codec
        pipeline.codec.decode = tiny.decode  # an instance attribute: the class's decode comes back when deleted

    def remove(self, pipeline: Any) -> None:
        if self._replaced is not None and "decode" in vars(self._replaced):
            del self._replaced.decode
        self._replaced, self._decoder = None, None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path}
