"""The shapes dataset's composition options: HELD_OUT combinations kept out of the train split, and two-object
scenes whose objects sit, apart, in the halves their caption names; captions that parse back; refused values."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from latentgen.datasets import shapes
from latentgen.datasets.shapes import (
    COLOURS,
    HELD_OUT,
    RELATIONS,
    SCENE_TEMPLATES,
    SHAPES,
    SIZES,
    ShapesDataset,
    is_held_out,
    parse_scene,
    relation_axis,
    relation_halves,
    render_scene,
    scene_caption,
    scene_radius,
)
from latentgen.errors import ConfigError

COLOUR_NAMES = list(COLOURS)
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1  # (C, 3)
HELD = {(SHAPES.index(s), COLOUR_NAMES.index(c), SIZES.index(z)) for s, c, z in HELD_OUT}


def _chroma(image: torch.Tensor) -> torch.Tensor:
    return image.max(dim=0).values - image.min(dim=0).values  # (H, W)


def _halves(image: torch.Tensor, relation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right, or top and bottom, halves of (3, S, S)."""
    half = image.shape[-1] // 2
    if relation_axis(relation) == 0:
        return image[..., :half], image[..., half:]
    return image[:, :half], image[:, half:]


def test_held_out_is_a_latin_square_choice():
    assert len(HELD_OUT) == len(HELD) == 12
    assert Counter(s for s, _, _ in HELD_OUT) == {shape: 2 for shape in SHAPES}
    assert Counter(c for _, c, _ in HELD_OUT) == {colour: 2 for colour in COLOURS}
    assert Counter(z for _, _, z in HELD_OUT) == {size: 4 for size in SIZES}
    # Each held-out (shape, colour) pair is held out at one size only: it is still seen at the other two.
    assert len({(s, c) for s, c, _ in HELD_OUT}) == 12
    assert is_held_out("circle", "green", "small") and not is_held_out(0, 1, 1)


@pytest.fixture(scope="module")
def held_out_train():
    return ShapesDataset(image_size=32, size=3000, held_out=True, two_objects=0.5)


def test_the_train_split_never_shows_a_held_out_combination(held_out_train):
    objects = [obj for i in range(len(held_out_train)) for obj in held_out_train.scene(i).objects]
    assert len(objects) > 4000  # single objects and both objects of every scene
    assert not HELD & set(objects)
    # Every shape, colour and size is still common in training, and every other combination occurs.
    for column, names in enumerate((SHAPES, COLOURS, SIZES)):
        counts = Counter(obj[column] for obj in objects)
        assert len(counts) == len(names) and min(counts.values()) > 0.5 * len(objects) / len(names)
    assert len(set(objects)) == 108 - 12
    single = ShapesDataset(size=2000, held_out=True)  # single objects only
    assert not HELD & {(item["shape"], item["colour"], item["size"]) for item in (single[i] for i in range(2000))}


def test_the_test_split_shows_every_combination():
    test = ShapesDataset(size=2000, split="test", held_out=True)
    seen = Counter((item["shape"], item["colour"], item["size"]) for item in (test[i] for i in range(2000)))
    assert HELD <= set(seen) and sum(seen[triple] for triple in HELD) > 100
    scenes = ShapesDataset(size=1000, split="test", held_out=True, two_objects=1.0)
    assert HELD <= {obj for i in range(1000) for obj in scenes.scene(i).objects}


def test_options_off_leave_items_as_they_were():
    plain, explicit = ShapesDataset(size=40, seed=2), ShapesDataset(size=40, seed=2, held_out=False, two_objects=0.0)
    for i in range(40):
        assert plain[i].keys() == explicit[i].keys() == {"image", "prompt", "label", "shape", "colour", "size"}
        assert torch.equal(plain[i]["image"], explicit[i]["image"]) and plain[i]["prompt"] == explicit[i]["prompt"]
    # A composed dataset's single-object items are the plain dataset's, and non-held-out train items are kept.
    mixed, held = ShapesDataset(size=40, seed=2, two_objects=0.5), ShapesDataset(size=40, seed=2, held_out=True)
    singles = [i for i in range(40) if mixed[i]["num_objects"] == 1]
    assert 5 < len(singles) < 35
    assert all(torch.equal(mixed[i]["image"], plain[i]["image"]) for i in singles)
    kept = [i for i in range(40) if (plain[i]["shape"], plain[i]["colour"], plain[i]["size"]) not in HELD]
    assert all(torch.equal(held[i]["image"], plain[i]["image"]) for i in kept)


def test_scenes_are_a_pure_function_of_seed_split_and_index(monkeypatch):
    a = ShapesDataset(size=24, seed=5, two_objects=0.5, held_out=True)
    longer = ShapesDataset(size=60, seed=5, two_objects=0.5, held_out=True)
    monkeypatch.setattr(shapes, "_PRERENDER_BYTES", 0)
    lazy = ShapesDataset(size=24, seed=5, two_objects=0.5, held_out=True)
    assert lazy._images is None
    for i in range(24):
        assert torch.equal(a[i]["image"], longer[i]["image"]) and torch.equal(a[i]["image"], lazy[i]["image"])
        assert a[i]["prompt"] == lazy[i]["prompt"] and torch.equal(a[i]["objects"], lazy[i]["objects"])
    other = ShapesDataset(size=24, seed=5, two_objects=0.5, held_out=True, split="test")
    assert sum(torch.equal(a[i]["image"], other[i]["image"]) for i in range(24)) == 0
    batch = default_collate([a[i] for i in range(8)])  # single objects and scenes batch together
    assert batch["objects"].shape == (8, 2, 3) and batch["centres"].shape == (8, 2, 2)


@pytest.mark.parametrize("flip", [False, True])
def test_scene_objects_lie_apart_in_the_halves_the_caption_names(flip):
    ds = ShapesDataset(image_size=32, size=300, two_objects=1.0, flip=flip, seed=1)
    relations, mirrored = Counter(), 0
    for i in range(len(ds)):
        item = ds[i]
        image, relation, objects = item["image"], item["relation"], item["objects"].tolist()
        relations[RELATIONS[relation]] += 1
        mirrored += item["prompt"] != ds.scene(i).caption()
        assert item["num_objects"] == 2 and item["shape"] == objects[0][0] and item["size"] == objects[0][2]
        assert objects[0][0] != objects[1][0] and objects[0][1] != objects[1][1]  # other shape, other colour
        # The record: each bounding box inside the half the relation gives its object.
        axis = relation_axis(relation)
        for (_, _, size), centre, half in zip(objects, item["centres"].tolist(), relation_halves(relation)):
            reach = scene_radius(size, 32) / 32
            assert half * 0.5 <= centre[axis] - reach and centre[axis] + reach <= half * 0.5 + 0.5
            assert 0 <= centre[1 - axis] - reach and centre[1 - axis] + reach <= 1
        # The pixels: nothing coloured on the two lines along the cut (so the objects do not touch) ...
        lines = image[..., 15:17] if axis == 0 else image[:, 15:17]
        assert _chroma(lines).max() < 1e-6, item["prompt"]
        # ... and each half shows the colour of the object the caption puts there.
        in_half = {half: obj for obj, half in zip(objects, relation_halves(relation))}
        for half, pixels in enumerate(_halves(image, relation)):
            mask = _chroma(pixels) > 0.4
            assert mask.sum() >= 6, item["prompt"]
            mean_rgb = pixels[:, mask].mean(dim=1)
            assert torch.cdist(mean_rgb[None], PALETTE).argmin().item() == in_half[half][1], item["prompt"]
        # The caption says what the record holds.
        parsed = parse_scene(item["prompt"])
        assert parsed == {"objects": [tuple(obj) for obj in objects], "relation": RELATIONS[relation]}, item["prompt"]
    assert set(relations) == set(RELATIONS) and min(relations.values()) > 30
    assert (mirrored > 50) == flip  # a mirrored scene has its caption rewritten


def test_scene_sizes_stay_apart():
    counts: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for size in range(3):
        for shape in range(len(SHAPES)):
            image = render_scene([(shape, 0, size), ((shape + 1) % 6, 1, size)], "left of", image_size=32)
            counts[size].append(int((_chroma(image[..., :16]) > 0.4).sum()))
    assert max(counts[0]) < min(counts[2]) and np.mean(counts[0]) * 1.5 < np.mean(counts[1])
    assert np.mean(counts[1]) * 1.5 < np.mean(counts[2])


def test_captions_parse_back():
    for relation in RELATIONS:
        for template in range(len(SCENE_TEMPLATES)):
            objects = [(1, 2, 0), (4, 5, 2)]
            prompt = scene_caption(objects, relation, template)
            assert parse_scene(prompt) == {"objects": objects, "relation": relation}, prompt
            assert ShapesDataset.parse_prompt(prompt) is None  # two shapes: not a single-object prompt
    assert scene_caption([("circle", "red", "small"), ("star", "blue", "large")], "left of") == \
        "a small red circle left of a large blue star"
    assert scene_caption([(0, 0, 0), (3, 2, 2)], "and") == "a small red circle and a large blue star"
    assert parse_scene("A green square left of a yellow triangle.") == \
        {"objects": [(1, 1, None), (2, 3, None)], "relation": "left of"}
    assert parse_scene("a large red circle") == {"objects": [(0, 0, 2)], "relation": None}
    for prompt in ("a red circle above and left of a blue star", "a red circle left of a star", "a photo of a cat",
                   "a small large red circle"):
        assert parse_scene(prompt) is None, prompt


def test_render_scene_refuses_impossible_scenes():
    with pytest.raises(ConfigError, match="would leave its half"):
        render_scene([(0, 0, 2), (1, 1, 2)], "left of", positions=[(0.7, 0.5), (0.25, 0.5)])
    with pytest.raises(ConfigError, match="relation 'between'.*left of, right of, above, below, and"):
        render_scene([(0, 0, 0), (1, 1, 0)], "between")
    with pytest.raises(ConfigError, match="two objects"):
        render_scene([(0, 0, 0)], "and")


@pytest.mark.parametrize("draw", [lambda: shapes.render("circle", "red", "large", background="wallpaper"),
                                  lambda: render_scene([(0, 0, 0), (1, 1, 0)], "and", background="wallpaper")])
def test_the_renderers_refuse_an_unknown_background(draw):
    with pytest.raises(ConfigError, match="shapes: unknown background 'wallpaper'; choose one of plain, textured"):
        draw()


@pytest.mark.parametrize("params, match", [
    ({"two_objects": 1.5}, r"two_objects is the fraction of two-object items, a number in \[0, 1\].*got 1.5"),
    ({"two_objects": -0.1}, r"two_objects .* in \[0, 1\]"),
    ({"two_objects": float("nan")}, r"two_objects .* in \[0, 1\]"),
    ({"two_objects": "half"}, r"two_objects .* in \[0, 1\] \(e.g. 0.5"),
    ({"two_objects": True}, r"two_objects .* in \[0, 1\]"),
    ({"held_out": "yes"}, r"held_out must be true or false \(true keeps the 12 HELD_OUT combinations"),
    ({"held_out": 1}, r"held_out must be true or false"),
    ({"two_objects": 0.5, "image_size": 16}, r"two-object scenes need image_size of at least 32"),
    ({"two_objects": 0.5, "relations": ["left of", "between"]}, r"relations must be a non-empty list of distinct "
                                                               r"relation names from 'left of', 'right of'"),
    ({"two_objects": 0.5, "relations": []}, r"relations must be a non-empty list"),
    ({"two_objects": 0.5, "relations": "left of"}, r"relations must be a non-empty list"),
    ({"two_objects": 0.5, "relations": ["and", "and"]}, r"relations must be a non-empty list of distinct"),
    ({"two_objects": 0.5, "relations": ["left of", "and"], "flip": True},
     r"flip mirrors a scene's caption .* no mirror of 'left of': add 'right of' or set flip=false"),
])
def test_bad_composition_options(params, match):
    with pytest.raises(ConfigError, match=f"ShapesDataset: {match}"):
        ShapesDataset(**params)


def test_scenes_draw_only_the_relations_asked_for():
    ds = ShapesDataset(size=200, seed=3, two_objects=1.0, relations=["and", "left of"])
    drawn = Counter(RELATIONS[ds[i]["relation"]] for i in range(len(ds)))
    assert set(drawn) == {"left of", "and"} and min(drawn.values()) > 70
    assert ds.relations == ("left of", "and") and "relations=['left of', 'and']" in repr(ds)
    for i in range(20):  # the caption says the relation the record holds, the pixels where each object is
        item = ds[i]
        assert parse_scene(item["prompt"])["relation"] == RELATIONS[item["relation"]]
        first_half = relation_halves(item["relation"])[0]
        pixels = _halves(item["image"], item["relation"])[first_half]
        mean_rgb = pixels[:, _chroma(pixels) > 0.4].mean(dim=1)
        assert torch.cdist(mean_rgb[None], PALETTE).argmin().item() == item["objects"][0][1], item["prompt"]
    # all five, named or left out, draw the same scenes
    every = ShapesDataset(size=20, seed=3, two_objects=1.0, relations=list(reversed(RELATIONS)))
    default = ShapesDataset(size=20, seed=3, two_objects=1.0)
    assert all(every[i]["prompt"] == default[i]["prompt"] for i in range(20)) and "relations" not in repr(default)
    mirrored = ShapesDataset(size=50, seed=3, two_objects=1.0, relations=["left of", "right of"], flip=True)
    assert {RELATIONS[mirrored[i]["relation"]] for i in range(50)} == {"left of", "right of"}
