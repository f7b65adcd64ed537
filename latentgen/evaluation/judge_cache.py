"""Building a shapes judge once and reusing it: an on-disk cache keyed by everything that determines it.

The key hashes the judge version, the image size, the training recipe, the label names in head
order, and a fingerprint of the renderer's actual output (pixels of a few renders), so a changed
renderer, recipe or network gets a new judge instead of a stale one. Judges are safetensors files
written atomically, with their held-out accuracy in the header. The two-object judge (`half_judge`)
is cached the same way under its own name, version and renders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from latentgen.checkpoint import read_metadata, save_tensors
from latentgen.datasets.shapes import COLOURS, SHAPES, SIZES
from latentgen.errors import CheckpointError, LatentgenError
from latentgen.evaluation.shapes_judge import (
    HALF_JUDGE_RECIPE,
    HALF_JUDGE_VERSION,
    JUDGE_VERSION,
    HalfJudge,
    JudgeRecipe,
    ShapesJudge,
    half_held_out_accuracy,
    held_out_accuracy,
    rendered_scenes,
    rendered_split,
    train_half_judge,
    train_shapes_judge,
)

CACHE_ENV = "LATENTGEN_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/latentgen")
MIN_ACCURACY = 0.98
MIN_HALF_ACCURACY = 0.99  # the two-object judge: per head and for all three attributes of an object
JUDGE_METADATA_KEY = "latentgen.judge"
FINGERPRINT_RENDERS = 8

log = logging.getLogger("latentgen.evaluation")


class UntrustworthyJudgeError(LatentgenError, RuntimeError):
    """A judge whose held-out accuracy is too low for its verdicts to mean anything."""


def judges_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """<cache_dir or $LATENTGEN_CACHE_DIR or ~/.cache/latentgen>/judges."""
    root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(root).expanduser() / "judges"


def renderer_fingerprint(image_size: int, recipe: JudgeRecipe) -> str:
    """sha256 of a few train and test renders' pixels: changes whenever the renderer's output does."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        images, _ = rendered_split(image_size, FINGERPRINT_RENDERS, split, recipe.seed, recipe.background)
        digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def judge_key(image_size: int, recipe: JudgeRecipe) -> str:
    payload = {"judge_version": JUDGE_VERSION, "image_size": int(image_size), "recipe": asdict(recipe),
               "labels": [list(SHAPES), list(COLOURS), list(SIZES)],
               "renderer": renderer_fingerprint(image_size, recipe)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def half_renderer_fingerprint(image_size: int, recipe: JudgeRecipe) -> str:
    """sha256 of a few train and test two-object renders' pixels."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        images, _, _ = rendered_scenes(image_size, FINGERPRINT_RENDERS, split, recipe.seed, recipe.background)
        digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def half_judge_key(image_size: int, recipe: JudgeRecipe) -> str:
    payload = {"judge": "halves", "judge_version": HALF_JUDGE_VERSION, "image_size": int(image_size),
               "recipe": asdict(recipe), "labels": [list(SHAPES), list(COLOURS), list(SIZES)],
               "renderer": half_renderer_fingerprint(image_size, recipe)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _load(path: Path, judge: ShapesJudge) -> tuple[ShapesJudge, dict[str, Any]]:
    from safetensors.torch import load_file

    info = json.loads(read_metadata(path)[JUDGE_METADATA_KEY])
    judge.load_state_dict(load_file(str(path)))
    return judge.eval().requires_grad_(False), info


def _cached(path: Path, build: Callable[[], ShapesJudge], train: Callable[[], ShapesJudge],
            accuracy: Callable[[ShapesJudge], dict[str, float]], info: dict[str, Any],
            what: str) -> tuple[ShapesJudge, dict[str, Any]]:
    """The judge cached at `path`, or one trained by `train` and cached there with `info` and its accuracy."""
    judge = None
    if path.exists():
        try:
            judge, info = _load(path, build())
            info["cached"] = True
        except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
            log.warning("the cached %s %s is unreadable (%s); training a new one", what, path, exc)
    if judge is None:
        log.info("training the %s for %dpx images (%d steps on %d renders); cached at %s", what, info["image_size"],
                 info["recipe"]["steps"], info["recipe"]["train_images"], path)
        start = time.perf_counter()
        judge = train()
        info = {**info, "held_out_accuracy": accuracy(judge), "train_seconds": round(time.perf_counter() - start, 1)}
        save_tensors(path, judge.state_dict(), {JUDGE_METADATA_KEY: info})
        info["cached"] = False
    info["path"] = str(path)
    return judge, info


def shapes_judge(image_size: int, recipe: JudgeRecipe = JudgeRecipe(), cache_dir: str | os.PathLike | None = None,
                 min_accuracy: float = MIN_ACCURACY) -> tuple[ShapesJudge, dict[str, Any]]:
    """The judge for `image_size` from the cache, trained and cached first if missing; with a record of
    its held-out accuracy, cache path and whether it came from the cache. Refuses a judge whose
    held-out shape, colour or size accuracy is under `min_accuracy`."""
    key = judge_key(image_size, recipe)
    path = judges_dir(cache_dir) / f"shapes-{image_size}px-{key}.safetensors"
    judge, info = _cached(path, lambda: ShapesJudge(image_size), lambda: train_shapes_judge(image_size, recipe),
                          lambda judge: held_out_accuracy(judge, recipe),
                          {"image_size": image_size, "judge_version": JUDGE_VERSION, "recipe": asdict(recipe)},
                          "shapes judge")
    accuracy = info["held_out_accuracy"]
    log.info("shapes judge %s: held-out accuracy shape %.1f%%, colour %.1f%%, size %.1f%% on %d test renders",
             path.name, 100 * accuracy["shape"], 100 * accuracy["colour"], 100 * accuracy["size"],
             info["recipe"]["held_out_images"])
    weakest = min(("shape", "colour", "size"), key=lambda name: accuracy[name])
    if accuracy[weakest] < min_accuracy:
        raise UntrustworthyJudgeError(
            f"the shapes judge for {image_size}px images reads {weakest} right on only "
            f"{100 * accuracy[weakest]:.1f}% of held-out renders (needs at least {100 * min_accuracy:.0f}%), so its "
            f"verdicts would not mean anything; train it longer (e.g. judge.steps={2 * recipe.steps}) or, if the "
            f"renderer changed, check it. The judge is cached at {path}")
    return judge, info


def half_judge(image_size: int, recipe: JudgeRecipe = HALF_JUDGE_RECIPE, cache_dir: str | os.PathLike | None = None,
               min_accuracy: float = MIN_HALF_ACCURACY) -> tuple[HalfJudge, dict[str, Any]]:
    """The two-object judge for `image_size` scenes from the cache, trained and cached first if missing, with
    the same record as `shapes_judge`. Refuses a judge whose held-out shape, colour or size accuracy, or whose
    accuracy on all three of an object, is under `min_accuracy` (on the objects of test-split scenes)."""
    key = half_judge_key(image_size, recipe)
    path = judges_dir(cache_dir) / f"shapes-halves-{image_size}px-{key}.safetensors"
    judge, info = _cached(path, lambda: HalfJudge(image_size), lambda: train_half_judge(image_size, recipe),
                          lambda judge: half_held_out_accuracy(judge, recipe),  # type: ignore[arg-type]
                          {"image_size": image_size, "judge_version": HALF_JUDGE_VERSION, "recipe": asdict(recipe)},
                          "two-object judge")
    accuracy = info["held_out_accuracy"]
    log.info("two-object judge %s: held-out accuracy shape %.1f%%, colour %.1f%%, size %.1f%%, all three %.1f%% "
             "on the objects of %d test scenes", path.name, 100 * accuracy["shape"], 100 * accuracy["colour"],
             100 * accuracy["size"], 100 * accuracy["object"], info["recipe"]["held_out_images"])
    weakest = min(("shape", "colour", "size", "object"), key=lambda name: accuracy[name])
    if accuracy[weakest] < min_accuracy:
        what = "all three attributes of an object" if weakest == "object" else weakest
        raise UntrustworthyJudgeError(
            f"the two-object judge for {image_size}px scenes reads {what} right on only "
            f"{100 * accuracy[weakest]:.1f}% of the objects in held-out two-object renders (needs at least "
            f"{100 * min_accuracy:.0f}%), so its verdicts would not mean anything; train it longer (a recipe "
            f"with steps={2 * recipe.steps}), judge larger images (a half of a {image_size}px scene is "
            f"{image_size // 2}px wide), or leave two-object prompts out (composition.two_objects=0). The judge "
            f"is cached at {path}")
    return judge, info  # type: ignore[return-value]
