"""Full-reference image quality: PSNR and SSIM (Wang et al. 2004, "Image Quality Assessment: From Error
Visibility to Structural Similarity", Eq. 13) of reconstructions against their originals.

Both take images (B, C, H, W) with values in [0, 1] (data range 1). SSIM follows the paper's
settings: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
statistics within the window, computed per channel on RGB and averaged over channels and over the
positions where the window lies fully inside the image. This is what
`skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=...)` computes. Statistics are float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # 5: the window is 11 pixels wide, truncated at 3.5 sigma
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_MAX_DB = 100.0  # an exact reconstruction (MSE 0) reports this instead of infinity


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"{what} needs two image batches of the same shape (B, C, H, W); "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,), float64, for images in [0, 1]: 10 log10(1 / MSE)."""
    _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_MAX_DB / 10)))


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> torch.Tensor:
    """Normalized 1-D Gaussian weights (2 * radius + 1,), float64."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-offsets.square() / (2 * sigma**2))
    return weights / weights.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity per image (B,), float64, for images in [0, 1] (see the module docstring)."""
    _check_pair(a, b, "ssim")
    size = 2 * SSIM_RADIUS + 1
    if min(a.shape[-2:]) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size} pixels (its Gaussian window); "
                         f"got {tuple(a.shape[-2:])}")
    batch, channels = a.shape[:2]
    x = a.double().reshape(batch * channels, 1, *a.shape[-2:])
    y = b.double().reshape(batch * channels, 1, *b.shape[-2:])
    window = gaussian_window().to(x.device)

    def blur(image: torch.Tensor) -> torch.Tensor:
        # Separable and 'valid': only positions whose whole window lies inside the image.
        return F.conv2d(F.conv2d(image, window.view(1, 1, -1, 1)), window.view(1, 1, 1, -1))

    mean_x, mean_y = blur(x), blur(y)
    variance_x = blur(x * x) - mean_x.square()
    variance_y = blur(y * y) - mean_y.square()
    covariance = blur(x * y) - mean_x * mean_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K L)^2 with data range L = 1
    index = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / \
        ((mean_x.square() + mean_y.square() + c1) * (variance_x + variance_y + c2))  # (B * C, 1, H', W')
    return index.reshape(batch, channels, -1).mean(dim=(1, 2))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (latentgen's convention) -> [0, 1], clipped."""
    return ((images.float() + 1) / 2).clamp(0, 1)

