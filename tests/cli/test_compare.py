"""`latentgen compare`: a latentgen-sample multirun over schedulers (a built-in pair and the example
plugin's rk4) assembled into one labelled sheet whose panels are the jobs' grids, pixel for pixel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentgen.cli.compare import LINE_HEIGHT, PADDING

BIN = Path(sys.executable).parent
SCHEDULERS = ["ddim", "dpmpp_2m", "rk4"]  # rk4: the latentgen-example plugin's


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`latentgen-sample -m` over three schedulers, from a tiny untrained checkpoint."""
    from latentgen import registry
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline
    from latentgen.testing import fill_zero_parameters

    assert "rk4" in registry.available("scheduler"), \
        "the latentgen-example plugin is not installed: run `make install` or `pip install -e plugins/latentgen-example`"
    root = tmp_path_factory.mktemp("compare")
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    fill_zero_parameters(pipe.denoiser)  # an untrained UNet outputs zeros, whatever the sampler
    checkpoint = pipe.save(root / "tiny.safetensors")
    sweep_dir = root / "multirun"
    result = run("latentgen-sample", "-m", f"checkpoint={checkpoint}", f"scheduler={','.join(SCHEDULERS)}",
                 "prompt=[a red circle,a blue star]", "num_images=2", "steps=3", "seed=0", "progress=false",
                 f"hydra.sweep.dir={sweep_dir}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def job_grids(sweep_dir: Path) -> dict[str, Path]:
    """scheduler -> its job's grid.png, found through each job's own record."""
    grids = {}
    for record in sweep_dir.rglob("sample.json"):
        grids[json.loads(record.read_text())["scheduler"]] = record.parent / "grid.png"
    return grids


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_one_labelled_panel_per_job_holding_its_grid(sweep, tmp_path):
    result = run("latentgen", "compare", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = sweep / "compare.png"
    assert result.stdout.strip() == str(output)
    layout = json.loads(output.with_suffix(".json").read_text())
    grids = job_grids(sweep)
    assert sorted(grids) == sorted(SCHEDULERS)

    # Hydra's job order, each labelled with what differs between the jobs: its scheduler.
    assert [panel["label"] for panel in layout["panels"]] == [f"scheduler={name}" for name in SCHEDULERS]
    sheet = Image.open(output)
    sizes = [Image.open(grids[name]).size for name in SCHEDULERS]
    assert len(set(sizes)) == 1  # same prompts and image count: the rows line up across panels
    width, height = sizes[0]
    assert width > 2 * 16 and height > 2 * 16  # two prompts x two images each
    assert sheet.width == 3 * width + 4 * PADDING
    # Under the title (the shared overrides: checkpoint, prompts, seed, ...) and one label line.
    top = layout["panels"][0]["box"][1]
    assert top >= PADDING + 2 * LINE_HEIGHT and sheet.height == top + height + PADDING
    for index, (name, panel) in enumerate(zip(SCHEDULERS, layout["panels"])):
        left = PADDING + index * (width + PADDING)
        assert panel["box"] == [left, top, left + width, top + height]
        assert np.array_equal(pixels(sheet.crop(tuple(panel["box"]))), pixels(Image.open(grids[name]))), name
        assert Path(panel["job"]) == grids[name].parent
    # The labels are drawn: the strip above each panel is not blank.
    assert (pixels(sheet.crop((PADDING, top - LINE_HEIGHT, PADDING + width, top))) < 128).any()
    # Different samplers, different pictures (the comparison shows something).
    assert not np.array_equal(pixels(Image.open(grids["ddim"])), pixels(Image.open(grids["rk4"])))


def compare_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`latentgen compare ...` as its console script runs it (sys.exit(main(argv))), in this process."""
    from latentgen.cli.main import main

    try:
        code = main(["compare", *args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unfinished_jobs_are_skipped_and_named(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (job_grids(copy)["dpmpp_2m"]).unlink()
    code, out, err = compare_in_process(capsys, str(copy), "-o", str(tmp_path / "out" / "sheet.png"))
    assert code == 0 and out.strip() == str(tmp_path / "out" / "sheet.png"), err
    assert "skipped unfinished job (no grid.png)" in err and "scheduler=dpmpp_2m" in err
    layout = json.loads((tmp_path / "out" / "sheet.json").read_text())
    assert [panel["label"] for panel in layout["panels"]] == ["scheduler=ddim", "scheduler=rk4"]
    assert Image.open(tmp_path / "out" / "sheet.png").width == 2 * Image.open(job_grids(copy)["ddim"]).width + 3 * PADDING


@pytest.mark.parametrize("make, message", [
    (lambda root: root, "no finished latentgen-sample jobs under"),
    (lambda root: root / "missing", "is not a directory"),
])
def test_a_directory_without_finished_jobs_is_one_clear_error(make, message, tmp_path, capsys):
    (tmp_path / "job" / ".hydra").mkdir(parents=True)
    (tmp_path / "job" / ".hydra" / "overrides.yaml").write_text("- scheduler=ddim\n")  # started, never finished
    code, out, err = compare_in_process(capsys, str(make(tmp_path)))
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "multirun/sample" in err
    assert not (tmp_path / "compare.png").exists()
