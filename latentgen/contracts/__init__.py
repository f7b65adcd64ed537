"""The four abstract component kinds that every codec, denoiser, conditioner and scheduler implements."""

from latentgen.contracts.codec import Codec
from latentgen.contracts.conditioner import Conditioner
from latentgen.contracts.denoiser import Denoiser
from latentgen.contracts.scheduler import Scheduler

__all__ = ["Codec", "Conditioner", "Denoiser", "Scheduler"]
