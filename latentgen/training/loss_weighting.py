"""Per-sample weights of the denoising loss: uniform, or min-SNR-gamma (Hang et al. 2023, "Efficient
Diffusion Training via Min-SNR Weighting Strategy", Eq. 8 and Sec. 3.4).

With x = x0 + sigma * noise the signal-to-noise ratio is SNR = 1 / sigma^2. Min-SNR-gamma weights the
x0 loss by min(SNR, gamma); the same weighting expressed on the other targets, whose squared errors
are the x0 error times SNR (eps) or SNR + 1 (v), is

    eps: min(SNR, gamma) / SNR        v: min(SNR, gamma) / (SNR + 1)        x0: min(SNR, gamma)
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("none", "min_snr")


def check_weighting(weighting: str, gamma: float | None) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown train.denoiser.loss_weighting '{weighting}'; choose one of {list(WEIGHTINGS)}")
    if weighting == "min_snr" and not (gamma is not None and float(gamma) > 0):
        raise ValueError(f"loss_weighting min_snr needs train.denoiser.snr_gamma > 0 (Hang et al. use 5); got {gamma}")


def loss_weights(sigma: torch.Tensor, prediction_type: str, weighting: str = "none",
                 gamma: float | None = None) -> torch.Tensor:
    """(B,) float32 weights for the per-sample squared error of the network's target at noise levels `sigma`."""
    check_weighting(weighting, gamma)
    sigma = sigma.to(torch.float64)
    if weighting == "none":
        return torch.ones_like(sigma, dtype=torch.float32)
    snr = sigma.pow(-2)  # inf at sigma = 0, 0 for pure noise
    clipped = snr.clamp(max=float(gamma))
    if prediction_type == "eps":
        weights = (float(gamma) / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, also where SNR = 0
    elif prediction_type == "v":
        weights = clipped / (snr + 1)
    elif prediction_type == "x0":
        weights = clipped
    else:
        raise ValueError(f"min-SNR weighting has no form for prediction_type '{prediction_type}'; use eps, v or x0")
    return weights.to(torch.float32)
