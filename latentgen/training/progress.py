"""Progress bar and logs of one training stage: metrics.csv, TensorBoard scalars, the loss-curve PNG."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from latentgen.errors import LatentgenError
from latentgen.training.loss_curve import save_loss_curve
from latentgen.training.tensorboard import EventWriter


class NonFiniteLossError(LatentgenError, FloatingPointError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def stage_key(stage: str) -> str:
    """The short name of a stage label ("stage 1: codec" -> "codec"), used in tags and file names."""
    return stage.rsplit(":", 1)[-1].strip().replace(" ", "_")


class StageLog:
    """tqdm bar with the loss and it/s; every `log_every` steps a row of <run>/metrics.csv and the
    same scalars as TensorBoard events (tags "<stage>/<name>"); at `close` <run>/loss_<stage>.png."""

    def __init__(self, stage: str, total_steps: int, run_dir: Path, log_every: int,
                 events: EventWriter | None = None):
        self.stage = stage
        self.key = stage_key(stage)
        self.log_every = max(1, log_every)
        self.run_dir = Path(run_dir)
        self.events = events
        self.bar = tqdm(total=total_steps, desc=stage, dynamic_ncols=True, mininterval=1.0)
        self.path = self.run_dir / "metrics.csv"
        self.new_file = not self.path.exists()
        self.start = time.perf_counter()
        self.history: list[tuple[int, float]] = []  # (step, loss) at each logged step
        self.curve: list[tuple[int, float]] = []  # (step, loss) at every step, for the loss-curve PNG
        self.curve_path: Path | None = None
        self._last_logged = (0, self.start)

    def step(self, step: int, losses: dict[str, float], lr: float) -> None:
        loss = losses["loss"]
        if not math.isfinite(loss):
            self.bar.close()
            raise NonFiniteLossError(
                f"{self.stage}: the loss became {loss} at step {step}; stopping. The last checkpoint is "
                f"intact. Lower the learning rate or enable gradient clipping (train.*.grad_clip)"
            )
        self.bar.update(1)
        self.curve.append((step, loss))
        if step % self.log_every == 0 or step == self.bar.total:
            now = time.perf_counter()
            last_step, last_time = self._last_logged
            it_per_s = (step - last_step) / max(now - last_time, 1e-9)
            self._last_logged = (step, now)
            self.history.append((step, loss))
            self.bar.set_postfix({key: f"{value:.4f}" for key, value in losses.items()}, refresh=False)
            with open(self.path, "a", newline="") as handle:
                writer = csv.writer(handle)
                if self.new_file:
                    writer.writerow(["stage", "step", "seconds", "lr", "it_per_s", *losses])
                    self.new_file = False
                writer.writerow([self.stage, step, f"{now - self.start:.2f}", f"{lr:.3g}", f"{it_per_s:.3g}",
                                 *(f"{value:.6g}" for value in losses.values())])
            if self.events is not None:
                scalars = {**losses, "lr": lr, "it_per_s": it_per_s}
                self.events.scalars(step, {f"{self.key}/{name}": value for name, value in scalars.items()})

    def image(self, tag: str, step: int, image: Image.Image) -> None:
        """Show `image` in TensorBoard under "<stage>/<tag>" (nothing without an event writer)."""
        if self.events is not None:
            self.events.image(f"{self.key}/{tag}", step, image)

    def close(self) -> float:
        """Close the bar and draw the loss curve; returns the stage's seconds."""
        self.bar.close()
        if self.curve:
            steps, losses = zip(*self.curve)
            self.curve_path = save_loss_curve(steps, losses, self.run_dir / f"loss_{self.key}.png", self.stage)
        return time.perf_counter() - self.start
