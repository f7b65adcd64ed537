"""The latent cache on disk: written once, reused while it matches, rebuilt (saying why) when it does not."""

from __future__ import annotations

import logging

import pytest
import torch

from latentgen.config import compose
from latentgen.config.containers import to_plain
from latentgen.pipeline import build_component
from latentgen.training.latent_cache import LatentCache


@pytest.fixture
def parts():
    config = to_plain(compose("train", ["experiment=smoke", "dataset.size=8"]))
    torch.manual_seed(0)
    codec = build_component("codec", config["codec"]).eval()
    return codec, build_component("dataset", config["dataset"]), config["dataset"]


def test_cache_is_written_reused_and_rebuilt_when_its_inputs_change(tmp_path, parts, caplog):
    codec, dataset, dataset_config = parts
    path = tmp_path / "cache" / "latents.safetensors"
    keep = ("prompt", "label")
    cpu = torch.device("cpu")
    caplog.set_level(logging.INFO, logger="latentgen.train")

    first = LatentCache.load_or_encode(path, codec, dataset, dataset_config, keep, cpu)
    reference = LatentCache.encode(codec, dataset, keep, cpu)
    assert "no cache file yet" in caplog.text and path.is_file()
    assert torch.equal(first.latents, reference.latents) and first.latents.shape == (8, 4, 8, 8)

    written = path.stat().st_mtime_ns
    caplog.clear()
    again = LatentCache.load_or_encode(path, codec, dataset, dataset_config, keep, cpu)
    assert "reusing" in caplog.text and path.stat().st_mtime_ns == written
    assert torch.equal(again.latents, reference.latents)
    assert again.inputs["prompt"] == reference.inputs["prompt"] and all(isinstance(p, str) for p in again.inputs["prompt"])
    assert torch.equal(again.inputs["label"], reference.inputs["label"])
    latents, inputs = again.batch(torch.tensor([5, 2]))
    assert torch.equal(latents, reference.latents[[5, 2]])
    assert inputs["prompt"] == [reference.inputs["prompt"][i] for i in (5, 2)]

    with torch.no_grad():
        next(codec.parameters()).add_(1e-3)
    caplog.clear()
    rebuilt = LatentCache.load_or_encode(path, codec, dataset, dataset_config, keep, cpu)
    assert "different codec weights" in caplog.text and not torch.equal(rebuilt.latents, reference.latents)

    caplog.clear()
    LatentCache.load_or_encode(path, codec, dataset, {**dataset_config, "seed": 1}, keep, cpu)
    assert "different dataset config" in caplog.text
    caplog.clear()
    LatentCache.load_or_encode(path, codec, dataset, {**dataset_config, "seed": 1}, ("prompt",), cpu)
    assert "different conditioning inputs" in caplog.text


def test_cache_path_must_be_a_file(tmp_path, parts):
    codec, dataset, dataset_config = parts
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        LatentCache.load_or_encode(tmp_path, codec, dataset, dataset_config, ("prompt",), torch.device("cpu"))
