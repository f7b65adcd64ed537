"""Evaluation numerics against references: Fréchet distance (closed forms for Gaussians, scipy's
sqrtm), SSIM and PSNR (scikit-image, hand computation), the digits classifier and codec fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentgen import registry
from latentgen.evaluation.codec_fidelity import NATURAL_IMAGES, fidelity, natural_images, reconstruct
from latentgen.evaluation.digits_classifier import digit_space, fit_digits_classifier, score_digits
from latentgen.evaluation.frechet import frechet_distance, frechet_distance_of_features, gaussian_statistics
from latentgen.evaluation.image_quality import PSNR_MAX_DB, psnr, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")


def _random_covariance(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.standard_normal((dim, rank or dim))
    return factor @ factor.T / dim


# ---- Fréchet distance -----------------------------------------------------------------------------

def test_frechet_distance_of_one_dimensional_gaussians_is_the_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    mean_a, mean_b = rng.standard_normal(5), rng.standard_normal(5)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    result = frechet_distance(mean_a, rotation @ np.diag(a) @ rotation.T, mean_b, rotation @ np.diag(b) @ rotation.T)
    assert result == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_the_general_formula_with_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    mean_a, mean_b = rng.standard_normal(8), rng.standard_normal(8)
    cov_a, cov_b = _random_covariance(rng, 8), _random_covariance(rng, 8)
    reference = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy_linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(reference, rel=1e-8)
    # Symmetric in its two arguments although the formula is not written symmetrically.
    assert frechet_distance(mean_b, cov_b, mean_a, cov_a) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(2)
    cov_a, cov_b = _random_covariance(rng, 3), _random_covariance(rng, 3)
    mean_a, mean_b = np.zeros(3), np.array([1.0, 0.0, -0.5])
    a = rng.multivariate_normal(mean_a, cov_a, size=50_000)
    b = rng.multivariate_normal(mean_b, cov_b, size=50_000)
    assert frechet_distance_of_features(a, b) == pytest.approx(frechet_distance(mean_a, cov_a, mean_b, cov_b), rel=0.03)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(3)
    full = rng.standard_normal((500, 16))
    few = rng.standard_normal((10, 64))  # 10 samples in 64 dimensions: covariance of rank 9
    for features in (full, few, torch.from_numpy(few).float()):
        distance = frechet_distance_of_features(features, features)
        assert np.isfinite(distance) and distance == pytest.approx(0.0, abs=1e-6)
    # A pure shift adds its squared length and nothing else.
    assert frechet_distance_of_features(full, full + 0.5) == pytest.approx(16 * 0.25, rel=1e-8)
    low_rank = _random_covariance(rng, 6, rank=2)
    assert np.isfinite(frechet_distance(np.zeros(6), low_rank, np.ones(6), _random_covariance(rng, 6, rank=3)))


def test_frechet_distance_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match=r"covariance_b must have shape \(2, 2\)"):
        frechet_distance([0, 0], np.eye(2), [0, 0], np.eye(3))
    with pytest.raises(ValueError, match=r"N >= 2"):
        gaussian_statistics(np.zeros((1, 4)))


# ---- SSIM and PSNR --------------------------------------------------------------------------------

def _pairs():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 37, 45, generator=generator, dtype=torch.float64)
    yield noise, (noise + 0.2 * torch.randn(noise.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    photos, _ = natural_images(64)
    photos = (photos.double() + 1) / 2
    yield photos, (photos + 0.05 * torch.randn(photos.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    yield photos, torch.nn.functional.avg_pool2d(photos, 3, stride=1, padding=1, count_include_pad=False)


@pytest.mark.parametrize("pair", range(3))
def test_ssim_matches_scikit_image(pair):
    a, b = list(_pairs())[pair]
    ours = ssim(a, b)
    reference = [skimage_metrics.structural_similarity(x.numpy(), y.numpy(), gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, data_range=1.0, channel_axis=0)
                 for x, y in zip(a, b)]
    assert ours.numpy() == pytest.approx(np.array(reference), abs=1e-4)
    assert ours.dtype == torch.float64


def test_ssim_of_an_image_with_itself_is_one_and_drops_with_distortion():
    a, b = next(_pairs())
    assert ssim(a, a).numpy() == pytest.approx(1.0, abs=1e-12)
    assert (ssim(a, b) < 0.9).all()


def test_psnr_matches_a_hand_computation():
    a = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    assert float(psnr(a, a + 0.1)[0]) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 -> 10 log10(100)
    b = a.clone()
    b[0, 0, 0, 0] = 0.0  # one pixel off by 0.5: MSE = 0.25 / 192
    assert float(psnr(a, b)[0]) == pytest.approx(10 * np.log10(192 / 0.25), abs=1e-9)
    assert float(psnr(a, a)[0]) == PSNR_MAX_DB  # finite, so eval.json stays valid JSON
    x, y = next(_pairs())
    reference = [skimage_metrics.peak_signal_noise_ratio(p.numpy(), q.numpy(), data_range=1.0) for p, q in zip(x, y)]
    assert psnr(x, y).numpy() == pytest.approx(np.array(reference), rel=1e-10)


def test_image_quality_refuses_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ---- codec fidelity ----------------------------------------------------------------------------

def test_natural_images_are_square_colour_photographs_in_range():
    images, names = natural_images(48)
    assert images.shape == (len(NATURAL_IMAGES), 3, 48, 48) and names == list(NATURAL_IMAGES)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.2
    assert (images[:, 0] - images[:, 1]).abs().mean() > 0.02  # colour, not gray


def test_codec_fidelity_of_a_perfect_codec_and_a_refused_size():
    identity = registry.build("codec", "identity")
    images, _ = natural_images(32)
    scores = fidelity(images, reconstruct(identity, images))
    assert scores["psnr"] == PSNR_MAX_DB and scores["ssim"] == pytest.approx(1.0, abs=1e-9)
    kl = registry.build("codec", "kl", channels=32, channel_mult=[1, 1, 1], num_res_blocks=1, resolution=16)
    with pytest.raises(ValueError, match="multiple of 4"):
        reconstruct(kl, torch.zeros(1, 3, 18, 18))


# ---- digits -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_classifier():
    return fit_digits_classifier(seed=0, image_size=32)


def test_digit_space_inverts_the_datasets_mapping():
    from latentgen.datasets.digits import DigitsDataset
    from sklearn.datasets import load_digits

    raw = load_digits().images.reshape(-1, 64)
    small = DigitsDataset(image_size=8, split="test")
    mapped = digit_space(torch.stack([small[i]["image"] for i in range(20)]))
    # At 8x8 the mapping is exact: every row is one of scikit-learn's digits.
    assert all(np.abs(raw - row).sum(axis=1).min() < 1e-4 for row in mapped)
    large = DigitsDataset(image_size=32, split="test")
    back = digit_space(torch.stack([large[i]["image"] for i in range(20)]))
    assert np.abs(back - mapped).mean() < 1.0  # of 0..16: bicubic up, area average down


def test_digits_classifier_reads_real_digits_and_catches_wrong_ones(digits_classifier):
    from latentgen.datasets.digits import DigitsDataset

    classifier, accuracy = digits_classifier
    assert accuracy["held_out_accuracy"] > 0.97 and accuracy["held_out_accuracy_through_image_size"] > 0.97
    data = DigitsDataset(image_size=32, split="test")
    images = torch.stack([data[i]["image"] for i in range(100)])
    labels = [data[i]["label"] for i in range(100)]
    right = score_digits(classifier, images, labels)
    wrong = score_digits(classifier, images, [(label + 1) % 10 for label in labels])
    assert right["accuracy"] > 0.95 and wrong["accuracy"] < 0.05
    assert set(right["accuracy_per_class"]) <= {f"{d} ({w})" for d, w in
                                                enumerate(("zero", "one", "two", "three", "four", "five", "six",
                                                           "seven", "eight", "nine"))}
    with pytest.raises(ValueError, match="one label per image"):
        score_digits(classifier, images, labels[:3])
