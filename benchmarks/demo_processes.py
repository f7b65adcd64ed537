"""The single-object shapes demo on each diffusion process in the same budget: train `experiment=shapes_single` (the
demo until issue 19) with eps (the discrete
process), rectified flow and EDM for each seed, judge and FD-score every checkpoint with `latentgen-eval` (DDIM
and DPM-Solver++(2M), 25 steps), and print the table of docs/processes.md.

    python benchmarks/demo_processes.py                       # 3 processes x 2 seeds, one after the other
    python benchmarks/demo_processes.py --jobs 6 --device cuda  # all at once on a GPU (how the table was made)

About 21 minutes per run on this 2-core CPU (so about 2 hours for the six), 5.5 minutes each with six side by
side on an H200. Runs go to --out (default outputs/demo_processes/<process>_s<seed>); a finished run is scored
again, not retrained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BIN = Path(sys.executable).parent
PROCESSES = {"eps": "process=null", "rectified_flow": "process=rectified_flow", "edm": "process=edm"}
SAMPLERS = {"DDIM 25": "ddim", "DPM++(2M) 25": "dpmpp_2m"}  # (the demo's own sampler is DDIM)


def train(out: Path, process: str, seed: int, device: str, overrides: list[str]) -> Path:
    run = out / f"{process}_s{seed}"
    checkpoint = run / "checkpoints" / "last.safetensors"
    if not (run / "summary.json").is_file():
        subprocess.run([str(BIN / "latentgen-train"), "experiment=shapes_single", PROCESSES[process], f"seed={seed}",
                        f"device={device}", "train.tensorboard=false", "overwrite=true", f"hydra.run.dir={run}",
                        *overrides],
                       check=True, stdout=subprocess.DEVNULL)
    return checkpoint


def score(checkpoint: Path, sampler: str, device: str) -> dict:
    report = checkpoint.parents[1] / f"eval_{SAMPLERS[sampler]}"
    subprocess.run([str(BIN / "latentgen-eval"), f"checkpoint={checkpoint}", "metrics=[adherence,fd]",
                    f"device={device}", "progress=false", "overwrite=true", f"hydra.run.dir={report}",
                    f"scheduler={SAMPLERS[sampler]}", "steps=25"], check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((report / "eval.json").read_text())["metrics"]
    return {"adherence": metrics["adherence"]["joint_accuracy"], "fd": metrics["fd"]["fd"],
            "floor": metrics["fd"]["fd_real_vs_real"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", nargs="+", default=list(PROCESSES), choices=list(PROCESSES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (1 on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo_processes"))
    parser.add_argument("overrides", nargs="*", help="more latentgen-train overrides, e.g. train.denoiser.steps=100")
    args = parser.parse_args()

    runs = [(process, seed) for process in args.processes for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        checkpoints = list(pool.map(lambda run: train(args.out, *run, args.device, args.overrides), runs))
    rows, floor = [], None
    for (process, seed), checkpoint in zip(runs, checkpoints):
        scores = {sampler: score(checkpoint, sampler, args.device) for sampler in SAMPLERS}
        floor = next(iter(scores.values()))["floor"]
        cells = [f"{s['adherence']:.1%} | {s['fd']:.1f}" for s in scores.values()]
        rows.append(f"| {process} | {seed} | " + " | ".join(cells) + " |")
    header = " | ".join(f"adherence, {name} | FD, {name}" for name in SAMPLERS)
    print(f"shapes demo, same budget per process; FD real vs real at n=216: {floor:.1f}\n")
    print(f"| process | seed | {header} |")
    print("|---|---|" + "---|" * (2 * len(SAMPLERS)))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
