"""How `latentgen-train resume=...` finds the run to continue, and what it may change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentgen.cli.train import hydra_arguments
from latentgen.config import compose
from latentgen.config.containers import to_plain
from latentgen.errors import ConfigError
from latentgen.training.resume import resumed_config
from latentgen.training.run import STATE_NAME
from latentgen.training.state_file import save_state

pytestmark = pytest.mark.slow  # starts the apps, torchrun or pip in subprocesses

BIN = Path(sys.executable).parent


def unfinished_run(run_dir: Path, config=None) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    save_state(run_dir / "checkpoints" / STATE_NAME, {"step": 1}, {"latentgen.config": config or {}})
    return run_dir


def test_resume_true_picks_the_newest_unfinished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no unfinished run under outputs/train"):
        hydra_arguments(["resume=true"], {})
    older = unfinished_run(Path("outputs/train/2026-01-01_10-00-00"))
    time.sleep(0.01)
    newer = unfinished_run(Path("outputs/train/2026-01-01_09-00-00"))
    (Path("outputs/train/2026-01-02_00-00-00/checkpoints")).mkdir(parents=True)  # finished: no state
    assert hydra_arguments(["resume=true"], {}) == ["resume=true", f"hydra.run.dir={newer}", "hydra.output_subdir=null"]
    assert hydra_arguments([f"resume={older / 'checkpoints' / STATE_NAME}"], {})[1] == f"hydra.run.dir={older}"
    assert hydra_arguments(["resume=true", f"hydra.run.dir={older}"], {})[1:] == [f"hydra.run.dir={older}",
                                                                                   "hydra.output_subdir=null"]
    with pytest.raises(ConfigError, match="nothing to resume in hydra.run.dir=elsewhere"):
        hydra_arguments(["resume=true", "hydra.run.dir=elsewhere"], {})
    with pytest.raises(ConfigError, match="name different runs"):
        hydra_arguments([f"resume={older}", f"hydra.run.dir={newer}"], {})
    assert hydra_arguments(["experiment=smoke", "resume=false"], {}) == ["experiment=smoke", "resume=false"]


def test_processes_of_a_torchrun_job_share_one_run_directory():
    with pytest.raises(ConfigError, match="needs hydra.run.dir"):
        hydra_arguments(["experiment=smoke"], {"WORLD_SIZE": "2", "RANK": "0"})
    assert hydra_arguments(["hydra.run.dir=run"], {"WORLD_SIZE": "2", "RANK": "0"}) == ["hydra.run.dir=run"]
    assert "hydra/job_logging=disabled" in hydra_arguments(["hydra.run.dir=run"], {"WORLD_SIZE": "2", "RANK": "1"})


def test_a_resumed_run_keeps_its_config_and_takes_only_harmless_overrides(tmp_path):
    started = to_plain(compose("train", ["experiment=smoke"]))
    run_dir = unfinished_run(tmp_path / "run", started)
    command_line = ["resume=true", "train.log_every=7"]
    config = resumed_config(run_dir, command_line, compose("train", command_line))  # the default experiment
    assert config["train"]["log_every"] == 7 and config["train"]["codec"]["steps"] == started["train"]["codec"]["steps"]
    repeated = ["experiment=smoke", "resume=true"]
    assert resumed_config(run_dir, repeated, compose("train", repeated)) == {**started, "resume": True}
    changed = ["experiment=smoke", "resume=true", "train.denoiser.lr=5e-4"]
    with pytest.raises(ConfigError, match=r"changes \['train.denoiser.lr: 0.001 -> 0.0005'\]"):
        resumed_config(run_dir, changed, compose("train", changed))


def test_the_command_line_stops_and_resumes_a_run(tmp_path):
    tiny = ["experiment=smoke", "train.codec.steps=2", "train.denoiser.steps=2", "train.codec.batch_size=4",
            "train.denoiser.batch_size=4", "dataset.size=8", "train.sample_every=0", "train.tensorboard=false",
            "train.grid_size=2", "sampling.steps=2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(*args):
        return subprocess.run([str(BIN / "latentgen-train"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=environment)

    stopped = train(*tiny, "train.stop_after_steps=3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "continue with: latentgen-train resume=" in stopped.stdout + stopped.stderr
    (run_dir,) = (tmp_path / "outputs" / "train").iterdir()
    assert (run_dir / "checkpoints" / STATE_NAME).exists() and not (run_dir / "summary.json").exists()

    resumed = train("resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr and [run_dir] == list((tmp_path / "outputs" / "train").iterdir())
    assert json.loads((run_dir / "summary.json").read_text())["denoiser"]["grid_captions"]
    assert not (run_dir / "checkpoints" / STATE_NAME).exists()

    again = train("resume=true")
    assert again.returncode == 1 and "error: resume=true: no unfinished run" in again.stderr
    assert "Traceback" not in again.stderr
