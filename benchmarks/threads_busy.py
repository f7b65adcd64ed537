"""Seconds per training step of the shapes demo's codec (stage 1: KL autoencoder, batch 16 at 32x32) with 1 and
2 torch threads, on a quiet machine and with other work keeping cores busy: why the apps use only the free
cores (latentgen.threads) unless `threads=N` is set.

    python benchmarks/threads_busy.py [--steps 30] [--busy 1]

The other work is one process spinning in pure Python (one core), then another torch job with two threads (a
matmul loop: what a test suite beside a training run is). Each configuration runs in a fresh process so that
torch's thread pool starts at the count measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from latentgen.assembly import build_component
from latentgen.threads import busy_cores
threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
codec = build_component("codec", {"name": "kl", "latent_channels": 4, "channels": 64, "channel_mult": [1, 2, 2],
                                  "num_res_blocks": 1})
optimizer = torch.optim.Adam(codec.parameters(), 1e-3)
images = torch.rand(16, 3, 32, 32) * 2 - 1
def step():
    reconstruction, losses = codec.autoencode(images, torch.Generator().manual_seed(0))
    loss = (reconstruction - images).abs().mean() + sum(losses.values()) * 1e-6
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
for _ in range(3):
    step()
busy = busy_cores(0.3)
start = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"seconds": (time.perf_counter() - start) / steps, "busy": busy}))
"""


OTHER_WORK = {
    "none": None,
    "a Python loop (1 core)": "while True: pass",
    "a 2-thread torch job": "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def measure(threads: int, steps: int, other: str | None) -> dict:
    spinners = [subprocess.Popen([sys.executable, "-c", other])] if other else []
    try:
        time.sleep(1.0 if other else 0)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps)], capture_output=True, text=True,
                             env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for spinner in spinners:
            spinner.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} usable cores; codec step: KL (64 channels, 3 levels), batch 16 at 32x32, Adam; "
          f"mean over {args.steps} steps after 3 warm-up steps\n")
    print("| other work | torch threads | busy cores measured | s / step | vs 1 thread |")
    print("|---|---|---|---|---|")
    for name, other in OTHER_WORK.items():
        rows = {threads: measure(threads, args.steps, other) for threads in (1, min(2, cores))}
        for threads, row in rows.items():
            ratio = row["seconds"] / rows[1]["seconds"]
            print(f"| {name} | {threads} | {row['busy']:.2f} | {row['seconds']:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
