"""Training throughput of the shapes demo (README's main job) on this machine: images/s of each stage
in float32 and under bfloat16 autocast (`train.precision=bf16`), each also with channels-last conv
weights (`+nhwc`: `train.codec.channels_last=true train.denoiser.channels_last=true`).

Each variant runs the real trainer (`latentgen-train experiment=shapes`) for a short budget in
a temporary directory, with previews, TensorBoard and checkpoints off so only training steps are
timed; images/s comes from the it/s column of metrics.csv times the batch size, leaving out the
first logging interval (warm-up).

    python benchmarks/train_throughput.py [--steps 200] [--variants fp32,bf16,fp32+nhwc,bf16+nhwc]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = {"stage 1: codec": "train.codec.batch_size", "stage 2: denoiser": "train.denoiser.batch_size"}


def run(variant: str, steps: int, log_every: int, work: Path) -> dict[str, float]:
    """{stage label: images/s} from one short training run of `variant`: a precision, "+nhwc" for channels-last."""
    run_dir = work / variant
    precision, _, layout = variant.partition("+")
    nhwc = str(layout == "nhwc").lower()
    overrides = [f"train.precision={precision}", f"train.codec.channels_last={nhwc}", f"train.denoiser.channels_last={nhwc}",
                 f"train.codec.steps={steps}", f"train.denoiser.steps={steps}",
                 f"train.log_every={log_every}", "train.sample_every=0", "train.tensorboard=false",
                 f"train.checkpoint_every={10 * steps}", "train.grid_size=4", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "-m", "latentgen.cli.train", "experiment=shapes", *overrides]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    batch_sizes = batch_sizes_of(run_dir)
    rates: dict[str, list[float]] = {}
    with open(run_dir / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["step"]) > log_every:  # the first interval includes warm-up
                rates.setdefault(row["stage"], []).append(float(row["it_per_s"]))
    return {stage: statistics.median(values) * batch_sizes[stage] for stage, values in rates.items()}


def batch_sizes_of(run_dir: Path) -> dict[str, int]:
    """The batch sizes the run used, from the config Hydra saved."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return {stage: int(OmegaConf.select(config, key)) for stage, key in BATCH.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each stage per variant")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--variants", default="fp32,bf16,fp32+nhwc,bf16+nhwc")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="latentgen-throughput-") as work:
        results = {name: run(name, args.steps, args.log_every, Path(work)) for name in args.variants.split(",")}
    stages = list(BATCH)
    baseline = results.get("fp32")
    print(f"shapes demo training throughput, {args.steps} steps per stage (median of it/s x batch, first "
          f"{args.log_every} steps left out)")
    print(f"{'variant':<10}" + "".join(f"{stage + ' img/s':>26}" for stage in stages)
          + ("".join(f"{'vs fp32 ' + stage[:7]:>18}" for stage in stages) if baseline else ""))
    for name, rates in results.items():
        line = f"{name:<10}" + "".join(f"{rates.get(stage, float('nan')):>26.1f}" for stage in stages)
        if baseline:
            line += "".join(f"{rates.get(stage, float('nan')) / baseline[stage]:>17.2f}x" for stage in stages)
        print(line)


if __name__ == "__main__":
    main()
