"""A loss-curve PNG drawn with PIL alone: log-scale loss against step, raw and smoothed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 400)
MARGINS = (72, 34, 20, 46)  # left (tick labels and axis title), top (title), right, bottom (tick labels and axis title)
RAW_COLOUR = (170, 198, 232)
SMOOTHED_COLOUR = (26, 82, 170)
AXIS_COLOUR = (0, 0, 0)
GRID_COLOUR = (228, 228, 228)
TEXT_COLOUR = (0, 0, 0)
SMOOTHING_SPAN_FRACTION = 1 / 25  # the moving average spans 4% of the points
MIN_POSITIVE_LOSS = 1e-12  # a log axis cannot show 0; such values sit at the floor


def smooth(values: Sequence[float], span: float) -> list[float]:
    """Bias-corrected exponential moving average over about `span` points (span <= 1: unchanged).

    The correction divides by 1 - weight**n, as TensorBoard's smoothing does, so the curve starts at
    the first value instead of rising from zero.
    """
    weight = 1.0 - 1.0 / max(1.0, span)
    average, out = 0.0, []
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n) if weight else average)
    return out


def _nice_steps(low: float, high: float, target: int) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    spacing = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / spacing) * spacing
    return [first + i * spacing for i in range(int((high - first) / spacing + 1e-9) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """Loss ticks for a log axis: powers of ten, with 2 and 5 between them when the range is short."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0**d for d in decades for m in mantissas if low <= m * 10.0**d <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks or [low, high]


@dataclass(frozen=True)
class Axes:
    """Maps (step, loss) to pixels: step linear left to right, log10(loss) bottom to top."""

    left: int
    top: int
    right: int
    bottom: int
    step_range: tuple[float, float]
    log_loss_range: tuple[float, float]

    def to_pixel(self, step: float, loss: float) -> tuple[float, float]:
        (s0, s1), (l0, l1) = self.step_range, self.log_loss_range
        x = self.left + (step - s0) / (s1 - s0) * (self.right - self.left)
        y = self.bottom - (math.log10(max(loss, MIN_POSITIVE_LOSS)) - l0) / (l1 - l0) * (self.bottom - self.top)
        return x, y


def axes_for(steps: Sequence[int], losses: Sequence[float], size: tuple[int, int] = SIZE) -> Axes:
    """The axes `draw_loss_curve` uses for these points (padded by 5% of the log range)."""
    left, top, right, bottom = MARGINS
    logs = [math.log10(max(loss, MIN_POSITIVE_LOSS)) for loss in losses]
    low, high = min(logs), max(logs)
    pad = max(0.05 * (high - low), 0.05)
    first, last = min(steps), max(steps)
    return Axes(left, top, size[0] - right, size[1] - bottom, (first, last if last > first else first + 1),
                (low - pad, high + pad))


def draw_loss_curve(steps: Sequence[int], losses: Sequence[float], title: str = "",
                    size: tuple[int, int] = SIZE) -> Image.Image:
    """The raw losses as a faint line and their moving average as a bold one, on a log axis."""
    points = [(int(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(v)]
    if not points:
        raise ValueError("draw_loss_curve needs at least one finite loss")
    steps, losses = [s for s, _ in points], [v for _, v in points]
    axes = axes_for(steps, losses, size)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    low, high = (10**v for v in axes.log_loss_range)
    for tick in _log_ticks(low, high):
        _, y = axes.to_pixel(steps[0], tick)
        draw.line([(axes.left, y), (axes.right, y)], fill=GRID_COLOUR)
        label = f"{tick:.3g}"
        width = draw.textbbox((0, 0), label, font=font)[2]
        draw.text((axes.left - 6 - width, y - 6), label, fill=TEXT_COLOUR, font=font)
    for tick in _nice_steps(*axes.step_range, target=6):
        x, _ = axes.to_pixel(tick, low)
        draw.line([(x, axes.top), (x, axes.bottom)], fill=GRID_COLOUR)
        label = f"{tick:g}"
        width = draw.textbbox((0, 0), label, font=font)[2]
        draw.text((x - width / 2, axes.bottom + 5), label, fill=TEXT_COLOUR, font=font)

    pixels = [axes.to_pixel(s, v) for s, v in points]
    smoothed = [math.log10(max(v, MIN_POSITIVE_LOSS)) for v in losses]
    smoothed = smooth(smoothed, len(smoothed) * SMOOTHING_SPAN_FRACTION)
    smoothed_pixels = [axes.to_pixel(s, 10**v) for s, v in zip(steps, smoothed)]
    if len(pixels) > 1:
        draw.line(pixels, fill=RAW_COLOUR, width=1)
        draw.line(smoothed_pixels, fill=SMOOTHED_COLOUR, width=2, joint="curve")
    else:
        x, y = smoothed_pixels[0]
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=SMOOTHED_COLOUR)

    draw.rectangle((axes.left, axes.top, axes.right, axes.bottom), outline=AXIS_COLOUR)
    x_title = "step"
    width = draw.textbbox((0, 0), x_title, font=font)[2]
    draw.text(((axes.left + axes.right - width) / 2, size[1] - 18), x_title, fill=TEXT_COLOUR, font=font)
    y_title = "loss (log scale)"
    box = draw.textbbox((0, 0), y_title, font=font)
    label = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
    ImageDraw.Draw(label).text((1, 0), y_title, fill=TEXT_COLOUR, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (4, int((axes.top + axes.bottom - label.height) / 2)))
    final = f"final (smoothed) {10 ** smoothed[-1]:.4g}"
    caption = f"{title}   {final}" if title else final
    draw.text((axes.left, 10), caption, fill=TEXT_COLOUR, font=font)
    return image


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: Path | str, title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_loss_curve(steps, losses, title).save(path)
    return path
