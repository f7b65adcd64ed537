"""Sampler accuracy against the exact probability-flow ODE solution, per number of model evaluations.

The data is the 2-D Gaussian mixture of latentgen.testing.analytic (the one the accuracy tests use), whose ideal denoiser is
closed-form; the reference is a fine RK4 solution (float64). For every deterministic scheduler option
(Hydra group `scheduler`), on a Karras grid: the max error over 64 paths at each step count, with the
model evaluations (NFE) counted. Prints a table and writes a log-log plot of error against NFE.

    python benchmarks/samplers.py [--out samplers.png]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

from latentgen.config import compose, group_options
from latentgen.diffusion.sigma_grids import karras
from latentgen.pipeline import build_component
from latentgen.testing import empirical_order
from latentgen.testing.analytic import ACCURACY_MIXTURE, ACCURACY_SIGMA_MAX, ACCURACY_SIGMA_MIN, accuracy_reference

STEPS = (5, 10, 20, 40, 80, 160, 320)


def build(option: str):
    return build_component("scheduler", compose("train", ["experiment=smoke", f"scheduler={option}"]).scheduler)
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aa5500", "#0055aa", "#55aa00", "#aa0055", "#5500aa"]


def measure() -> dict[str, list[tuple[int, int, float]]]:
    """option -> [(steps, nfe, max error)] for every deterministic option."""
    x, exact = accuracy_reference()
    results = {}
    for option in group_options("scheduler"):
        sampler = build(option)
        if sampler.stochastic:
            continue
        rows = []
        for steps in STEPS:
            calls = [0]

            def denoise(x, sigma):
                calls[0] += 1
                return ACCURACY_MIXTURE.denoise(x, sigma)

            out = sampler(denoise, x.clone(), karras(steps, ACCURACY_SIGMA_MIN, ACCURACY_SIGMA_MAX))
            rows.append((steps, calls[0], (out - exact).norm(dim=-1).max().item()))
        results[option] = rows
    return results


def table(results) -> str:
    header = f"{'sampler':<20}{'order':>6}{'fit':>6}" + "".join(f"{f'{n} steps':>17}" for n in STEPS)
    lines = [header, f"{'':<32}" + "".join(f"{'NFE  max error':>17}" for _ in STEPS)]
    for option, rows in results.items():
        fit = empirical_order([r[0] for r in rows[-4:]], [r[2] for r in rows[-4:]])  # the asymptotic range
        cells = "".join(f"{nfe:>7}  {error:>8.1e}" for _, nfe, error in rows)
        lines.append(f"{option:<20}{build(option).order:>6}{fit:>6.2f}{cells}")
    return "\n".join(lines)


def plot(results, path: Path, size=(900, 640)) -> None:
    """Error against NFE on log-log axes, drawn with PIL (no plotting library needed)."""
    width, height = size
    left, right, top, bottom = 80, 230, 30, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    nfes = [nfe for rows in results.values() for _, nfe, _ in rows]
    errors = [max(error, 1e-16) for rows in results.values() for _, _, error in rows]
    x_lo, x_hi = math.floor(math.log10(min(nfes))), math.ceil(math.log10(max(nfes)))
    y_lo, y_hi = math.floor(math.log10(min(errors))), math.ceil(math.log10(max(errors)))

    def at(nfe, error):
        u = (math.log10(nfe) - x_lo) / (x_hi - x_lo)
        v = (math.log10(max(error, 1e-16)) - y_lo) / (y_hi - y_lo)
        return left + u * (width - left - right), height - bottom - v * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for decade in range(x_lo, x_hi + 1):
        x, _ = at(10**decade, 10**y_lo)
        draw.line([x, top, x, height - bottom], fill="#dddddd")
        draw.text((x - 10, height - bottom + 6), f"1e{decade}", fill="black")
    for decade in range(y_lo, y_hi + 1):
        _, y = at(10**x_lo, 10**decade)
        draw.line([left, y, width - right, y], fill="#dddddd")
        draw.text((left - 45, y - 6), f"1e{decade}", fill="black")
    draw.text(((width - right + left) // 2 - 120, height - 25), "model evaluations (NFE), log scale", fill="black")
    draw.text((8, top - 22), "max error against the exact ODE solution, log scale", fill="black")
    for index, (option, rows) in enumerate(results.items()):
        colour = COLOURS[index % len(COLOURS)]
        points = [at(nfe, error) for _, nfe, error in rows]
        draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        y = top + 8 + 18 * index
        draw.line([width - right + 12, y + 6, width - right + 36, y + 6], fill=colour, width=3)
        draw.text((width - right + 42, y), option, fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("samplers.png"))
    args = parser.parse_args()
    results = measure()
    print(table(results))
    plot(results, args.out)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
