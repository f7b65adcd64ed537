"""`latentgen compare <multirun dir>`: the grids of a `latentgen-sample -m` sweep side by side, one labelled
panel per job (e.g. one per scheduler), so that the same prompts line up in rows.

A finished job is a folder under the sweep directory holding `.hydra/overrides.yaml` and `grid.png`.
Each panel is that job's grid, pixel for pixel, under a label made of the overrides that differ between
jobs; the overrides they share form the title. Next to `compare.png`, `compare.json` records each panel's
job, label and box.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

PADDING = 4
LINE_HEIGHT = 11  # PIL's default bitmap font: about 6 px per character, 11 px per line
CHARACTER_WIDTH = 6
MAX_LABEL_LINES = 4


@dataclass
class Job:
    """One finished job of a sweep: where it ran, its Hydra job number and its command-line overrides."""

    directory: Path
    number: int
    overrides: list[str]

    @property
    def grid(self) -> Path:
        return self.directory / "grid.png"


def find_jobs(sweep_dir: Path) -> tuple[list[Job], list[Path]]:
    """The finished jobs under `sweep_dir` in Hydra's job order, and the job folders without a grid yet."""
    from omegaconf import OmegaConf

    finished, unfinished = [], []
    # Searched at any depth: an override value holding a path (checkpoint=/a/b) nests the job folder.
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        directory = overrides_file.parent.parent
        if not (directory / "grid.png").is_file():
            unfinished.append(directory)
            continue
        overrides = [str(item) for item in OmegaConf.to_container(OmegaConf.load(overrides_file))]
        hydra_file = overrides_file.parent / "hydra.yaml"
        number = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num", default=None) if hydra_file.is_file() else None
        finished.append(Job(directory, int(number) if number is not None else len(finished), overrides))
    return sorted(finished, key=lambda job: (job.number, str(job.directory))), unfinished


def labels(jobs: list[Job]) -> tuple[list[str], str]:
    """Each job's label (the overrides not every job shares; all of them for a single job) and the title
    (the shared ones)."""
    shared = [item for item in jobs[0].overrides if all(item in job.overrides for job in jobs)]
    if len(jobs) == 1:
        return [" ".join(jobs[0].overrides) or "(no overrides)"], ""
    return [" ".join(item for item in job.overrides if item not in shared) or "(no overrides)" for job in jobs], \
        " ".join(shared)


def _wrap(text: str, width_px: int) -> list[str]:
    return textwrap.wrap(text, width=max(8, width_px // CHARACTER_WIDTH))[:MAX_LABEL_LINES]


def comparison_sheet(jobs: list[Job]) -> tuple[Image.Image, list[dict]]:
    """The side-by-side sheet and, per panel, its job folder, label and box (left, top, right, bottom)."""
    grids = []
    for job in jobs:
        with Image.open(job.grid) as image:
            grids.append(image.convert("RGB"))
    panel_labels, title = labels(jobs)
    width = sum(grid.width for grid in grids) + PADDING * (len(grids) + 1)
    title_lines = _wrap(title, width - 2 * PADDING) if title else []
    label_lines = [_wrap(label, grid.width) for label, grid in zip(panel_labels, grids)]
    top = PADDING + LINE_HEIGHT * len(title_lines) + LINE_HEIGHT * max(len(lines) for lines in label_lines)
    height = top + max(grid.height for grid in grids) + PADDING
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for number, line in enumerate(title_lines):
        draw.text((PADDING, PADDING + LINE_HEIGHT * number), line, fill="black")
    panels, left = [], PADDING
    for job, grid, label, lines in zip(jobs, grids, panel_labels, label_lines):
        for number, line in enumerate(lines):
            draw.text((left, top - LINE_HEIGHT * (len(lines) - number)), line, fill="black")
        sheet.paste(grid, (left, top))
        panels.append({"job": str(job.directory), "label": label, "box": [left, top, left + grid.width, top + grid.height]})
        left += grid.width + PADDING
    return sheet, panels


def compare(sweep_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the comparison sheet of `sweep_dir`'s finished jobs to `output` (default: compare.png in it)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"'{sweep_dir}' is not a directory; pass a latentgen-sample multirun directory, "
                                f"e.g. multirun/sample/<date>_<time>")
    jobs, unfinished = find_jobs(sweep_dir)
    if not jobs:
        raise ValueError(
            f"no finished latentgen-sample jobs under '{sweep_dir}' (a finished job is a folder with "
            f".hydra/overrides.yaml and grid.png; {len(unfinished)} job folder(s) without grid.png): pass the "
            f"directory of a completed `latentgen-sample -m ...` run, e.g. multirun/sample/<date>_<time>")
    for directory in unfinished:
        print(f"skipped unfinished job (no grid.png): {directory}", file=sys.stderr)
    sheet, panels = comparison_sheet(jobs)
    output = Path(output) if output is not None else sweep_dir / "compare.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output)
    output.with_suffix(".json").write_text(json.dumps({"image": str(output), "panels": panels}, indent=2))
    return output
