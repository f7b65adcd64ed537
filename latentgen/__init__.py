"""latentgen: latent diffusion (Rombach et al. 2022) as pluggable codecs, denoisers, conditioners and schedulers."""

from latentgen import registry
from latentgen.contracts import Codec, Conditioner, Denoiser, Scheduler

__version__ = "0.1.0"
__all__ = ["Codec", "Conditioner", "Denoiser", "LatentDiffusionPipeline", "Scheduler", "registry"]


def __getattr__(name: str):
    # The pipeline pulls in the diffusion and checkpoint modules; import it only when asked for.
    if name == "LatentDiffusionPipeline":
        from latentgen.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'latentgen' has no attribute {name!r}")
