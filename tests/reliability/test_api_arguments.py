"""Misused Python API arguments: a TypeError or ValueError naming the argument, raised before any sampling."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from latentgen.errors import InsufficientMemoryError
from latentgen.pipeline import LatentDiffusionPipeline


@pytest.fixture(scope="module")
def pipe(one_torch_thread):
    from latentgen.config import compose

    return LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))


IMAGE = torch.zeros(1, 3, 16, 16)
# (call arguments, keyword arguments, error type, what the message must name)
CASES = [
    ((5,), {}, TypeError, "prompts=5"),
    ((["a", 3],), {}, TypeError, "prompts=['a', 3]"),
    (([],), {}, ValueError, "prompts=[]"),
    ((b"a red circle",), {}, TypeError, "prompts=b'a red circle'"),
    (("a",), {"num_images": 1.5}, TypeError, "num_images=1.5"),
    (("a",), {"num_images": 0}, ValueError, "num_images=0"),
    (("a",), {"num_images": "2"}, TypeError, "num_images='2'"),
    (("a",), {"steps": 0}, ValueError, "steps=0"),
    (("a",), {"steps": 2.5}, TypeError, "steps=2.5"),
    (("a",), {"guidance_scale": float("nan")}, ValueError, "guidance_scale=nan"),
    (("a",), {"guidance_scale": float("inf")}, ValueError, "guidance_scale=inf"),
    (("a",), {"guidance_scale": "5"}, TypeError, "guidance_scale='5'"),
    (("a",), {"guidance_rescale": 1.5}, ValueError, "guidance_rescale=1.5"),
    (("a",), {"grid": "spiral"}, ValueError, "grid='spiral'"),
    (("a",), {"seed": "x"}, TypeError, "seed='x'"),
    (("a",), {"seed": 1.5}, TypeError, "seed=1.5"),
    (("a",), {"generator": 3}, TypeError, "generator=3"),
    (("a",), {"callback": "print"}, TypeError, "callback='print'"),
    (("a",), {"height": 30, "width": 32}, ValueError, "multiple of 4; got 30x32"),
    (("a",), {"height": -30, "width": 32}, ValueError, "height=-30"),
    (("a",), {"stepz": 3}, TypeError, "unknown option(s) ['stepz']"),
    (("a",), {"image": "photo.png"}, TypeError, "image='photo.png'"),
    (("a",), {"image": torch.zeros(1, 3, 16, 16, dtype=torch.uint8)}, TypeError, "image: a uint8 tensor"),
    (("a",), {"image": torch.full((1, 3, 16, 16), float("nan"))}, ValueError, "image: the tensor holds NaN"),
    (("a",), {"image": torch.full((1, 3, 16, 16), 255.0)}, ValueError, "image: values range over [255, 255]"),
    (("a",), {"image": torch.zeros(1, 4, 16, 16)}, ValueError, "an image tensor must be (B, 3, H, W)"),
    (("a",), {"image": IMAGE, "strength": 2}, ValueError, "strength must be in (0, 1]"),
    (("a",), {"image": IMAGE, "strength": True}, ValueError, "strength must be in (0, 1]"),
    (("a",), {"mask": torch.ones(1, 1, 16, 16)}, ValueError, "a mask needs the image"),
    (("a",), {"image": IMAGE, "mask": torch.full((1, 1, 16, 16), 2.0)}, ValueError, "mask: values range over"),
    (("a",), {"image": IMAGE, "mask": torch.ones(1, 1, 16, 16, dtype=torch.uint8)}, TypeError, "mask: a uint8"),
    (("a",), {"image": IMAGE, "mask": "mask.png"}, TypeError, "mask='mask.png'"),
    (("a",), {"image": [Image.new("RGB", (16, 16)), "b.png"]}, TypeError, "image='b.png'"),
    ((), {"labels": [1]}, ValueError, "a label was given to a model whose conditioner reads ['prompt']"),
    (("a",), {"conditioning": {"depth": torch.zeros(1, 1, 16, 16)}}, ValueError, "conditioning['depth']"),
    (("a",), {"output_type": "numpy"}, ValueError, "output_type must be"),
    (("a",), {"num_images": 10**7}, InsufficientMemoryError, "needs at least"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "named"), CASES,
                         ids=[f"{case[3][:40]}" for case in CASES])
def test_a_misused_argument_is_named(pipe, args, kwargs, error, named, monkeypatch):
    called = []
    monkeypatch.setattr("latentgen.pipeline.sample", lambda *a, **k: called.append("sampled"))
    with pytest.raises(error) as raised:
        pipe(*args, steps=kwargs.pop("steps", 1), **kwargs)
    assert named in str(raised.value), str(raised.value)
    assert called == []  # refused before the sampler ran


def test_from_checkpoint_takes_a_scheduler_by_name_and_refuses_anything_else(pipe, tmp_path):
    path = pipe.save(tmp_path / "smoke.safetensors")
    assert LatentDiffusionPipeline.from_checkpoint(path, scheduler="ddim").scheduler.name == "ddim"
    with pytest.raises(TypeError, match=r"scheduler=5: must be a latentgen.Scheduler or a registered scheduler name"):
        LatentDiffusionPipeline.from_checkpoint(path, scheduler=5)
    with pytest.raises(LookupError, match=r"unknown scheduler 'ddmi'. Did you mean 'ddim'\?"):
        LatentDiffusionPipeline.from_checkpoint(path, scheduler="ddmi")
    with pytest.raises(TypeError, match=r"path=3: must be a file path"):
        LatentDiffusionPipeline.from_checkpoint(3)


def test_the_memory_estimate_is_a_lower_bound_that_grows_with_the_request(pipe):
    """Refusing must never hit a request that fits: the estimate for one image stays below what sampling it
    allocates, measured as the bytes of the decoded images alone times a margin of nothing."""
    from latentgen.memory import sampling_bytes

    one = sampling_bytes(pipe.codec, pipe.denoiser, 4, 1, (8, 8), 16, 16, guided=True)
    assert sampling_bytes(pipe.codec, pipe.denoiser, 4, 10, (8, 8), 16, 16, guided=True) == 10 * one
    assert sampling_bytes(pipe.codec, pipe.denoiser, 4, 1, (16, 16), 32, 32, guided=True) > 3 * one
    assert one > 4 * 3 * 16 * 16  # at least the float image it returns
    assert len(pipe("a", num_images=2, steps=1)) == 2  # a small request is not refused
