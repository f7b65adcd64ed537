"""What latentgen-eval does, callable from Python: pick the metrics that apply to a checkpoint, compute them.

The metrics a checkpoint gets depend on the dataset it was trained on, which is read from the
checkpoint (a `dataset` node in its config or a `latentgen.dataset` header entry, when the trainer
wrote one) or else from the `.hydra/config.yaml` of the training run the checkpoint sits in
(`<run>/checkpoints/last.safetensors`); `dataset=` on the command line names it explicitly.

A shapes checkpoint trained with the dataset's `held_out` or `two_objects` also gets `composition` by
default (any shapes checkpoint on request): adherence on the combinations its train split showed and
on the HELD_OUT ones, and on two-object prompts, object by object and image by image.
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
from latentgen.datasets.shapes import DEFAULT_BACKGROUND, parse_prompt
from latentgen.errors import ConfigError
from latentgen.evaluation.adherence import (
    ACCEPTANCE_JOINT_ACCURACY,
    composition_summary,
    score_adherence,
    score_seen_unseen,
    score_two_objects,
    seen_requests,
    shapes_requests,
    two_object_requests,
    unseen_requests,
)
from latentgen.evaluation.codec_fidelity import fidelity, natural_images, reconstruct
from latentgen.evaluation.frechet import frechet_distance_of_features
from latentgen.evaluation.judge_cache import MIN_ACCURACY, MIN_HALF_ACCURACY, half_judge, shapes_judge
from latentgen.evaluation.sample_generation import generate
from latentgen.evaluation.shapes_judge import HALF_JUDGE_RECIPE, JudgeRecipe, rendered_split

log = logging.getLogger("latentgen.evaluation")

METRICS: dict[str, str] = {
    "adherence": "shape, colour and joint accuracy of samples, read by the shapes judge",
    "fd": "Fréchet distance between samples and real renders in the shapes judge's feature space",
    "digits_accuracy": "class accuracy of digit samples, read by an SVM trained on the real digits",
    "codec": "PSNR and SSIM of the codec's reconstructions (held-out images and scikit-image photographs)",
    "composition": "adherence on seen and held-out (shape, colour, size) combinations and on two-object prompts "
                   "(object and image level), read by the shapes judge and the two-object judge",
}
METRICS_BY_DATASET: dict[str, tuple[str, ...]] = {"shapes": ("adherence", "fd", "composition", "codec"),
                                                  "digits": ("digits_accuracy", "codec")}
# Metrics left out by default unless the checkpoint's dataset was composed (held_out or two_objects).
COMPOSED_ONLY_BY_DEFAULT = ("composition",)
DEFAULT_NUM_SAMPLES = {"shapes": 216, "digits": 200}  # shapes: every (shape, colour, size) caption twice
SAMPLE_METRICS = ("adherence", "fd", "digits_accuracy")  # they share one set of samples (composition has its own)
CONDITIONED_METRICS = ("adherence", "digits_accuracy", "composition")  # they compare a sample with what was asked for
PROMPT_METRICS = ("composition",)  # sizes, held-out triples and relations: only a prompt can ask for them
DATASET_METADATA_KEY = "latentgen.dataset"
# Real renders for the Fréchet distance come from the test split under seeds the judge never saw.
FD_REAL_SEED, FD_REFERENCE_SEED = 1, 2
GRID_IMAGES = 72


@dataclass
class CompositionCounts:
    """How many samples `composition` asks for: single objects of the combinations a held-out train split
    shows (every one once per 96) and of the HELD_OUT ones (each once per 12), and two-object prompts
    (`two_object_requests`: the training dataset's relations in turn, a HELD_OUT object in every 4th). 0 leaves
    a part out."""

    seen: int = 96
    unseen: int = 48
    two_objects: int = 120


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
    composition: CompositionCounts = field(default_factory=CompositionCounts)
    half_judge: JudgeRecipe = field(default_factory=lambda: HALF_JUDGE_RECIPE)  # the two-object judge
    min_half_judge_accuracy: float = MIN_HALF_ACCURACY
    codec_images: int = 256
    natural_size: int = 256
    progress: bool = False
    grid_path: str | Path | None = None  # a labelled PNG grid of the first samples, when given
    adapters: Sequence[Any] = ()  # built adapters, attached in order after loading (an accelerator's quality cost)


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


def composed(dataset: Mapping[str, Any] | None) -> bool:
    """Whether a shapes dataset config holds out combinations or makes two-object scenes."""
    if not dataset:
        return False
    return dataset.get("held_out") is True or float(dataset.get("two_objects") or 0) > 0


def choose_metrics(dataset_name: str, requested: Sequence[str] | str | None, source: str,
                   dataset: Mapping[str, Any] | None = None) -> list[str]:
    """The requested metrics, or every one that applies to the dataset (`composition` only when the
    `dataset` config is composed); refuses one that does not apply."""
    if dataset_name not in METRICS_BY_DATASET:
        raise ConfigError(f"latentgen-eval has metrics for the datasets {', '.join(METRICS_BY_DATASET)}; the "
                          f"checkpoint was trained on '{dataset_name}' (per {source})")
    applicable = METRICS_BY_DATASET[dataset_name]
    if requested is None:
        return [m for m in applicable if m not in COMPOSED_ONLY_BY_DEFAULT or composed(dataset)]
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
    from latentgen.datasets.shapes import ShapesDataset

    image_size, seed = int(dataset.get("image_size", 32)), int(dataset.get("seed", 0))
    if name == "shapes" and float(dataset.get("two_objects") or 0) > 0:  # its scenes as well
        data = ShapesDataset(image_size=image_size, size=count, seed=seed, split="test",
                             background=dataset.get("background", DEFAULT_BACKGROUND),
                             two_objects=float(dataset["two_objects"]))
        return torch.stack([data[i]["image"] for i in range(count)])
    if name == "shapes":
        images, _ = rendered_split(image_size, count, "test", seed, dataset.get("background", DEFAULT_BACKGROUND))
        return images
    data = DigitsDataset(image_size=image_size, split="test", seed=seed)
    return torch.stack([data[i]["image"] for i in range(min(count, len(data)))])


def _write_grid(samples: torch.Tensor, captions: list[str], path: Path, count: int = GRID_IMAGES,
                min_tile: int = 96) -> Path:
    from latentgen.imaging import grid, to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    grid(to_pil(samples[:count]), columns=12, labels=captions[:count], min_tile=min_tile).save(path)
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
    metrics = choose_metrics(name, settings.metrics, source, dataset)
    _check_positive("batch_size", settings.batch_size)
    num_samples = _check_positive("num_samples", settings.num_samples if settings.num_samples is not None
                                  else DEFAULT_NUM_SAMPLES[name], 2)

    device = resolve_device(settings.device)
    pipe = LatentDiffusionPipeline.from_checkpoint(checkpoint, device=device, scheduler=settings.scheduler)
    for adapter in settings.adapters:
        pipe.attach(adapter)
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
        if not keys or (metric in PROMPT_METRICS and "prompt" not in keys):
            needs = "prompt" if metric in PROMPT_METRICS else "prompt or label"
            reason = (f"{metric} compares samples with the {needs} they were asked for, but conditioner "
                      f"'{pipe.conditioner.name}' reads {list(pipe.conditioner.input_keys) or 'nothing'}")
            if settings.metrics is not None:
                raise ConfigError(f"{reason}; leave {metric} out of metrics")
            skipped[metric] = reason
            metrics.remove(metric)
    counts = settings.composition
    if "composition" in metrics:
        for part in ("seen", "unseen", "two_objects"):
            _check_positive(f"composition.{part}", getattr(counts, part), 0)
        if counts.seen + counts.unseen + counts.two_objects == 0:
            raise ConfigError("composition.seen, unseen and two_objects are all 0: ask for some samples, or leave "
                              "composition out of metrics")
        if counts.two_objects and image_size < 32:
            raise ConfigError(f"composition's two-object prompts need images of at least 32px (each object lies "
                              f"in half the image); these are {image_size}px: set composition.two_objects=0")

    steps = int(settings.steps if settings.steps is not None else pipe.sampling["steps"])
    guidance_scale = float(settings.guidance_scale if settings.guidance_scale is not None
                           else pipe.sampling["guidance_scale"])
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint), "dataset": dataset, "dataset_source": source,
        "conditioning": list(keys), "metrics": {}, "skipped": skipped,
        **({"adapters": [adapter.describe() for adapter in settings.adapters]} if settings.adapters else {}),
    }
    # The judges first: a refused judge should not cost a sampling run.
    recipe = replace(settings.judge, background=dataset.get("background", DEFAULT_BACKGROUND))
    if (name == "shapes" and any(metric in ("adherence", "fd") for metric in metrics)) or \
            ("composition" in metrics and counts.seen + counts.unseen > 0):
        judge, results["judge"] = shapes_judge(image_size, recipe, settings.cache_dir, settings.min_judge_accuracy)
    if "composition" in metrics and counts.two_objects > 0:
        half_recipe = replace(settings.half_judge, background=recipe.background)
        scene_judge, results["half_judge"] = half_judge(image_size, half_recipe, settings.cache_dir,
                                                        settings.min_half_judge_accuracy)
    if any(metric in SAMPLE_METRICS for metric in metrics):
        results["sampling"] = {"num_samples": num_samples, "steps": steps, "guidance_scale": guidance_scale,
                               "scheduler": pipe.scheduler.name, "seed": settings.seed,
                               "batch_size": settings.batch_size, "height": height, "width": width}
        if name == "shapes":
            requests = shapes_requests(num_samples)
        else:
            from latentgen.datasets.digits import DIGIT_WORDS
            from latentgen.datasets.digits import caption as digit_caption

            requests = [{"label": i % len(DIGIT_WORDS), "prompt": digit_caption(i % len(DIGIT_WORDS))}
                        for i in range(num_samples)]
        conditions = {f"{key}s": [request[key] for request in requests] for key in keys}
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

    if "composition" in metrics:
        single = seen_requests(counts.seen) if counts.seen else []
        single += unseen_requests(counts.unseen) if counts.unseen else []
        # The relations the model was trained on (a dataset may draw from a few of them).
        scenes = two_object_requests(counts.two_objects, relations=dataset.get("relations")) \
            if counts.two_objects else []
        prompts = [request["prompt"] for request in single + scenes]
        log.info("sampling %d images for composition (%d single-object, %d two-object prompts)", len(prompts),
                 len(single), len(scenes))
        sample_start = time.perf_counter()
        samples = generate(pipe, prompts=prompts, seed=settings.seed, batch_size=settings.batch_size,
                           progress=settings.progress, steps=steps, guidance_scale=guidance_scale, height=height,
                           width=width)
        composition: dict[str, Any] = {
            "sampling": {"num_samples": len(prompts), "seen": counts.seen, "unseen": counts.unseen,
                         "two_objects": counts.two_objects, "steps": steps, "guidance_scale": guidance_scale,
                         "seed": settings.seed, "seconds": round(time.perf_counter() - sample_start, 1)}}
        single_scores = score_seen_unseen(judge, samples[:len(single)], single) if single else None
        scene_scores = score_two_objects(scene_judge, samples[len(single):], scenes) if scenes else None
        composition.update(composition_summary(single_scores, scene_scores))
        composition["single"], composition["two_object"] = single_scores, scene_scores
        results["metrics"]["composition"] = composition
        if settings.grid_path is not None:  # the first 24 of each part, a wrong one with what the judge saw
            parts = [scores for scores in (single_scores, scene_scores) if scores]
            judged = [seen for scores in parts for seen in scores["judged"]]
            right = [hit for scores in parts for hit in scores["right"]]
            starts = [0, counts.seen, counts.seen + counts.unseen, len(prompts)]
            shown = [i for start, stop in zip(starts, starts[1:]) for i in range(start, min(stop, start + 24))]
            labels = [prompts[i] if right[i] else f"{prompts[i]} | judge: {judged[i]}" for i in shown]
            grid_path = Path(settings.grid_path)
            composition["sampling"]["grid"] = str(_write_grid(
                samples[shown], labels, grid_path.with_name(f"{grid_path.stem}_composition{grid_path.suffix}"),
                count=len(shown), min_tile=192))

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
