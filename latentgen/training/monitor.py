"""What a training run shows while it runs, beyond the progress bar and metrics.csv: TensorBoard
events and a preview grid every `train.sample_every` steps (stage 1 reconstructions, stage 2 samples)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from torch.utils.data import Dataset

from latentgen.contracts import Codec
from latentgen.errors import ConfigError
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.training.previews import reconstruction_sheet, sample_sheet
from latentgen.training.progress import StageLog
from latentgen.training.tensorboard import EventWriter

log = logging.getLogger("latentgen.train")


class Monitor:
    """Owns the run's TensorBoard writer (<run>/tensorboard/) and draws previews when they are due.

    A preview samples with its own seed and in eval mode, so turning previews on or off leaves the
    training itself unchanged.
    """

    def __init__(self, run_dir: Path, dataset: Dataset, *, tensorboard: bool = True, sample_every: int = 0,
                 sample_count: int = 8, sample_steps: int = 10, seed: int = 0):
        for name, value, least in (("sample_every", sample_every, 0), ("sample_count", sample_count, 1),
                                   ("sample_steps", sample_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"train.{name} must be an integer >= {least}, got {value!r}")
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self.sample_every, self.sample_count, self.sample_steps = sample_every, sample_count, sample_steps
        self.seed = seed
        self.events = EventWriter(self.run_dir / "tensorboard") if tensorboard else None
        self.previews: list[Path] = []

    @classmethod
    def from_config(cls, train: Mapping[str, Any], run_dir: Path, dataset: Dataset, seed: int) -> "Monitor":
        """From the `train` section (keys tensorboard, sample_every, sample_count, sample_steps; all optional)."""
        return cls(run_dir, dataset, tensorboard=bool(train.get("tensorboard", True)),
                   sample_every=int(train.get("sample_every", 0)), sample_count=int(train.get("sample_count", 8)),
                   sample_steps=int(train.get("sample_steps", 10)), seed=seed)

    def due(self, step: int, total_steps: int) -> bool:
        """A preview at every multiple of sample_every and at the stage's last step (sample_every 0: never)."""
        return self.sample_every > 0 and (step % self.sample_every == 0 or step == total_steps)

    def reconstructions(self, codec: Codec, step: int, stage_log: StageLog) -> Path:
        sheet = reconstruction_sheet(codec, self.dataset, self.sample_count)
        return self._keep(sheet, "reconstructions", step, stage_log, "stage1")

    def samples(self, pipe: LatentDiffusionPipeline, step: int, stage_log: StageLog) -> Path:
        sheet, _ = sample_sheet(pipe, self.dataset, self.sample_count, self.seed, steps=self.sample_steps)
        return self._keep(sheet, "samples", step, stage_log, "stage2")

    def _keep(self, sheet: Image.Image, tag: str, step: int, stage_log: StageLog, prefix: str) -> Path:
        path = self.run_dir / "samples" / f"{prefix}_step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
        stage_log.image(tag, step, sheet)
        self.previews.append(path)
        return path

    def close(self) -> dict[str, Any]:
        """Close the event file and report images the dataset skipped; returns entries for summary.json."""
        if self.events is not None:
            self.events.close()
        report: dict[str, Any] = {}
        if self.events is not None:
            report["tensorboard"] = str(self.events.log_dir)
        skipped = int(getattr(self.dataset, "skipped", 0))  # datasets that skip unreadable files count them
        if skipped:
            message = (f"the dataset skipped {skipped} unreadable image(s) (listed in the warnings above); "
                       f"remove or repair them")
            log.warning(message)
            report["skipped_images"] = skipped
        return report
