"""The shapes judge (trained once, cached, refused when weak), adherence and Fréchet distance on
real renders, the evaluation of label-conditioned and digits checkpoints, and latentgen-eval end to
end on a smoke-trained checkpoint, with its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentgen.config import compose
from latentgen.config.containers import to_plain
from latentgen.datasets.shapes import COLOURS, position_range, render
from latentgen.errors import ConfigError
from latentgen.evaluation import judge_cache
from latentgen.evaluation.adherence import score_adherence, shapes_requests
from latentgen.evaluation.evaluate import EvalSettings, choose_metrics, evaluate_checkpoint
from latentgen.evaluation.frechet import frechet_distance_of_features
from latentgen.evaluation.judge_cache import UntrustworthyJudgeError, shapes_judge
from latentgen.evaluation.shapes_judge import JudgeRecipe
from latentgen.pipeline import LatentDiffusionPipeline

pytest.importorskip("skimage")
BIN = Path(sys.executable).parent
SIZE = 16  # the smoke experiment's image size


@pytest.fixture(scope="module")
def judge(cache):
    return shapes_judge(SIZE, cache_dir=cache)


def _renders(requests, colour_shift: int = 0, seed: int = 0) -> torch.Tensor:
    """Real renders of what each request asks for (colour shifted by `colour_shift`), at random positions."""
    rng = np.random.default_rng(seed)
    images = []
    for request in requests:
        low, high = position_range(request["size"], SIZE)
        images.append(render(request["shape"], (request["colour"] + colour_shift) % len(COLOURS), request["size"],
                             tuple(rng.uniform(low, high, 2)), SIZE, rng))
    return torch.stack(images)


def test_the_judge_is_trained_once_then_loaded_from_the_cache(judge, cache, monkeypatch):
    model, info = judge
    assert not info["cached"] and Path(info["path"]).parent == cache / "judges"
    assert min(info["held_out_accuracy"][k] for k in ("shape", "colour", "size")) >= 0.98
    assert [p.name for p in (cache / "judges").iterdir()] == [Path(info["path"]).name]  # no temporary files left

    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge was retrained")

    monkeypatch.setattr(judge_cache, "train_shapes_judge", no_training)
    again, again_info = shapes_judge(SIZE, cache_dir=cache)
    assert again_info["cached"] and again_info["held_out_accuracy"] == info["held_out_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    monkeypatch.setenv(judge_cache.CACHE_ENV, str(cache))  # the environment variable finds the same cache
    assert shapes_judge(SIZE)[1]["path"] == info["path"]
    # Whatever determines the weights keys the cache.
    assert judge_cache.judge_key(SIZE, JudgeRecipe(steps=301)) != judge_cache.judge_key(SIZE, JudgeRecipe())
    assert judge_cache.judge_key(SIZE, JudgeRecipe(background="plain")) != judge_cache.judge_key(SIZE, JudgeRecipe())


def test_a_weak_judge_is_refused(tmp_path):
    with pytest.raises(UntrustworthyJudgeError, match=r"only .*% of held-out renders \(needs at least 98%\)"):
        shapes_judge(SIZE, JudgeRecipe(train_images=64, steps=2, held_out_images=200), cache_dir=tmp_path)


def test_adherence_of_real_renders_is_full_and_of_wrong_colours_none(judge):
    model, _ = judge
    requests = shapes_requests(216)
    shapes, colours, sizes = ([r[k] for r in requests] for k in ("shape", "colour", "size"))
    right = score_adherence(model, _renders(requests), shapes, colours, sizes)
    assert right["joint_accuracy"] >= 0.98 and right["size_accuracy"] >= 0.95 and right["num_samples"] == 216
    assert len(right["joint_accuracy_per_shape"]) == 6 and len(right["joint_accuracy_per_colour"]) == 6
    assert right["judged"][:2] == ["red circle", "green square"]  # requests 0 and 1, read back
    wrong = score_adherence(model, _renders(requests, colour_shift=1), shapes, colours)
    assert wrong["colour_accuracy"] <= 0.02 and wrong["joint_accuracy"] <= 0.02 and wrong["shape_accuracy"] >= 0.98
    assert "size_accuracy" not in wrong and sum(wrong["most_frequent_mistakes"].values()) > 0


def test_frechet_distance_in_judge_features_separates_real_from_wrong(judge):
    model, _ = judge
    requests = shapes_requests(216)
    real_a, real_b = model.embed(_renders(requests, seed=1)), model.embed(_renders(requests, seed=2))
    circles = model.embed(_renders([{**r, "shape": 0} for r in requests], seed=3))  # every shape drawn as a circle
    blurred = model.embed(torch.nn.functional.avg_pool2d(_renders(requests, seed=3), 3, stride=1, padding=1,
                                                          count_include_pad=False))
    floor = frechet_distance_of_features(real_a, real_b)
    assert frechet_distance_of_features(real_a, circles) > 5 * floor
    assert frechet_distance_of_features(real_a, blurred) > 1.5 * floor
    assert frechet_distance_of_features(real_a, real_a) == pytest.approx(0.0, abs=1e-6)


def _untrained_checkpoint(tmp_path: Path, overrides: list[str]) -> tuple[Path, dict]:
    cfg = compose("train", ["experiment=smoke", *overrides])
    pipe = LatentDiffusionPipeline.from_config(cfg)
    return pipe.save(tmp_path / "model.safetensors"), to_plain(cfg.dataset)


def test_label_conditioned_shapes_and_digits_checkpoints(judge, cache, tmp_path):
    checkpoint, dataset = _untrained_checkpoint(tmp_path, ["conditioner=class_label"])
    settings = EvalSettings(metrics=["adherence", "fd"], num_samples=6, steps=1, dataset=dataset, cache_dir=str(cache))
    results = evaluate_checkpoint(checkpoint, settings)
    adherence = results["metrics"]["adherence"]
    assert results["conditioning"] == ["label"] and "size_accuracy" not in adherence  # a label names no size
    assert 0 <= adherence["joint_accuracy"] <= 1 and results["metrics"]["fd"]["fd"] > 0 and results["judge"]["cached"]

    checkpoint, dataset = _untrained_checkpoint(tmp_path, ["conditioner=class_label", "conditioner.num_classes=10",
                                                           "dataset=digits", "dataset.image_size=16"])
    results = evaluate_checkpoint(checkpoint, EvalSettings(metrics=["digits_accuracy"], num_samples=10, steps=1,
                                                           dataset=dataset))
    digits = results["metrics"]["digits_accuracy"]
    assert digits["num_samples"] == 10 and len(digits["accuracy_per_class"]) == 10
    assert digits["classifier"]["held_out_accuracy"] > 0.97 and set(results["metrics"]) == {"digits_accuracy"}
    with pytest.raises(ConfigError, match="metric 'adherence' does not apply to a digits checkpoint"):
        evaluate_checkpoint(checkpoint, EvalSettings(metrics=["adherence"], dataset=dataset))
    with pytest.raises(ConfigError, match="cannot tell which dataset .* name it, e.g. dataset=shapes"):
        evaluate_checkpoint(checkpoint)  # saved outside a training run: no dataset to read


def test_metric_choice():
    assert choose_metrics("shapes", None, "x") == ["adherence", "fd", "codec"]
    assert choose_metrics("digits", "codec", "x") == ["codec"]
    with pytest.raises(ConfigError, match="unknown metric 'sharpness'; the metrics are: adherence, fd"):
        choose_metrics("shapes", ["sharpness"], "x")
    with pytest.raises(ConfigError, match="metrics for the datasets shapes, digits; .* 'faces'"):
        choose_metrics("faces", None, "x")


# ---- latentgen-eval end to end ----------------------------------------------------------------------

def run(*args, cwd):
    return subprocess.run([str(BIN / "latentgen-eval"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    # An untrained codec and one denoiser step: the checkpoint's quality does not matter here, its layout does.
    result = subprocess.run([str(BIN / "latentgen-train"), "experiment=smoke", "train.codec.steps=0",
                             "train.denoiser.steps=1", f"hydra.run.dir={run_dir}"],
                            cwd=run_dir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.safetensors"


@pytest.mark.slow
def test_eval_writes_a_table_and_eval_json(trained, judge, cache, tmp_path):
    result = run(f"checkpoint={trained}", "num_samples=6", f"cache_dir={cache}", "codec_fidelity.images=8",
                 "codec_fidelity.natural_size=16", f"out={tmp_path / 'copy.json'}", f"hydra.run.dir={tmp_path}",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "copy.json").read_text() == (tmp_path / "eval.json").read_text()
    assert set(results["metrics"]) == {"adherence", "fd", "codec"} and results["judge"]["cached"]
    assert results["dataset"]["image_size"] == SIZE and results["dataset_source"].endswith(".hydra/config.yaml")
    assert results["sampling"]["num_samples"] == 6 and results["sampling"]["steps"] == 3  # smoke's default
    assert "| shape-and-colour adherence" in result.stdout and "| codec PSNR / SSIM" in result.stdout
    assert Image.open(tmp_path / "samples.png").size[0] > 6 * SIZE and results["sampling"]["grid"].endswith("samples.png")


@pytest.mark.slow
def test_eval_attaches_adapters_and_records_them(trained, judge, cache):
    from latentgen.adapters.deep_cache import DeepCache

    calls = {"unet": 0, "deep": 0}

    class Counted(DeepCache):  # counts the UNet's calls and those that ran its deep path (middle block)
        def apply(self, pipeline):
            super().apply(pipeline)
            pipeline.denoiser.register_forward_hook(lambda *_: calls.update(unet=calls["unet"] + 1))
            pipeline.denoiser.middle_block.register_forward_hook(lambda *_: calls.update(deep=calls["deep"] + 1))

    settings = dict(metrics=["adherence"], num_samples=6, cache_dir=str(cache))
    exact = evaluate_checkpoint(trained, EvalSettings(**settings))
    accelerated = evaluate_checkpoint(trained, EvalSettings(**settings, adapters=[Counted(interval=2, depth=1)]))
    # An unregistered subclass describes itself by its class name.
    assert "adapters" not in exact and accelerated["adapters"] == [{"name": "Counted", "interval": 2, "depth": 1}]
    assert calls["unet"] == 3 and calls["deep"] == 2  # attached while sampling: smoke's 3 steps, the middle one reused


@pytest.mark.parametrize("args, message", [
    (["checkpoint=/nonexistent/last.safetensors"], "checkpoint '/nonexistent/last.safetensors' does not exist"),
    (["metrics=[digits_accuracy]"], "metric 'digits_accuracy' does not apply to a shapes checkpoint"),
])
@pytest.mark.slow
def test_eval_errors_are_one_line(trained, tmp_path, args, message):
    if not args[0].startswith("checkpoint="):
        args = [f"checkpoint={trained}", *args]
    result = run(*args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1 and f"error: {message}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("two_objects", [0.0, 0.5])
@pytest.mark.parametrize("background", ["plain", "textured"])
def test_the_real_images_follow_the_checkpoints_background(background, two_objects):
    """FD and the codec metrics compare against renders on the background the checkpoint was trained on
    (experiment=shapes_composed trains on plain gray): every corner pixel is the plain gray, or not."""
    from latentgen.datasets.shapes import PLAIN_GRAY
    from latentgen.evaluation.evaluate import _held_out_images

    dataset = {"image_size": 32, "seed": 0, "background": background, "two_objects": two_objects}
    images = _held_out_images("shapes", dataset, 8)
    plain = torch.tensor(PLAIN_GRAY / 127.5 - 1.0)
    corners_plain = torch.isclose(images[:, :, 0, 0], plain, atol=1e-6).all(dim=1)
    assert bool(corners_plain.all()) == (background == "plain")  # a textured corner can hit that gray by chance
