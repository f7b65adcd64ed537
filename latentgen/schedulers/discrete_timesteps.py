"""The model's discrete timestep schedule, for samplers that work on training timesteps (lcm, tcd).

A `denoise` object may expose `noise_schedule` (a DiscreteNoiseSchedule): the pipeline's
ClassifierFreeGuidance and NoiseLevelExperts do. A plain function has none, and then Stable Diffusion's
schedule is assumed (scaled_linear betas 0.00085..0.012 over 1000 steps): every published LCM and TCD
model (and LCM-LoRA) was distilled on it.
"""

from __future__ import annotations

import functools

from latentgen.diffusion.noise_schedule import DiscreteNoiseSchedule


@functools.lru_cache(maxsize=1)
def stable_diffusion_schedule() -> DiscreteNoiseSchedule:
    """Stable Diffusion's DDPM schedule: scaled_linear, beta 0.00085 to 0.012, 1000 timesteps."""
    return DiscreteNoiseSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)


def noise_schedule_of(denoise: object) -> DiscreteNoiseSchedule:
    """`denoise.noise_schedule` when it has one, else Stable Diffusion's (`stable_diffusion_schedule`)."""
    schedule = getattr(denoise, "noise_schedule", None)
    if schedule is None:
        return stable_diffusion_schedule()
    if not isinstance(schedule, DiscreteNoiseSchedule):
        raise TypeError(f"denoise.noise_schedule must be a DiscreteNoiseSchedule (or None); got "
                        f"{type(schedule).__name__}")
    return schedule
