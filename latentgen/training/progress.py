"""Progress bar and CSV log of one training stage."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from latentgen.errors import LatentgenError


class NonFiniteLossError(LatentgenError, FloatingPointError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class StageLog:
    """tqdm bar with the loss and it/s, plus rows appended to <run>/metrics.csv."""

    def __init__(self, stage: str, total_steps: int, run_dir: Path, log_every: int):
        self.stage = stage
        self.log_every = max(1, log_every)
        self.bar = tqdm(total=total_steps, desc=stage, dynamic_ncols=True, mininterval=1.0)
        self.path = run_dir / "metrics.csv"
        self.new_file = not self.path.exists()
        self.start = time.perf_counter()
        self.history: list[tuple[int, float]] = []

    def step(self, step: int, losses: dict[str, float], lr: float) -> None:
        loss = losses["loss"]
        if not math.isfinite(loss):
            self.bar.close()
            raise NonFiniteLossError(
                f"{self.stage}: the loss became {loss} at step {step}; stopping. The last checkpoint is "
                f"intact. Lower the learning rate or enable gradient clipping (train.*.grad_clip)"
            )
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.bar.total:
            self.history.append((step, loss))
            self.bar.set_postfix({key: f"{value:.4f}" for key, value in losses.items()}, refresh=False)
            with open(self.path, "a", newline="") as handle:
                writer = csv.writer(handle)
                if self.new_file:
                    writer.writerow(["stage", "step", "seconds", "lr", *losses])
                    self.new_file = False
                writer.writerow([self.stage, step, f"{time.perf_counter() - self.start:.2f}", f"{lr:.3g}",
                                 *(f"{value:.6g}" for value in losses.values())])

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start
