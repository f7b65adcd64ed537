"""The loss-curve PNG: written at the expected size, the smoothed curve where the axes put it and moving
the way the loss moves, the log axis and the smoothing checked against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from latentgen.training.loss_curve import (SIZE, SMOOTHED_COLOUR, SMOOTHING_SPAN_FRACTION, axes_for, draw_loss_curve,
                                           save_loss_curve, smooth)


def _curve_rows(image: Image.Image) -> dict[int, float]:
    """Column -> mean row of the smoothed curve's pixels in that column."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    mask = (np.abs(pixels - np.array(SMOOTHED_COLOUR)).sum(-1) <= 30)
    return {x: float(np.nonzero(mask[:, x])[0].mean()) for x in range(mask.shape[1]) if mask[:, x].any()}


def _noisy(trend, steps=600, seed=0):
    rng = np.random.default_rng(seed)
    return [trend(s) * math.exp(rng.normal(0, 0.2)) for s in range(1, steps + 1)]


@pytest.mark.parametrize("direction", ["decreasing", "increasing"])
def test_curve_moves_the_way_the_loss_moves(tmp_path, direction):
    falling, rising = (lambda s: 2.0 * math.exp(-s / 150) + 0.02), (lambda s: 0.01 * (1 + s / 20))
    trend = falling if direction == "decreasing" else rising
    steps, losses = list(range(1, 601)), _noisy(trend)
    path = save_loss_curve(steps, losses, tmp_path / "loss_denoiser.png", "stage 2: denoiser")
    image = Image.open(path)
    assert image.size == SIZE == (640, 400) and image.format == "PNG"
    rows = _curve_rows(image)
    axes = axes_for(steps, losses)
    assert min(rows) <= axes.left + 3 and max(rows) >= axes.right - 3  # spans the plot
    first, last = np.mean([rows[x] for x in sorted(rows)[:20]]), np.mean([rows[x] for x in sorted(rows)[-20:]])
    # Image rows grow downwards: a falling loss ends lower on the picture, a rising one higher.
    assert (last - first > 100) if direction == "decreasing" else (first - last > 100)
    # Where the curve is drawn is where the axes put the smoothed values (within the 2-pixel line).
    smoothed = [10**v for v in smooth([math.log10(v) for v in losses], len(losses) * SMOOTHING_SPAN_FRACTION)]
    for index in (100, 300, 599):
        x, y = axes.to_pixel(steps[index], smoothed[index])
        column = int(round(x))
        if column in rows:
            assert abs(rows[column] - y) <= 3, (index, rows[column], y)


def test_log_axis_puts_each_decade_the_same_distance_apart():
    axes = axes_for([0, 100], [1e-3, 1.0])
    ys = [axes.to_pixel(50, 10.0**k)[1] for k in (-3, -2, -1, 0)]
    gaps = np.diff(ys)
    assert np.allclose(gaps, gaps[0]) and gaps[0] < 0  # equal steps, upwards
    assert axes.to_pixel(0, 1.0)[0] == axes.left and axes.to_pixel(100, 1.0)[0] == axes.right
    assert axes.top < axes.to_pixel(0, 1.0)[1] < axes.to_pixel(0, 1e-3)[1] < axes.bottom  # 5% padding


def test_smoothing_matches_a_direct_bias_corrected_average():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    span = 4.0
    weight = 1 - 1 / span
    for n in range(1, len(values) + 1):
        weights = [(1 - weight) * weight ** (n - 1 - i) for i in range(n)]
        expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        assert smooth(values, span)[n - 1] == pytest.approx(expected)
    assert smooth([2.0] * 10, 5.0) == pytest.approx([2.0] * 10)
    assert smooth(values, 1.0) == values


def test_short_odd_and_bad_inputs():
    draw_loss_curve([7], [0.3])  # one point: a dot, no crash
    image = draw_loss_curve([1, 2, 3, 4], [0.5, float("nan"), 0.0, 0.25])  # NaN dropped, 0 at the floor
    assert image.size == SIZE
    with pytest.raises(ValueError, match="at least one finite loss"):
        draw_loss_curve([1, 2], [float("inf"), float("nan")])
