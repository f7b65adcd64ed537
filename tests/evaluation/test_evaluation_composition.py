"""Composition on the shapes dataset: the two-object judge (trained once, cached, refused when weak) reads
rendered scenes half by half and fails a scene drawn the wrong way round; adherence on seen and HELD_OUT
combinations is reported apart; latentgen-eval's `composition` metric on a checkpoint of composed data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from latentgen.config import compose
from latentgen.config.containers import to_plain
from latentgen.datasets.shapes import (
    COLOURS,
    HELD_OUT,
    RELATIONS,
    SHAPES,
    SIZES,
    half_position_range,
    relation_axis,
    relation_halves,
    render,
    render_scene,
)
from latentgen.errors import ConfigError
from latentgen.evaluation import evaluate, judge_cache
from latentgen.evaluation.adherence import (
    composition_summary,
    score_seen_unseen,
    score_two_objects,
    seen_requests,
    two_object_requests,
    unseen_requests,
)
from latentgen.evaluation.evaluate import CompositionCounts, EvalSettings, choose_metrics, evaluate_checkpoint
from latentgen.evaluation.judge_cache import UntrustworthyJudgeError, half_judge
from latentgen.evaluation.report import markdown_table
from latentgen.evaluation.shapes_judge import HalfJudge, JudgeRecipe, half_crops
from latentgen.pipeline import LatentDiffusionPipeline

SIZE = 32  # the smallest scene size: each object lies in a 16-pixel-wide half


@pytest.fixture(scope="module")
def judge(cache):
    return half_judge(SIZE, cache_dir=cache)


def _scenes(requests, seed: int = 0, swap: bool = False) -> torch.Tensor:
    """Renders of what each two-object request asks for, at random places in their halves; `swap`: the two
    objects drawn in each other's places."""
    rng = np.random.default_rng(seed)
    images = []
    for request in requests:
        objects = request["objects"][::-1] if swap else request["objects"]
        axis, halves = relation_axis(request["relation"]), relation_halves(request["relation"])
        centres = []
        for (_, _, size), half in zip(objects, halves):
            (x_low, x_high), (y_low, y_high) = half_position_range(size, SIZE, axis, half)
            centres.append((rng.uniform(x_low, x_high), rng.uniform(y_low, y_high)))
        images.append(render_scene(objects, request["relation"], centres, SIZE, rng))
    return torch.stack(images)


def test_the_two_object_judge_is_accurate_cached_and_refused_when_weak(judge, cache, monkeypatch, tmp_path):
    model, info = judge
    assert isinstance(model, HalfJudge) and model.input_shape == (SIZE, SIZE // 2) and not info["cached"]
    accuracy = info["held_out_accuracy"]
    assert min(accuracy[k] for k in ("shape", "colour", "size", "object")) >= 0.99, accuracy
    assert Path(info["path"]).name.startswith(f"shapes-halves-{SIZE}px-")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge was retrained")

    monkeypatch.setattr(judge_cache, "train_half_judge", no_training)
    again, again_info = half_judge(SIZE, cache_dir=cache)
    assert again_info["cached"] and again_info["held_out_accuracy"] == accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    monkeypatch.undo()
    with pytest.raises(UntrustworthyJudgeError, match=r"two-object judge .* only .*% of the objects in held-out "
                                                      r"two-object renders \(needs at least 99%\)"):
        half_judge(SIZE, JudgeRecipe(train_images=32, steps=2, held_out_images=50), cache_dir=tmp_path)


def test_half_crops_cut_along_the_relation():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    crops = half_crops(image, ["left of", "above"])
    assert crops.shape == (2, 2, 3, 4, 2)
    assert torch.equal(crops[0, 0], image[0, :, :, :2]) and torch.equal(crops[0, 1], image[0, :, :, 2:])
    assert torch.equal(crops[1, 0], image[1, :, :2, :].transpose(-1, -2))  # the top half, as a tall strip
    assert torch.equal(crops[1, 1], image[1, :, 2:, :].transpose(-1, -2))


def test_two_object_requests_are_fixed_and_balanced():
    requests = two_object_requests(120)
    assert requests[:10] == two_object_requests(10)  # a shorter list is a prefix
    assert [r["relation"] for r in requests[:5]] == list(RELATIONS)
    assert sum(r["held_out_objects"] for r in requests) == 30 and all(r["held_out_objects"] <= 1 for r in requests)
    named = {tuple(obj) for r in requests for obj in r["objects"]}
    held = {(SHAPES.index(s), list(COLOURS).index(c), SIZES.index(z)) for s, c, z in HELD_OUT}
    assert held <= named
    for r in requests:
        (s1, c1, _), (s2, c2, _) = r["objects"]
        assert s1 != s2 and c1 != c2
    assert requests[0]["prompt"] == "a medium purple square left of a small cyan cross"
    # a model trained on a few relations is asked for those in turn, the objects as before
    few = two_object_requests(120, relations=["and", "left of"])
    assert [r["relation"] for r in few[:4]] == ["left of", "and", "left of", "and"]
    assert [r["objects"] for r in few] == [r["objects"] for r in requests]
    with pytest.raises(ConfigError, match="relations must be a non-empty list"):
        two_object_requests(10, relations=["beside"])


def test_rendered_scenes_score_full_and_a_swapped_scene_fails(judge):
    model, _ = judge
    requests = two_object_requests(100)
    right = score_two_objects(model, _scenes(requests), requests)
    assert right["object_level"] >= 0.99 and right["image_level"] >= 0.98 and right["relation_accuracy"] >= 0.99
    assert right["num_samples"] == 100 and set(right["image_level_per_relation"]) == set(RELATIONS)
    assert right["object_level_unseen_objects"] >= 0.95 and right["num_unseen_objects"] == 25
    # "A left of B" drawn, "B left of A" asked: every scene the wrong way round ("A and B" as "B and A").
    swapped = score_two_objects(model, _scenes(requests, swap=True), requests)
    assert swapped["relation_accuracy"] == 0.0 and swapped["image_level"] == 0.0 and swapped["object_level"] <= 0.02
    # The same, one scene at a time: a red circle left of a blue star, scored against the reverse prompt.
    scene = render_scene([("circle", "red", "large"), ("star", "blue", "small")], "left of", image_size=SIZE)[None]
    asked = {"relation": "left of", "objects": [(3, 2, 0), (0, 0, 2)], "held_out_objects": 0}
    reverse = score_two_objects(model, scene, [asked])
    assert reverse["relation_accuracy"] == 0.0 and reverse["right"] == [False]
    assert reverse["judged"] == ["large red circle | small blue star"]
    forward = score_two_objects(model, scene, [{**asked, "objects": [(0, 0, 2), (3, 2, 0)]}])
    assert forward["relation_accuracy"] == forward["image_level"] == 1.0
    # The right objects on the right sides, but "right of" asked: wrong.
    wrong_side = score_two_objects(model, scene, [{**asked, "relation": "right of", "objects": [(0, 0, 2), (3, 2, 0)]}])
    assert wrong_side["relation_accuracy"] == 0.0


class _Reader:
    """A stand-in judge that reads every image as the request it was given, but for `wrong` indices."""

    def __init__(self, requests, wrong=()):
        self.requests, self.wrong = requests, set(wrong)

    def predict(self, images):
        read = {name: torch.tensor([r[name] for r in self.requests]) for name in ("shape", "colour", "size")}
        for index in self.wrong:
            read["size"][index] = (read["size"][index] + 1) % len(SIZES)
        return read


def test_seen_and_unseen_are_reported_apart():
    seen, unseen = seen_requests(96), unseen_requests(24)
    assert len({(r["shape"], r["colour"], r["size"]) for r in seen}) == 96 and not any(r["held_out"] for r in seen)
    assert {(SHAPES[r["shape"]], list(COLOURS)[r["colour"]], SIZES[r["size"]]) for r in unseen} == set(HELD_OUT)
    requests = seen + unseen
    wrong = [96 + i for i in range(0, 24, 2)] + [0, 1, 2]  # half the unseen ones and three seen ones: wrong size
    scores = score_seen_unseen(_Reader(requests, wrong), torch.zeros(len(requests), 3, 16, 16), requests)
    assert scores["seen"]["num_samples"] == 96 and scores["unseen"]["num_samples"] == 24
    assert scores["seen"]["accuracy"] == pytest.approx(93 / 96) and scores["unseen"]["accuracy"] == 0.5
    assert scores["seen"]["joint_accuracy"] == scores["unseen"]["joint_accuracy"] == 1.0  # only sizes were wrong
    assert scores["right"][:4] == [False, False, False, True]
    summary = composition_summary(scores, None)
    assert summary["seen"] == pytest.approx(93 / 96) and summary["unseen"] == 0.5
    assert math.isnan(summary["two_object_object_level"]) and math.isnan(summary["two_object_image_level"])


def test_composition_is_chosen_for_composed_data_only():
    composed = {"name": "shapes", "held_out": True, "two_objects": 0.5}
    assert choose_metrics("shapes", None, "x", composed) == ["adherence", "fd", "composition", "codec"]
    assert choose_metrics("shapes", None, "x", {"name": "shapes", "two_objects": 0.0}) == ["adherence", "fd", "codec"]
    assert choose_metrics("shapes", None, "x", {"name": "shapes", "held_out": True})[2] == "composition"
    assert choose_metrics("shapes", ["composition"], "x") == ["composition"]  # any shapes checkpoint on request
    with pytest.raises(ConfigError, match="metric 'composition' does not apply to a digits checkpoint"):
        choose_metrics("digits", ["composition"], "x")


def _untrained_checkpoint(tmp_path: Path, overrides: list[str]) -> tuple[Path, dict]:
    cfg = compose("train", ["experiment=smoke", *overrides])
    pipe = LatentDiffusionPipeline.from_config(cfg)
    return pipe.save(tmp_path / "model.safetensors"), to_plain(cfg.dataset)


def test_eval_reports_composition_of_a_composed_checkpoint(judge, cache, tmp_path, monkeypatch):
    checkpoint, dataset = _untrained_checkpoint(tmp_path, ["dataset=shapes_composed", "dataset.size=16",
                                                           "dataset.relations=['and','left of']"])
    assert dataset["held_out"] is True and dataset["image_size"] == SIZE
    given = []

    def reader(image_size, recipe, cache_dir, min_accuracy):  # stands in for the 32px single-object judge
        given.append(image_size)
        accuracy = {"shape": 1.0, "colour": 1.0, "size": 1.0, "joint": 1.0}
        return _Reader(seen_requests(3) + unseen_requests(2)), {"held_out_accuracy": accuracy, "cached": True}

    monkeypatch.setattr(evaluate, "shapes_judge", reader)
    settings = EvalSettings(steps=1, dataset=dataset, cache_dir=str(cache), metrics=["composition"],
                            composition=CompositionCounts(seen=3, unseen=2, two_objects=5),
                            grid_path=tmp_path / "samples.png")
    results = evaluate_checkpoint(checkpoint, settings)
    composition = results["metrics"]["composition"]
    assert given == [SIZE] and results["half_judge"]["cached"]
    assert composition["seen"] == 1.0 and composition["unseen"] == 1.0  # the stand-in reads what was asked
    assert composition["single"]["seen"]["num_samples"] == 3 and composition["single"]["unseen"]["num_samples"] == 2
    assert 0 <= composition["two_object_image_level"] <= composition["two_object_object_level"] <= 1
    assert composition["two_object"]["num_samples"] == 5 and composition["sampling"]["num_samples"] == 10
    assert set(composition["two_object"]["image_level_per_relation"]) == {"left of", "and"}  # those it learnt
    assert Path(composition["sampling"]["grid"]).name == "samples_composition.png"
    table = markdown_table(results)
    assert "HELD_OUT combinations (n=2)" in table and "two objects: image-level adherence (n=5)" in table
    assert "two-object judge held-out accuracy" in table


def test_eval_composition_refusals(tmp_path):
    checkpoint, dataset = _untrained_checkpoint(tmp_path, [])  # smoke: 16px, text
    with pytest.raises(ConfigError, match="two-object prompts need images of at least 32px .* composition.two_objects=0"):
        evaluate_checkpoint(checkpoint, EvalSettings(metrics=["composition"], dataset=dataset, steps=1))
    with pytest.raises(ConfigError, match="composition.seen, unseen and two_objects are all 0"):
        evaluate_checkpoint(checkpoint, EvalSettings(metrics=["composition"], dataset=dataset, steps=1,
                                                     composition=CompositionCounts(0, 0, 0)))
    labels, dataset = _untrained_checkpoint(tmp_path, ["conditioner=class_label", "dataset=shapes_composed",
                                                       "dataset.size=16"])
    with pytest.raises(ConfigError, match="composition compares samples with the prompt .* reads \\['label'\\]"):
        evaluate_checkpoint(labels, EvalSettings(metrics=["composition"], dataset=dataset, steps=1))
    settings = EvalSettings(metrics=None, dataset=dataset, steps=1, codec_images=2, natural_size=16)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(evaluate, "METRICS_BY_DATASET", {"shapes": ("composition", "codec")})
    try:  # by default a label-conditioned checkpoint skips composition and says why
        results = evaluate_checkpoint(labels, settings)
    finally:
        monkey.undo()
    assert "reads ['label']" in results["skipped"]["composition"] and set(results["metrics"]) == {"codec"}


def test_a_rendered_single_object_still_renders():
    assert render("circle", "red", "small", image_size=SIZE).shape == (3, SIZE, SIZE)
