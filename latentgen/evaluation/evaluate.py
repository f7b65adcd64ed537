"""What latentgen-eval does, callable from Python: pick the metrics that apply to a checkpoint, compute them.

The metrics a checkpoint gets depend on the dataset it was trained on, which is read from the
checkpoint (a `dataset` node in its config or a `latentgen.dataset` header entry, when the trainer
wrote one) or else from the `.hydra/config.yaml` of the training run the checkpoint sits in
(`<run>/checkpoints/last.safetensors`); `dataset=` on the command line names it explicitly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from latentgen.checkpoint import read_checkpoint, read_metadata
from latentgen.config.containers import to_plain
from latentgen.contracts import Scheduler
from latentgen.datasets.shapes import parse_prompt
from latentgen.errors import ConfigError
from latentgen.evaluation.adherence import ACCEPTANCE_JOINT_ACCURACY, score_adherence, shapes_requests
from latentgen.evaluation.codec_fidelity import fidelity, natural_images, reconstruct
from latentgen.evaluation.frechet import frechet_distance_of_features
from latentgen.evaluation.judge_cache import MIN_ACCURACY, shapes_judge
from latentgen.evaluation.sample_generation import generate
from latentgen.evaluation.shapes_judge import JudgeRecipe, rendered_split

log = logging.getLogger("latentgen.evaluation")

METRICS: dict[str, str] = {
    "adherence": "shape, colour and joint accuracy of samples, read by the shapes judge",
    "fd": "Fréchet distance between samples and real renders in the shapes judge's feature space",
    "digits_accuracy": "class accuracy of digit samples, read by an SVM trained on the real digits",
    "codec": "PSNR and SSIM of the codec's reconstructions (held-out images and scikit-image photographs)",
}
METRICS_BY_DATASET: dict[str, tuple[str, ...]] = {"shapes": ("adherence", "fd", "codec"),
                                                  "digits": ("digits_accuracy", "codec")}
DEFAULT_NUM_SAMPLES = {"shapes": 216, "digits": 200}  # shapes: every (shape, colour, size) caption twice
SAMPLE_METRICS = ("adherence", "fd", "digits_accuracy")
CONDITIONED_METRICS = ("adherence", "digits_accuracy")  # they compare a sample with what was asked for
DATASET_METADATA_KEY = "latentgen.dataset"
# Real renders for the Fréchet distance come from the test split under seeds the judge never saw.
FD_REAL_SEED, FD_REFERENCE_SEED = 1, 2
GRID_IMAGES = 72


@dataclass
class EvalSettings:
    """latentgen-eval's options (conf/eval.yaml documents each)."""

    metrics: Sequence[str] | None = None
    num_samples: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: Scheduler | None = None
    seed: int = 0
    batch_size: int = 36
    device: str | torch.device = "auto"
    dataset: Mapping[str, Any] | None = None
    cache_dir: str | None = None
    judge: JudgeRecipe = field(default_factory=JudgeRecipe)
    min_judge_accuracy: float = MIN_ACCURACY
    codec_images: int = 256
    natural_size: int = 256
    progress: bool = False
    grid_path: str | Path | None = None  # a labelled PNG grid of the first samples, when given


def training_dataset(checkpoint: str | Path) -> tuple[dict[str, Any], str]:
    """The dataset config node a latentgen checkpoint was trained on, and where it was found."""
    checkpoint = Path(checkpoint)
    config, _ = read_checkpoint(checkpoint)  # refuses a missing, truncated or foreign file first
    if isinstance(config.get("dataset"), dict):
        return config["dataset"], f"the checkpoint '{checkpoint}'"
    metadata = read_metadata(checkpoint)
    if DATASET_METADATA_KEY in metadata:
        return json.loads(metadata[DATASET_METADATA_KEY]), f"the checkpoint '{checkpoint}'"
    run_config = checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        from omegaconf import OmegaConf

        node = OmegaConf.load(run_config).get("dataset")
        if node is not None:
            return to_plain(node), str(run_config)
    raise ConfigError(f"cannot tell which dataset checkpoint '{checkpoint}' was trained on: it records none and "
                      f"no training run's .hydra/config.yaml sits beside it (looked for {run_config}); "
                      f"name it, e.g. dataset=shapes (or shapes64, digits)")


def choose_metrics(dataset_name: str, requested: Sequence[str] | str | None, source: str) -> list[str]:
    """The requested metrics, or every one that applies to the dataset; refuses one that does not apply."""
    if dataset_name not in METRICS_BY_DATASET:
        raise ConfigError(f"latentgen-eval has metrics for the datasets {', '.join(METRICS_BY_DATASET)}; the "
                          f"checkpoint was trained on '{dataset_name}' (per {source})")
    applicable = METRICS_BY_DATASET[dataset_name]
    if requested is None:
        return list(applicable)
    requested = [requested] if isinstance(requested, str) else list(requested)
    if not requested:
        raise ConfigError(f"metrics is empty; choose from {', '.join(applicable)} (or leave it out for all)")
    for metric in requested:
        if metric not in METRICS:
            raise ConfigError(f"unknown metric '{metric}'; the metrics are: {', '.join(METRICS)}")
        if metric not in applicable:
            raise ConfigError(f"metric '{metric}' does not apply to a {dataset_name} checkpoint (per {source}); "
                              f"for {dataset_name} choose from {', '.join(applicable)}")
    return list(dict.fromkeys(requested))


def _conditioning_keys(pipe: Any) -> tuple[str, ...]:
    return tuple(key for key in ("prompt", "label") if key in pipe.conditioner.input_keys)


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer of at least {minimum}; got {value!r}")
    return value


def _held_out_images(name: str, dataset: Mapping[str, Any], count: int) -> torch.Tensor:
    """Up to `count` test-split images (N, 3, S, S) in [-1, 1] of the checkpoint's dataset."""
    from latentgen.datasets.digits import DigitsDataset

    image_size, seed = int(dataset.get("image_size", 32)), int(dataset.get("seed", 0))
    if name == "shapes":
        images, _ = rendered_split(image_size, count, "test", seed, dataset.get("background", "textured"))
        return images
    data = DigitsDataset(image_size=image_size, split="test", seed=seed)
    return torch.stack([data[i]["image"] for i in range(min(count, len(data)))])


def _write_grid(samples: torch.Tensor, captions: list[str], path: Path, count: int = GRID_IMAGES) -> Path:
    from latentgen.imaging import grid, to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    grid(to_pil(samples[:count]), columns=12, labels=captions[:count]).save(path)
    return path


def evaluate_checkpoint(checkpoint: str | Path, settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Every chosen metric of a checkpoint, as a JSON-ready dict (see `report.markdown_table`)."""
    from latentgen.devices import resolve_device
    from latentgen.pipeline import LatentDiffusionPipeline

    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    if settings.dataset is not None:
        dataset, source = dict(to_plain(settings.dataset)), "the command line"
    else:
        dataset, source = training_dataset(checkpoint)
    name = str(dataset.get("name"))
    metrics = choose_metrics(name, settings.metrics, source)
    _check_positive("batch_size", settings.batch_size)
    num_samples = _check_positive("num_samples", settings.num_samples if settings.num_samples is not None
                                  else DEFAULT_NUM_SAMPLES[name], 2)

    device = resolve_device(settings.device)
    pipe = LatentDiffusionPipeline.from_checkpoint(checkpoint, device=device, scheduler=settings.scheduler)
    image_size = int(dataset.get("image_size", 32))
    height = int(pipe.sampling.get("height") or image_size)
    width = int(pipe.sampling.get("width") or image_size)
    if (height, width) != (image_size, image_size):
        raise ConfigError(f"the checkpoint samples {height}x{width} images but its dataset (per {source}) is "
                          f"{image_size}x{image_size}; name the dataset it was trained on, e.g. "
                          f"dataset=shapes64 for 64px shapes")
    keys = _conditioning_keys(pipe)
    skipped: dict[str, str] = {}
    for metric in [m for m in metrics if m in CONDITIONED_METRICS]:
        if not keys:
            reason = (f"{metric} compares samples with the prompt or label they were asked for, but conditioner "
                      f"'{pipe.conditioner.name}' reads {list(pipe.conditioner.input_keys) or 'nothing'}")
            if settings.metrics is not None:
                raise ConfigError(f"{reason}; leave {metric} out of metrics")
            skipped[metric] = reason
            metrics.remove(metric)

    steps = int(settings.steps if settings.steps is not None else pipe.sampling["steps"])
    guidance_scale = float(settings.guidance_scale if settings.guidance_scale is not None
                           else pipe.sampling["guidance_scale"])
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint), "dataset": dataset, "dataset_source": source,
        "conditioning": list(keys), "metrics": {}, "skipped": skipped,
    }
    if any(metric in SAMPLE_METRICS for metric in metrics):
        results["sampling"] = {"num_samples": num_samples, "steps": steps, "guidance_scale": guidance_scale,
                               "scheduler": pipe.scheduler.name, "seed": settings.seed,
                               "batch_size": settings.batch_size, "height": height, "width": width}
        if name == "shapes":
            requests = shapes_requests(num_samples)
        else:
            from latentgen.datasets.digits import DIGIT_WORDS, caption as digit_caption

            requests = [{"label": i % len(DIGIT_WORDS), "prompt": digit_caption(i % len(DIGIT_WORDS))}
                        for i in range(num_samples)]
        conditions = {f"{key}s": [request[key] for request in requests] for key in keys}
        if name == "shapes":  # the judge first: a refused judge should not cost a sampling run
            recipe = replace(settings.judge, background=dataset.get("background", "textured"))
            judge, results["judge"] = shapes_judge(image_size, recipe, settings.cache_dir, settings.min_judge_accuracy)
        log.info("sampling %d images (%d steps, guidance %.2f, %s)", num_samples, steps, guidance_scale,
                 pipe.scheduler.name)
        sample_start = time.perf_counter()
        samples = generate(pipe, **conditions, count=num_samples, seed=settings.seed,
                           batch_size=settings.batch_size, progress=settings.progress, steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width)
        results["sampling"]["seconds"] = round(time.perf_counter() - sample_start, 1)
        captions = [request["prompt"] if "prompt" in keys else f"label {request['label']}" for request in requests]

        if name == "shapes":
            if "adherence" in metrics:
                sizes = [r["size"] for r in requests] if "prompt" in keys else None  # a label names no size
                adherence = score_adherence(judge, samples, [r["shape"] for r in requests],
                                            [r["colour"] for r in requests], sizes)
                adherence["acceptance"] = {"joint_accuracy_at_least": ACCEPTANCE_JOINT_ACCURACY,
                                           "passed": adherence["joint_accuracy"] >= ACCEPTANCE_JOINT_ACCURACY}
                results["metrics"]["adherence"] = adherence
                captions = [caption if parse_prompt(seen) == (request["shape"], request["colour"])
                            else f"{caption} | judge: {seen}"
                            for caption, seen, request in zip(captions, adherence["judged"], requests)]
            if "fd" in metrics:
                real, _ = rendered_split(image_size, num_samples, "test", FD_REAL_SEED, recipe.background)
                reference, _ = rendered_split(image_size, num_samples, "test", FD_REFERENCE_SEED, recipe.background)
                real_features = judge.embed(real)
                results["metrics"]["fd"] = {
                    "fd": frechet_distance_of_features(judge.embed(samples), real_features),
                    "fd_real_vs_real": frechet_distance_of_features(judge.embed(reference), real_features),
                    "num_samples": num_samples, "num_real": num_samples, "feature_dim": int(real_features.shape[1]),
                }
        else:
            from latentgen.evaluation.digits_classifier import fit_digits_classifier, score_digits

            classifier, classifier_accuracy = fit_digits_classifier(int(dataset.get("seed", 0)), image_size)
            digits = score_digits(classifier, samples, [r["label"] for r in requests])
            results["metrics"]["digits_accuracy"] = {**digits, "classifier": classifier_accuracy}
        if settings.grid_path is not None:
            results["sampling"]["grid"] = str(_write_grid(samples, captions, Path(settings.grid_path)))

    if "codec" in metrics:
        codec_start = time.perf_counter()
        _check_positive("codec_images", settings.codec_images)
        held_out = _held_out_images(name, dataset, settings.codec_images)
        photographs, names = natural_images(_check_positive("natural_size", settings.natural_size, 16))
        try:
            natural = reconstruct(pipe.codec, photographs, batch_size=1)
        except ValueError as exc:
            raise ConfigError(f"{exc}; set codec_fidelity.natural_size to such a multiple") from exc
        natural_scores = fidelity(photographs, natural)
        natural_scores.update(size=settings.natural_size, names=names)
        results["metrics"]["codec"] = {"held_out": fidelity(held_out, reconstruct(pipe.codec, held_out)),
                                       "natural": natural_scores,
                                       "seconds": round(time.perf_counter() - codec_start, 1)}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results
