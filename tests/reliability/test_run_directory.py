"""A run directory belongs to one process; a finished run is kept unless overwrite=true; a refused start
changes nothing in it; a resumed run removes the temporary files a killed write left."""

from __future__ import annotations

import csv
import subprocess
import sys
import time

import pytest
from run_snapshots import existing_run, snapshot

from latentgen.errors import ConfigError
from latentgen.run_dir import claim, release_all

SMOKE = ["experiment=smoke", "train.sample_every=0", "train.tensorboard=false"]


def test_a_finished_run_is_kept_unless_overwrite_is_asked(tmp_path, run_app):
    run_dir = tmp_path / "run"
    assert run_app("train", [*SMOKE, f"hydra.run.dir={run_dir}"])[0] == 0
    (run_dir / "metrics.csv").write_text(open(run_dir / "metrics.csv").read())  # as it was
    before = snapshot(run_dir)
    status, lines = run_app("train", [*SMOKE, f"hydra.run.dir={run_dir}"])
    assert status == 1 and len(lines) == 1 and "holds a finished run (checkpoints/last.safetensors); it is kept. " \
                                               "Pass overwrite=true" in lines[0], lines
    assert snapshot(run_dir) == before  # .hydra/ included: the refusal came before Hydra wrote anything
    assert run_app("train", [*SMOKE, "overwrite=true", f"hydra.run.dir={run_dir}"])[0] == 0
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    steps = [(row["stage"], int(row["step"])) for row in rows]
    assert len(steps) == len(set(steps))  # one run's rows, not two runs' interleaved


def test_an_unfinished_run_is_refused_without_resume_and_its_temporaries_go_when_it_resumes(tmp_path, run_app):
    run_dir = tmp_path / "run"
    args = [*SMOKE, "train.stop_after_steps=10", "train.denoiser.latent_cache=latents.safetensors",
            f"hydra.run.dir={run_dir}"]
    assert run_app("train", args)[0] == 0
    state = run_dir / "checkpoints" / "training_state.safetensors"
    assert state.exists()
    stale = run_dir / "checkpoints" / ".last.safetensors.k1ll3d.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"half a checkpoint")
    before = snapshot(run_dir)
    status, lines = run_app("train", [*SMOKE, f"hydra.run.dir={run_dir}"])
    assert status == 1 and "holds an unfinished run" in lines[0] and "resume=true" in lines[0], lines
    status, lines = run_app("train", [*SMOKE, "resume=true", "train.denoiser.lr=0.5", f"hydra.run.dir={run_dir}"])
    assert status == 1 and "changes ['train.denoiser.lr: 0.001 -> 0.5']" in lines[0], lines  # only what it changed
    assert snapshot(run_dir) == before
    assert run_app("train", [*SMOKE, "resume=true", "train.stop_after_steps=null", f"hydra.run.dir={run_dir}"])[0] == 0
    assert not stale.exists() and not state.exists()  # finished
    assert (run_dir / "latents.safetensors").exists()  # a relative cache path is inside the run directory


HOLDER = """
import sys, time
from pathlib import Path
from latentgen.run_dir import claim
claim(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_one_process_at_a_time_and_a_killed_one_leaves_no_lock(tmp_path, run_app):
    run_dir = existing_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        status, lines = run_app("train", [*SMOKE, f"hydra.run.dir={run_dir}"])
        assert status == 1 and "is in use: another latentgen process is writing into it" in lines[0], lines
        assert snapshot(run_dir) == before
        with pytest.raises(ConfigError, match="is in use"):
            claim(run_dir)
    finally:
        holder.kill()  # as kill -9 would: no clean-up runs
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            claim(run_dir)
            break
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    release_all()


def test_a_sample_run_is_kept_unless_overwrite_is_asked(smoke_checkpoint, tmp_path, run_app):
    run_dir = tmp_path / "sample"
    args = [f"checkpoint={smoke_checkpoint}", "prompt=a", "steps=1", "progress=false", f"hydra.run.dir={run_dir}"]
    assert run_app("sample", [*args, "num_images=3"])[0] == 0
    before = snapshot(run_dir)
    status, lines = run_app("sample", [*args, "num_images=1"])
    assert status == 1 and "already holds a finished latentgen-sample run (sample.json)" in lines[0], lines
    assert snapshot(run_dir) == before
    assert run_app("sample", [*args, "num_images=1", "overwrite=true"])[0] == 0
    assert sorted(path.name for path in (run_dir / "images").iterdir()) == ["0000.png"]  # the old three are gone
