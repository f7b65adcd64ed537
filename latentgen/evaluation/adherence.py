"""Prompt adherence on the shapes dataset: does each generated image show the shape and colour it was asked for?

The requests walk through every (shape, colour, size) combination in turn, so 216 samples are every
caption twice. A text-conditioned model gets the canonical caption ("a large red circle"), a
label-conditioned one the dataset's label shape * 6 + colour (which says nothing about size). The
judge's reading of each sample is compared with what `parse_prompt` (or the label) asked for.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch

from latentgen.datasets.shapes import COLOURS, SHAPES, SIZES, caption, parse_prompt
from latentgen.evaluation.shapes_judge import ShapesJudge

COLOUR_NAMES = tuple(COLOURS)
ACCEPTANCE_JOINT_ACCURACY = 0.90  # the shapes demo's acceptance bar for shape-and-colour adherence


def request_factors(index: int) -> tuple[int, int, int]:
    """The (shape, colour, size) of request `index`: every combination once per 108 requests, and any
    6 consecutive requests name every shape and every colour once (a Latin square), so that even a
    short run is balanced."""
    shape = index % len(SHAPES)
    step = index // len(SHAPES)  # 0..5 within a block of 36
    block = index // (len(SHAPES) * len(COLOURS))
    return shape, (step + shape) % len(COLOURS), (step + block) % len(SIZES)


def shapes_requests(num_samples: int) -> list[dict[str, Any]]:
    """`num_samples` requests {prompt, label, shape, colour, size}, cycling through every combination."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1; got {num_samples}")
    requests = []
    for index in range(num_samples):
        shape, colour, size = request_factors(index)
        prompt = caption(shape, colour, size)
        if parse_prompt(prompt) != (shape, colour):  # the caption must say what the scorer expects
            raise AssertionError(f"parse_prompt disagrees with caption '{prompt}'")
        requests.append({"prompt": prompt, "label": shape * len(COLOURS) + colour,
                         "shape": shape, "colour": colour, "size": size})
    return requests


def _accuracy(hits: torch.Tensor) -> float:
    return float(hits.double().mean()) if hits.numel() else float("nan")


def score_adherence(judge: ShapesJudge, images: torch.Tensor, shapes: Sequence[int], colours: Sequence[int],
                    sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Shape, colour and joint (both right) accuracy of images (N, 3, S, S) in [-1, 1] against the
    requested shapes and colours (N,), plus size accuracy when sizes were requested, per-shape and
    per-colour joint accuracy, the most frequent mistakes and what the judge saw in each image."""
    shapes, colours = torch.as_tensor(shapes).long(), torch.as_tensor(colours).long()
    if not len(images) == len(shapes) == len(colours):
        raise ValueError(f"score_adherence needs one shape and colour per image; got {len(images)} images, "
                         f"{len(shapes)} shapes, {len(colours)} colours")
    predicted = judge.predict(images)
    shape_hits, colour_hits = predicted["shape"] == shapes, predicted["colour"] == colours
    joint_hits = shape_hits & colour_hits
    result: dict[str, Any] = {
        "num_samples": len(images),
        "shape_accuracy": _accuracy(shape_hits),
        "colour_accuracy": _accuracy(colour_hits),
        "joint_accuracy": _accuracy(joint_hits),
    }
    if sizes is not None:
        result["size_accuracy"] = _accuracy(predicted["size"] == torch.as_tensor(sizes).long())
    result["joint_accuracy_per_shape"] = {name: _accuracy(joint_hits[shapes == index])
                                          for index, name in enumerate(SHAPES) if (shapes == index).any()}
    result["joint_accuracy_per_colour"] = {name: _accuracy(joint_hits[colours == index])
                                           for index, name in enumerate(COLOUR_NAMES) if (colours == index).any()}
    mistakes = Counter(
        f"{COLOUR_NAMES[c]} {SHAPES[s]} -> {COLOUR_NAMES[pc]} {SHAPES[ps]}"
        for s, c, ps, pc, hit in zip(shapes.tolist(), colours.tolist(), predicted["shape"].tolist(),
                                     predicted["colour"].tolist(), joint_hits.tolist()) if not hit)
    result["most_frequent_mistakes"] = dict(mistakes.most_common(5))
    # What the judge saw in each image, in order: for a look at the samples next to the numbers.
    result["judged"] = [f"{COLOUR_NAMES[c]} {SHAPES[s]}" for s, c in
                        zip(predicted["shape"].tolist(), predicted["colour"].tolist())]
    return result
