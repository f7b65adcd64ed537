"""latentgen: latent diffusion (Rombach et al. 2022) as pluggable codecs, denoisers, conditioners and schedulers."""

from latentgen import contracts, registry

__version__ = "0.1.0"
__all__ = [*contracts.__all__, "LatentDiffusionPipeline", "registry"]


def __getattr__(name: str):
    # The base classes of the kinds (latentgen.kinds) and the pipeline, imported when first asked for.
    if name in contracts.__all__:
        return getattr(contracts, name)
    if name == "LatentDiffusionPipeline":
        from latentgen.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'latentgen' has no attribute {name!r}")
