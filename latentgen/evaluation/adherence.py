"""Prompt adherence on the shapes dataset: does each generated image show the shape and colour it was asked for?

The requests walk through every (shape, colour, size) combination in turn, so 216 samples are every
caption twice. A text-conditioned model gets the canonical caption ("a large red circle"), a
label-conditioned one the dataset's label shape * 6 + colour (which says nothing about size). The
judge's reading of each sample is compared with what `parse_prompt` (or the label) asked for.

Composition (a model trained with the dataset's `held_out` or `two_objects`): `seen_requests` and
`unseen_requests` ask for the combinations the train split shows and for the `HELD_OUT` ones, scored
apart by `score_seen_unseen`; `two_object_requests` is a fixed list of two-object prompts, scored half
by half by `score_two_objects` with the two-object judge; `composition_summary` gathers the four
headline figures.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from latentgen.datasets.shapes import (
    COLOURS,
    HELD_OUT,
    RELATIONS,
    SHAPES,
    SIZES,
    caption,
    check_relations,
    is_held_out,
    parse_prompt,
    parse_scene,
    relation_halves,
    scene_caption,
)
from latentgen.evaluation.shapes_judge import HalfJudge, ShapesJudge, half_crops

COLOUR_NAMES = tuple(COLOURS)
ACCEPTANCE_JOINT_ACCURACY = 0.90  # the shapes demo's acceptance bar for shape-and-colour adherence
TWO_OBJECT_SEED = 19  # seeds the fixed list of two-object prompts (`two_object_requests`)
_TWO_OBJECT_SALT = 0x7C0DE  # keeps that list's stream apart from the dataset's
HELD_OUT_EVERY = 4  # every 4th two-object prompt names one HELD_OUT combination


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


# ---- composition: held-out combinations and two-object scenes ----------------------------------------

def _single_request(shape: int, colour: int, size: int) -> dict[str, Any]:
    prompt = caption(shape, colour, size)
    if parse_prompt(prompt) != (shape, colour):  # the caption must say what the scorer expects
        raise AssertionError(f"parse_prompt disagrees with caption '{prompt}'")
    return {"prompt": prompt, "label": shape * len(COLOURS) + colour, "shape": shape, "colour": colour,
            "size": size, "held_out": is_held_out(shape, colour, size)}


def _cycle(factors: Sequence[tuple[int, int, int]], num_samples: int) -> list[dict[str, Any]]:
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1; got {num_samples}")
    return [_single_request(*factors[index % len(factors)]) for index in range(num_samples)]


def seen_requests(num_samples: int = 96) -> list[dict[str, Any]]:
    """`num_samples` single-object requests cycling through the 96 combinations a held-out train split shows,
    in `request_factors` order; each request as in `shapes_requests`, with "held_out": False."""
    factors = [request_factors(index) for index in range(len(SHAPES) * len(COLOURS) * len(SIZES))]
    return _cycle([f for f in factors if not is_held_out(*f)], num_samples)


def unseen_requests(num_samples: int = 48) -> list[dict[str, Any]]:
    """`num_samples` single-object requests cycling through the 12 `HELD_OUT` combinations, "held_out": True."""
    factors = [(SHAPES.index(shape), list(COLOURS).index(colour), SIZES.index(size)) for shape, colour, size in HELD_OUT]
    return _cycle(factors, num_samples)


def _seen_object(rng: np.random.Generator, other: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """A combination a held-out train split shows, of another shape and colour than `other`."""
    while True:
        shape, colour, size = (int(v) for v in rng.integers(0, (len(SHAPES), len(COLOURS), len(SIZES))))
        if not is_held_out(shape, colour, size) and (other is None or (shape != other[0] and colour != other[1])):
            return shape, colour, size


def two_object_requests(num_samples: int = 120, seed: int = TWO_OBJECT_SEED,
                        relations: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A fixed list of two-object requests {prompt, objects, relation, held_out_objects, label, shape, colour,
    size}: request k has relation relations[k % len(relations)] (`relations`: names from RELATIONS, taken in
    RELATIONS order; None: all five, as a dataset draws them by default) and two objects of different shapes and
    colours (as the dataset draws them), drawn from a stream of (seed, k) alone, so a shorter list is a prefix of
    a longer one. Every 4th request (k % 4 == 3) names one HELD_OUT combination, HELD_OUT[(k // 4) % 12], first-named
    when (k // 4) is even and second-named when odd; the others name combinations a held-out train split
    shows. "objects" are (shape, colour, size) in caption order; "label", "shape", "colour" and "size" are
    the first-named object's, as in the dataset's items."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1; got {num_samples}")
    relations = check_relations(relations, "two_object_requests")
    requests = []
    for k in range(num_samples):
        rng = np.random.default_rng([_TWO_OBJECT_SALT, seed, k])
        relation = relations[k % len(relations)]
        if k % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
            shape, colour, size = HELD_OUT[(k // HELD_OUT_EVERY) % len(HELD_OUT)]
            held = (SHAPES.index(shape), list(COLOURS).index(colour), SIZES.index(size))
            other = _seen_object(rng, held)
            objects = [held, other] if (k // HELD_OUT_EVERY) % 2 == 0 else [other, held]
        else:
            first = _seen_object(rng)
            objects = [first, _seen_object(rng, first)]
        prompt = scene_caption(objects, relation)
        if parse_scene(prompt) != {"objects": objects, "relation": relation}:
            raise AssertionError(f"parse_scene disagrees with caption '{prompt}'")
        shape, colour, size = objects[0]
        requests.append({"prompt": prompt, "objects": objects, "relation": relation,
                         "held_out_objects": sum(is_held_out(*obj) for obj in objects),
                         "label": shape * len(COLOURS) + colour, "shape": shape, "colour": colour, "size": size})
    return requests


def _factor_accuracy(predicted: dict[str, torch.Tensor], requests: Sequence[dict[str, Any]],
                     mask: torch.Tensor) -> dict[str, Any]:
    """Per-attribute, shape-and-colour and all-three accuracy of single-object readings on the masked requests."""
    hits = {name: predicted[name][mask] == torch.tensor([r[name] for r, m in zip(requests, mask.tolist()) if m],
                                                        dtype=torch.int64)
            for name in ("shape", "colour", "size")}
    joint = hits["shape"] & hits["colour"]
    return {"num_samples": int(mask.sum()), "shape_accuracy": _accuracy(hits["shape"]),
            "colour_accuracy": _accuracy(hits["colour"]), "size_accuracy": _accuracy(hits["size"]),
            "joint_accuracy": _accuracy(joint), "accuracy": _accuracy(joint & hits["size"])}


def score_seen_unseen(judge: ShapesJudge, images: torch.Tensor, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Adherence of single-object images (N, 3, S, S) to their requests (from `seen_requests`,
    `unseen_requests` or `shapes_requests`), apart for combinations the held-out train split shows ("seen")
    and for the HELD_OUT ones ("unseen"): each with shape, colour, size, shape-and-colour ("joint_accuracy")
    and all-three ("accuracy": the adherence figure) accuracy."""
    if len(images) != len(requests):
        raise ValueError(f"score_seen_unseen needs one request per image; got {len(images)} images, "
                         f"{len(requests)} requests")
    predicted = judge.predict(images)
    held = torch.tensor([is_held_out(r["shape"], r["colour"], r["size"]) for r in requests], dtype=torch.bool)
    judged = [f"{SIZES[z]} {COLOUR_NAMES[c]} {SHAPES[s]}" for s, c, z in
              zip(predicted["shape"].tolist(), predicted["colour"].tolist(), predicted["size"].tolist())]
    right = [all(predicted[name][i] == r[name] for name in ("shape", "colour", "size")) for i, r in enumerate(requests)]
    return {"seen": _factor_accuracy(predicted, requests, ~held),
            "unseen": _factor_accuracy(predicted, requests, held), "judged": judged, "right": right}


def score_two_objects(judge: HalfJudge, images: torch.Tensor, requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Adherence of two-object images (N, 3, S, S) to their requests (from `two_object_requests`), read half by
    half: each named object is looked for in the half its relation puts it in (the first-named on the named
    side, the second-named in the other half).

    An object is right when the judge reads its shape, colour and size in its half ("object_level": the
    fraction of objects); the relation holds when both objects' shape and colour are read in their halves
    (so a scene drawn the wrong way round, or with the attributes swapped between the objects, fails it);
    an image is right when both objects are ("image_level"; the relation then holds too). Also per
    attribute, per relation, and for requests with and without a HELD_OUT object."""
    if len(images) != len(requests):
        raise ValueError(f"score_two_objects needs one request per image; got {len(images)} images, "
                         f"{len(requests)} requests")
    relations = [r["relation"] for r in requests]
    predicted = judge.predict(half_crops(images, relations).flatten(0, 1))  # each (2N,), halves in order
    read = torch.stack([predicted[name] for name in ("shape", "colour", "size")], dim=1).view(len(images), 2, 3)
    halves = torch.tensor([relation_halves(relation) for relation in relations], dtype=torch.int64)  # (N, 2)
    found = torch.gather(read, 1, halves[..., None].expand(-1, -1, 3))  # (N, 2, 3): what each named object's half shows
    wanted = torch.tensor([r["objects"] for r in requests], dtype=torch.int64).view(len(images), 2, 3)
    hits = found == wanted  # (N, 2, 3)
    objects = hits.all(dim=2)  # (N, 2)
    relation = (hits[..., 0] & hits[..., 1]).all(dim=1)  # (N,)
    images_right = objects.all(dim=1)
    held = torch.tensor([r["held_out_objects"] > 0 for r in requests], dtype=torch.bool)
    held_objects = torch.tensor([[is_held_out(*obj) for obj in r["objects"]] for r in requests], dtype=torch.bool)
    names = torch.tensor([RELATIONS.index(r) for r in relations])
    describe = [f"{SIZES[z]} {COLOUR_NAMES[c]} {SHAPES[s]}" for s, c, z in read.view(-1, 3).tolist()]
    return {
        "num_samples": len(images),
        "object_level": _accuracy(objects),
        "image_level": _accuracy(images_right),
        "relation_accuracy": _accuracy(relation),
        "shape_accuracy": _accuracy(hits[..., 0]),
        "colour_accuracy": _accuracy(hits[..., 1]),
        "size_accuracy": _accuracy(hits[..., 2]),
        "image_level_per_relation": {name: _accuracy(images_right[names == index])
                                     for index, name in enumerate(RELATIONS) if (names == index).any()},
        "image_level_seen_objects": _accuracy(images_right[~held]),
        "image_level_with_an_unseen_object": _accuracy(images_right[held]),
        "object_level_unseen_objects": _accuracy(objects[held_objects]),
        "num_unseen_objects": int(held_objects.sum()),
        # What the judge saw in each image's halves (left | right, or top | bottom), and whether it is right.
        "judged": [f"{describe[2 * i]} | {describe[2 * i + 1]}" for i in range(len(images))],
        "right": images_right.tolist(),
    }


def composition_summary(single: dict[str, Any] | None, two_objects: dict[str, Any] | None) -> dict[str, float]:
    """The headline figures {seen, unseen, two_object_object_level, two_object_image_level} of
    `score_seen_unseen` and `score_two_objects` results (NaN for a part not measured)."""
    nan = float("nan")
    return {"seen": single["seen"]["accuracy"] if single else nan,
            "unseen": single["unseen"]["accuracy"] if single else nan,
            "two_object_object_level": two_objects["object_level"] if two_objects else nan,
            "two_object_image_level": two_objects["image_level"] if two_objects else nan}
