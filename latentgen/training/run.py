"""A whole training run from a composed config: stage 1 (codec), stage 2 (denoiser), checkpoints,
grids, and the training state that lets a stopped run continue exactly (`resume`).

Files in the run directory: checkpoints/last.safetensors (a pipeline checkpoint: after stage 1, then
the EMA weights of stage 2 every `checkpoint_every` steps), checkpoints/training_state.safetensors
(everything else a resume needs, written at the same moments and at stage ends, every
`checkpoint_every` steps of stage 1 too, and removed when the run finishes), metrics.csv, samples/,
summary.json. With torchrun every process trains its share of each batch and only rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from latentgen.assembly import build_component
from latentgen.checkpoint import atomic_write, load_module_state, remove_stale_temporaries
from latentgen.config.containers import to_plain
from latentgen.config.settings import TrainRunSettings, app_settings
from latentgen.config.typed import as_plain
from latentgen.errors import ConfigError
from latentgen.kinds import module_parts, pipeline_parts
from latentgen.memory import check_fits, training_bytes
from latentgen.pipeline import LatentDiffusionPipeline
from latentgen.run_dir import clear, holding
from latentgen.training import distributed, rng
from latentgen.training.codec_stage import CodecTrainer, check_crop_size, estimate_scale_factor
from latentgen.training.denoiser_stage import DenoiserTrainer
from latentgen.training.distributed import ProcessGroup
from latentgen.training.latent_cache import LatentCache
from latentgen.training.monitor import Monitor
from latentgen.training.precision import Precision
from latentgen.training.previews import reconstruction_grid, sample_grid
from latentgen.training.stage_loop import StepBudget, run_steps, stage_log
from latentgen.training.state_file import load_state, save_state

log = logging.getLogger("latentgen.train")

CHECKPOINT_NAME = "last.safetensors"
STATE_NAME = "training_state.safetensors"
STAGE_LABELS = {"codec": "stage 1: codec", "denoiser": "stage 2: denoiser"}
# Settings a resumed run may change: where it runs and what it shows, never what it computes.
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "threads", "train.num_workers", "train.log_every", "train.checkpoint_every",
                     "train.stop_after_steps", "train.tensorboard", "train.sample_every", "train.sample_count",
                     "train.sample_steps", "train.grid_size")
# What a run writes into its directory: a fresh start clears what an earlier run there left.
RUN_OUTPUTS = ("checkpoints", "metrics.csv", "samples", "summary.json", "tensorboard", "loss_codec.png",
               "loss_denoiser.png")


def state_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / STATE_NAME


def run_training(cfg: Any, run_dir: Path, resume: bool = False) -> Path:
    """Train both stages as `cfg` says, writing into `run_dir`; returns the pipeline checkpoint's path.

    `resume=True` continues the run whose training state `run_dir` holds, to the same weights an
    uninterrupted run ends with; `cfg` must be that run's config (up to RESUME_MAY_CHANGE).
    `train.stop_after_steps=N` stops after N optimizer steps, keeping the state to resume from.
    Under torchrun (WORLD_SIZE > 1) the processes share each global batch.
    """
    config = validated_config(cfg)  # every setting checked before anything is built or computed
    run_dir = Path(run_dir)
    group, device, started = distributed.start(config.get("device"))
    try:
        if not group.is_main:
            return TrainingRun(config, run_dir, device, group).train(resume)
        with holding(run_dir):  # one process writes into a run directory
            if not resume:
                check_start(run_dir, bool(config.get("overwrite")))
                clear(run_dir, RUN_OUTPUTS)  # accepted: what an earlier run here left goes
            remove_stale_temporaries(run_dir, run_dir / "checkpoints")  # of a write a killed run left half done
            return TrainingRun(config, run_dir, device, group).train(resume)
    finally:
        distributed.stop(started)


def build_parts(config: Mapping[str, Any], weights: bool = True) -> tuple[Any, LatentDiffusionPipeline | None]:
    """The run's dataset and untrained pipeline (or, with `base`, the pipeline that checkpoint holds), refusing
    image sizes the codec or denoiser cannot tile (what latentgen-train also does to check a config before it
    starts). `weights=False`: a base is built from its header on the meta device (None where the header cannot
    tell), so checking a config reads no weights."""
    dataset = build_component("dataset", config["dataset"])
    pipe = base_pipeline(config, weights) if config.get("base") else LatentDiffusionPipeline.from_config(config)
    if pipe is None:
        return dataset, None
    size = getattr(dataset, "image_size", None)
    sampling = config.get("sampling") or {}
    sizes = {"dataset.image_size": (size, size), "sampling.height/width": (sampling.get("height"),
                                                                           sampling.get("width"))}
    for key, (height, width) in sizes.items():
        if height is None or width is None:
            continue
        try:
            pipe.latent_size(height, width)
        except ValueError as exc:
            raise ConfigError(f"{key}={height}x{width}: {exc}") from None
    return dataset, pipe


def base_pipeline(config: Mapping[str, Any], weights: bool = True) -> LatentDiffusionPipeline | None:
    """The pipeline of the `base` checkpoint (any registered format, with `base_options`); with `weights=False`
    its config from the header, built on the meta device."""
    from latentgen.formats.dispatch import format_for

    path, options = Path(str(config["base"])), dict(config.get("base_options") or {})
    if not path.exists():
        raise ConfigError(f"base: no file '{path}'; give the checkpoint the adapter is trained on")
    if weights:
        return LatentDiffusionPipeline.from_checkpoint(path, **options)
    header = format_for(path).config(path, **options)
    if header is None:
        return None
    with torch.device("meta"):  # the parts with weights allocate nothing; the others are built as usual
        parts = {name: build_component(name, header.get(name)) for name in module_parts()}
    parts.update({name: build_component(name, header.get(name)) for name in pipeline_parts()
                  if name not in parts and header.get(name) is not None})
    return LatentDiffusionPipeline(**parts, diffusion=header.get("diffusion"), sampling=header.get("sampling"))


def check_batches_fit(config: Mapping[str, Any], dataset: Any, pipe: LatentDiffusionPipeline | None,
                      device: torch.device) -> None:
    """Refuse a micro-batch of either stage that cannot fit in `device`'s free memory (latentgen.memory)."""
    size = getattr(dataset, "image_size", None)
    if size is None or pipe is None:
        return
    latent = pipe.latent_size(size, size)
    for stage in ("codec", "denoiser"):
        settings = config["train"][stage]
        micro = int(settings["batch_size"]) // int(settings["grad_accumulation"])
        if stage == "codec" and not trains_codec(pipe):
            continue
        needed = training_bytes(pipe.codec, pipe.denoiser, stage, micro, size, latent)
        check_fits(needed, device, f"train.{stage}.batch_size={settings['batch_size']} (micro-batches of {micro}) at "
                                   f"{size}x{size}",
                   fix=f"lower train.{stage}.batch_size, or raise train.{stage}.grad_accumulation")


def check_codec_crop(config: Mapping[str, Any], dataset: Any, pipe: LatentDiffusionPipeline | None) -> None:
    """Refuse a `train.codec.crop_size` stage 1 could not train on, before any work."""
    if pipe is not None and trains_codec(pipe):
        check_crop_size(config["train"]["codec"], pipe.codec, dataset)


def trains_codec(pipe: LatentDiffusionPipeline) -> bool:
    """Whether stage 1 fits this pipeline's codec: not where it has no trainable weights (an identity codec, or
    every weight frozen for train.adapter)."""
    return any(p.requires_grad for p in pipe.codec.parameters())


def check_start(run_dir: Path, overwrite: bool) -> None:
    """Refuse a fresh start into a directory that holds a run (unfinished: it has a training state; finished:
    a checkpoint and no state) unless `overwrite`; reads only what files exist."""
    if overwrite:
        return
    if state_path(run_dir).exists():
        raise ConfigError(f"'{run_dir}' holds an unfinished run (its checkpoints/{STATE_NAME}); continue it with "
                          f"resume=true hydra.run.dir={run_dir}, start it again with overwrite=true, or train into "
                          f"another directory")
    if (run_dir / "checkpoints" / CHECKPOINT_NAME).exists():
        raise ConfigError(f"'{run_dir}' holds a finished run (checkpoints/{CHECKPOINT_NAME}); it is kept. Pass "
                          f"overwrite=true to replace it, or train into another directory (hydra.run.dir=<dir>)")


def validated_config(cfg: Any) -> dict[str, Any]:
    """The plain config with latentgen-train's own settings (`train`, `diffusion`, `sampling`, `seed`, ...)
    type-converted and checked against `latentgen.config.settings.TrainRunSettings`; a ConfigError naming
    the key otherwise. Component nodes are left to their components."""
    config = to_plain(cfg)
    return {**config, **as_plain(app_settings(TrainRunSettings, config))}


class TrainingRun:
    """The pieces of one run (pipeline, dataset, generator, precision, logs) and its two stages."""

    def __init__(self, cfg: Any, run_dir: Path, device: torch.device, group: ProcessGroup):
        self.config = to_plain(cfg)
        self.train_settings = self.config["train"]
        self.run_dir, self.device, self.group = run_dir, device, group
        self.checkpoint_path = run_dir / "checkpoints" / CHECKPOINT_NAME
        self.state_path = state_path(run_dir)
        seed = int(self.config["seed"])
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.dataset, pipe = build_parts(self.config)
        self.pipe = pipe.to(device)
        run_precision = Precision(str(self.train_settings.get("precision", "fp32")), device)
        # Each stage's own (train.<stage>.precision) or the run's, all checked before anything trains.
        self.precisions = {stage: Precision(str(self.train_settings[stage]["precision"]), device,
                                            f"train.{stage}.precision")
                           if self.train_settings[stage].get("precision") else run_precision
                           for stage in ("codec", "denoiser")}
        self.budget = StepBudget(self.train_settings.get("stop_after_steps"))
        self.monitor = Monitor.from_config(self.train_settings, run_dir, self.dataset, seed) if group.is_main else None
        self.summary: dict[str, Any] = {"device": str(device), "checkpoint": str(self.checkpoint_path)}
        self.seconds = {"codec": 0.0, "denoiser": 0.0}
        if group.distributed:
            self.summary["processes"] = group.world_size
        self.adapter = self._trained_adapter()
        if self.train_settings.get("gradient_checkpointing"):
            if not hasattr(self.pipe.denoiser, "gradient_checkpointing"):
                raise ConfigError(f"train.gradient_checkpointing: denoiser '{self.pipe.denoiser.name}' does not support "
                                  f"it; set it to false")
            self.pipe.denoiser.gradient_checkpointing = True

    def _trained_adapter(self) -> Any:
        """With `train.adapter`: every weight frozen and that new adapter attached, the only thing trained; the
        run's checkpoint is then the adapter's file."""
        node = self.train_settings.get("adapter")
        if not node:
            return None
        for module in self.pipe.modules():
            module.requires_grad_(False)
        adapter = build_component("adapter", node)
        if not callable(getattr(adapter, "save", None)) or not callable(getattr(adapter, "state_dict", None)):
            raise ConfigError(f"train.adapter: adapter '{adapter.name}' cannot be trained (it has no save() and "
                              f"state_dict()); train trainable_lora")
        self.pipe.attach(adapter)
        self.checkpoint_path = self.run_dir / "checkpoints" / getattr(adapter, "file_name", "adapter.safetensors")
        self.summary["checkpoint"] = str(self.checkpoint_path)
        self.summary["adapter"] = adapter.describe()
        return adapter

    # ---- the run ------------------------------------------------------------------------------

    def train(self, resume: bool) -> Path:
        if self.group.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.train_settings.get("tiny_decoder"):
            return self._distil_tiny_decoder(resume)
        state = self._resumable_state() if resume else None
        if state is not None:
            if self.adapter is not None:
                self.adapter.load_state_dict(state["adapter"])
            for kind in state["modules"]:
                load_module_state(getattr(self.pipe, kind), state["modules"][kind], kind, self.state_path)
            self._set_scale_factor(state["scale_factor"])
            self.summary, self.seconds = {**state["summary"], "device": str(self.device)}, dict(state["seconds"])
            if self.group.is_main:
                _truncate_metrics(self.run_dir / "metrics.csv", state["stage"], state["step"])
            log.info("resuming %s at %s, step %d", self.run_dir, STAGE_LABELS[state["stage"]], state["step"])
        stage = state["stage"] if state is not None else "codec"
        self._layout(self.pipe.codec, self.train_settings["codec"])  # also when resuming in stage 2: it encodes its data
        if stage == "codec" and not self._codec_stage(state):
            return self._stopped()
        self.pipe.codec.eval().requires_grad_(False)
        if not self._denoiser_stage(state if stage == "denoiser" else None):
            return self._stopped()
        self._finish()
        return self.checkpoint_path

    def _distil_tiny_decoder(self, resume: bool) -> Path:
        """train.tiny_decoder: a TAESD decoder distilled from the base's codec, in place of both stages; its file
        is the run's result (latentgen/training/distill_decoder.py)."""
        from latentgen.training.distill_decoder import compare, distill, save_decoder

        if resume:
            raise ConfigError("resume: a tiny decoder run (train.tiny_decoder) takes minutes and keeps no training "
                              "state; start it again (overwrite=true)")
        settings = self.train_settings["tiny_decoder"]
        began = time.perf_counter()
        log_ = stage_log("tiny decoder", int(settings["steps"]), 1, self.run_dir, int(self.train_settings["log_every"]),
                         self.monitor.events if self.monitor else None, self.group.is_main)
        student = distill(self.pipe.codec, self.dataset, settings, self.device, self.generator, on_step=log_.step)
        log_.close()
        self.checkpoint_path = self.run_dir / "checkpoints" / "tiny_decoder.safetensors"
        if self.group.is_main:
            count = min(len(self.dataset), int(settings["compare_images"]))
            images = torch.stack([self.dataset[i]["image"] for i in range(count)]).to(self.device)
            scores = compare(self.pipe.codec, student, images)
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            save_decoder(student, self.checkpoint_path, {"latentgen.base": str(self.config["base"])})
            self.summary.update(self.monitor.close())
            self.summary.update(checkpoint=str(self.checkpoint_path),
                                tiny_decoder={**scores, "seconds": round(time.perf_counter() - began, 1)})
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            log.info("tiny decoder: %.2f dB PSNR against the full decoder on %d images; decode %.3f s against "
                     "%.3f s", scores["psnr_tiny_vs_full_db"], count, scores["tiny_decode_seconds"],
                     scores["full_decode_seconds"])
        self.group.barrier()
        return self.checkpoint_path

    def _codec_stage(self, state: Mapping[str, Any] | None) -> bool:
        settings = self.train_settings["codec"]
        if not (trains_codec(self.pipe) and int(settings["steps"]) > 0):
            return True
        began = time.perf_counter()
        trainer = CodecTrainer(self.pipe.codec, self.dataset, settings, self.device, self.generator,
                               int(self.train_settings.get("num_workers", 0)), self.precisions["codec"], self.group)
        first = self._resume_trainer(trainer, state)
        log_ = stage_log(STAGE_LABELS["codec"], trainer.steps, first, self.run_dir, int(self.train_settings["log_every"]),
                         self.monitor.events if self.monitor else None, self.group.is_main)

        def preview(step: int) -> None:
            if self.monitor is not None and self.monitor.due(step, trainer.steps):
                self.monitor.reconstructions(self.pipe.codec, step, log_)

        def save(step: int) -> None:
            self._save_state("codec", step, trainer, began)

        finished = run_steps(trainer, first, log_, checkpoint_every=int(self.train_settings["checkpoint_every"]),
                             save=save, budget=self.budget, preview=preview)
        log_.close()
        if not finished:
            return False
        self.pipe.codec.eval()
        if settings.get("scale_by_std", True):
            self._set_scale_factor(estimate_scale_factor(self.pipe.codec, self.dataset, self.device))
        self.seconds["codec"] += time.perf_counter() - began
        if self.group.is_main:
            self._save_pipeline(self.pipe, "codec", trainer.steps)
            grid = reconstruction_grid(self.pipe.codec, self.dataset, int(self.train_settings["grid_size"]),
                                       self.run_dir / "samples" / "stage1_reconstructions.png")
            self.summary["codec"] = {"seconds": round(self.seconds["codec"], 1), "final_loss": _final_loss(log_),
                                     "scale_factor": self.pipe.codec.scale_factor, "grid": str(grid)}
        # The stage's end: a resume from here starts stage 2 afresh.
        self._save_state("denoiser", 0, None, time.perf_counter())
        return True

    def _denoiser_stage(self, state: Mapping[str, Any] | None) -> bool:
        settings = self.train_settings["denoiser"]
        if state is not None and state["step"] == 0:
            rng.restore(state["rng"], self.generator)  # saved at the end of stage 1, before all of this
        began = time.perf_counter()
        cache = self._latent_cache(settings.get("latent_cache"))
        self._layout(self.pipe.denoiser, settings)
        trainer = DenoiserTrainer(self.pipe, cache, settings, self.generator, self.precisions["denoiser"], self.group)
        first = self._resume_trainer(trainer, state)
        log_ = stage_log(STAGE_LABELS["denoiser"], trainer.steps, first, self.run_dir,
                         int(self.train_settings["log_every"]), self.monitor.events if self.monitor else None,
                         self.group.is_main)

        def preview(step: int) -> None:
            if self.monitor is not None and self.monitor.due(step, trainer.steps):
                self.monitor.samples(trainer.averaged(), step, log_)

        def save(step: int) -> None:
            if self.group.is_main:
                self._save_pipeline(trainer.averaged(), "denoiser", step)
            self._save_state("denoiser", step, trainer, began)

        finished = run_steps(trainer, first, log_, checkpoint_every=int(self.train_settings["checkpoint_every"]),
                             save=save, budget=self.budget, preview=preview)
        log_.close()
        if not finished:
            return False
        self.seconds["denoiser"] += time.perf_counter() - began
        if self.group.is_main:
            trained = trainer.averaged().eval()
            self._save_pipeline(trained, "denoiser", trainer.steps)
            grid, captions = sample_grid(trained, self.dataset, int(self.train_settings["grid_size"]),
                                         int(self.config["seed"]), self.run_dir / "samples" / "stage2_samples.png")
            self.summary["denoiser"] = {"seconds": round(self.seconds["denoiser"], 1),
                                        "final_loss": _final_loss(log_), "grid": str(grid),
                                        "grid_captions": captions}
        return True

    @staticmethod
    def _layout(module: torch.nn.Module, settings: Mapping[str, Any]) -> None:
        """channels_last: the stage's network keeps its 4-D weights NHWC (the values stay; a resumed state loads
        into them as into any layout, and checkpoints are written contiguous, so no file depends on it)."""
        if settings.get("channels_last"):
            module.to(memory_format=torch.channels_last)

    def _finish(self) -> None:
        if self.group.is_main:
            self.summary.update(self.monitor.close())
            (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
            self.state_path.unlink(missing_ok=True)  # finished: nothing left to resume
        self.group.barrier()

    def _stopped(self) -> Path:
        if self.group.is_main:
            self.monitor.close()
            log.info("stopped after %d steps as train.stop_after_steps asks; the training state is in %s; "
                     "continue with: latentgen-train resume=%s", self.budget.taken, self.state_path, self.run_dir)
        self.group.barrier()
        return self.checkpoint_path

    # ---- data ---------------------------------------------------------------------------------

    def _latent_cache(self, path: str | None) -> LatentCache:
        keep = tuple(self.pipe.conditioner.input_keys)
        if not path:
            return LatentCache.encode(self.pipe.codec, self.dataset, keep, self.device)
        path = str(self.run_dir / path)  # a relative path is inside the run directory (an absolute one is kept)
        dataset_config = self.config["dataset"]
        if self.group.is_main:
            cache = LatentCache.load_or_encode(path, self.pipe.codec, self.dataset, dataset_config, keep, self.device)
        self.group.barrier()  # the other processes read what rank 0 wrote
        if not self.group.is_main:
            cache = LatentCache.load_or_encode(path, self.pipe.codec, self.dataset, dataset_config, keep, self.device,
                                               write=False)
        return cache

    def _save_pipeline(self, pipe: LatentDiffusionPipeline, stage: str, step: int) -> None:
        metadata = {"latentgen.stage": stage, "latentgen.step": str(step)}
        if self.adapter is not None:  # the base stays where it is: the run's result is the adapter's file
            self.adapter.save(self.checkpoint_path, {**metadata, "latentgen.base": str(self.config["base"])})
            return
        pipe.save(self.checkpoint_path, metadata=metadata)

    def _set_scale_factor(self, scale: float) -> None:
        self.pipe.codec.scale_factor = float(scale)
        self.pipe.codec.build_params["scale_factor"] = float(scale)  # what the checkpoint's config records

    # ---- the training state -------------------------------------------------------------------

    def _save_state(self, stage: str, step: int, trainer: Any, began: float) -> None:
        """Write everything a resume needs (atomically; rank 0 only: every process holds the same)."""
        if not self.group.is_main:
            return
        seconds = dict(self.seconds)
        if trainer is not None:
            seconds[stage] += time.perf_counter() - began
        state = {"stage": stage, "step": step, "scale_factor": float(self.pipe.codec.scale_factor),
                 # training an adapter, only its weights change: the base is read again from its file
                 "modules": {} if self.adapter else {kind: getattr(self.pipe, kind).state_dict()
                                                      for kind in module_parts()},
                 "adapter": self.adapter.state_dict() if self.adapter else None,
                 "trainer": trainer.state_dict() if trainer is not None else None,
                 "rng": rng.capture(self.generator), "summary": self.summary, "seconds": seconds}
        save_state(self.state_path, state, {"latentgen.config": self.config, "latentgen.stage": stage,
                                            "latentgen.step": str(step)})

    def _resume_trainer(self, trainer: Any, state: Mapping[str, Any] | None) -> int:
        """Load the trainer's part of `state` and the generators as they were; the first step to run."""
        if state is None or state["trainer"] is None:
            return 1
        trainer.load_state_dict(state["trainer"])
        rng.restore(state["rng"], self.generator)
        return int(state["step"]) + 1

    def _resumable_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            finished = " (its run finished: it has a checkpoint and no state)" if self.checkpoint_path.exists() else ""
            raise ConfigError(f"nothing to resume in '{self.run_dir}'{finished}: it holds no checkpoints/{STATE_NAME}, "
                              f"which a run keeps until it finishes. Start a new run without resume")
        state, metadata = load_state(self.state_path)
        stored = json.loads(metadata["latentgen.config"])
        changed = config_differences(stored, self.config, RESUME_MAY_CHANGE)
        if changed:
            raise ConfigError(f"resume continues '{self.run_dir}' with the config it started with; this config differs "
                              f"in {changed[:5]}. Resume with that config (latentgen-train resume=... takes it from the "
                              f"run), or start a new run")
        return state


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two plain configs, e.g. ['train.denoiser.lr: 0.001 -> 0.002']."""
    old, new = _dotted(stored), _dotted(current)
    return [f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}" for key in sorted(set(old) | set(new))
            if old.get(key, "<absent>") != new.get(key, "<absent>")
            and not any(key == name or key.startswith(name + ".") for name in ignore)]


def _dotted(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        items: dict[str, Any] = {}
        for key, value in config.items():
            items.update(_dotted(value, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: config}


def _final_loss(stage_log: Any) -> float | None:
    """The stage's last logged loss (None when the run resumed after it: an earlier invocation logged it)."""
    return stage_log.history[-1][1] if stage_log.history else None


def _truncate_metrics(path: Path, stage: str, step: int) -> None:
    """Drop the rows metrics.csv got after the resumed position (the stopped run may have gone on)."""
    if not path.exists():
        return
    order = list(STAGE_LABELS)
    rows = list(csv.reader(path.read_text().splitlines()))
    if not rows:
        return
    header, body = rows[0], rows[1:]

    def keep(row: list[str]) -> bool:
        label = row[0]
        index = next((i for i, key in enumerate(order) if STAGE_LABELS[key] == label), -1)
        if index < order.index(stage):
            return True
        return index == order.index(stage) and int(row[1]) <= step

    kept = [header, *[row for row in body if keep(row)]]
    if len(kept) != len(rows):
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
