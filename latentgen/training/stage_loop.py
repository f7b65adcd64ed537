"""The loop every training stage shares: steps, logging, previews, the checkpoint cadence, stopping early."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from latentgen.training.progress import NonFiniteLossError, StageLog


class Trainer(Protocol):
    """A stage's trainer: `step(step)` trains on the step-th batch and returns (logged values, lr)."""

    steps: int

    def step(self, step: int) -> tuple[dict[str, float], float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class StepBudget:
    """train.stop_after_steps: the optimizer steps this invocation may take over all stages (None: all)."""

    def __init__(self, limit: int | None):
        if limit is not None and int(limit) < 1:
            raise ValueError(f"train.stop_after_steps must be a positive number of steps or null; got {limit}")
        self.limit = None if limit is None else int(limit)
        self.taken = 0

    def spend(self) -> bool:
        """Count one step; True when that was the last one allowed."""
        self.taken += 1
        return self.limit is not None and self.taken >= self.limit


class QuietLog:
    """What processes other than rank 0 keep of a StageLog: the same finiteness check, no output."""

    def __init__(self, stage: str, total_steps: int):
        self.stage = stage
        self.total_steps = total_steps
        self.history: list[tuple[int, float]] = []

    def step(self, step: int, losses: dict[str, float], lr: float) -> None:
        if not math.isfinite(losses["loss"]):
            raise NonFiniteLossError(f"{self.stage}: the loss became {losses['loss']} at step {step}; stopping")
        if step == self.total_steps:
            self.history.append((step, losses["loss"]))

    def image(self, tag: str, step: int, image: Any) -> None:
        pass

    def close(self) -> float:
        return 0.0


def stage_log(stage: str, total_steps: int, first_step: int, run_dir: Path, log_every: int, events: Any,
              writes: bool) -> StageLog | QuietLog:
    """The log of a stage that starts at `first_step` (> 1 when resumed), or a quiet one."""
    if not writes:
        return QuietLog(stage, total_steps)
    log = StageLog(stage, total_steps, run_dir, log_every, events=events)
    if first_step > 1:
        log.bar.update(first_step - 1)  # the bar counts from where the run resumed
    return log


def run_steps(trainer: Trainer, first_step: int, log: StageLog | QuietLog, *, checkpoint_every: int,
              save: Callable[[int], None], budget: StepBudget,
              preview: Callable[[int], None] | None = None) -> bool:
    """Steps first_step..trainer.steps. After each: log (which stops a NaN/inf loss before anything is
    saved), preview, and every `checkpoint_every` steps `save(step)`. Returns False when the budget
    ran out (after saving at that step, also when it was the stage's last: a resumed run then finishes the
    stage), True when the stage's steps are done."""
    for step in range(first_step, trainer.steps + 1):
        losses, lr = trainer.step(step)
        log.step(step, losses, lr)
        if preview is not None:
            preview(step)
        out_of_budget = budget.spend()
        if out_of_budget or (checkpoint_every and step % checkpoint_every == 0 and step < trainer.steps):
            save(step)
        if out_of_budget:
            return False
    return True
