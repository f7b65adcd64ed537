"""The adapter contract on the pipeline: a third party's adapter written to it, order, exact detach from the
middle of the stack, a failing apply undone, and misuse refused."""

from __future__ import annotations

import pytest
import torch

import latentgen
from latentgen import LatentDiffusionPipeline, registry
from latentgen.errors import AdapterError


def small_pipeline():
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config({
        "codec": {"name": "identity"}, "conditioner": {"name": "null"},
        "denoiser": {"name": "unet", "in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1],
                     "num_res_blocks": 1, "attention_resolutions": [], "num_head_channels": 16}})
    with torch.no_grad():
        pipe.denoiser.out[2].weight.normal_(0, 0.1)
    return pipe


class ScaleOutput(latentgen.Adapter):
    """Multiplies the UNet's last conv in place, in the way a third party would write an adapter: only apply
    and remove, undoing exactly what apply did."""

    def __init__(self, factor: float, fail_after: bool = False):
        self.factor, self.fail_after, self.log = factor, fail_after, []
        self._saved = None

    def apply(self, pipeline):
        weight = pipeline.denoiser.out[2].weight
        self._saved = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(self.factor)
        self.log.append("apply")
        if self.fail_after:
            raise RuntimeError("broken adapter")

    def remove(self, pipeline):
        if self._saved is not None:
            with torch.no_grad():
                pipeline.denoiser.out[2].weight.copy_(self._saved)
            self._saved = None
        self.log.append("remove")


def output(pipe):
    with torch.no_grad():
        return pipe.denoiser(torch.ones(1, 3, 8, 8), torch.tensor([10.0]), {})


def test_the_builtin_adapters_are_registered():
    assert {"lora", "controlnet", "embedding"} <= set(registry.available("adapter"))
    assert registry.base_class("adapter") is latentgen.Adapter


def test_order_is_kept_and_detaching_the_middle_one_is_exact():
    pipe = small_pipeline()
    base = output(pipe)
    first, second, third = ScaleOutput(2.0), ScaleOutput(3.0), ScaleOutput(0.5)
    for adapter in (first, second, third):
        pipe.attach(adapter)
    assert pipe.adapters == [first, second, third]
    assert not torch.allclose(output(pipe), base)
    pipe.detach(second)
    assert pipe.adapters == [first, third]
    assert third.log == ["apply", "remove", "apply"] and second.log == ["apply", "remove"]
    only = small_pipeline()
    only.attach(ScaleOutput(2.0))
    only.attach(ScaleOutput(0.5))
    assert torch.equal(output(pipe), output(only))  # as if `second` had never been attached
    pipe.detach(first)
    pipe.detach(third)
    assert torch.equal(output(pipe), base)


def test_a_failing_apply_is_undone_and_nothing_is_attached():
    pipe = small_pipeline()
    base = output(pipe)
    broken = ScaleOutput(5.0, fail_after=True)
    with pytest.raises(RuntimeError, match="broken adapter"):
        pipe.attach(broken)
    assert pipe.adapters == [] and broken.log == ["apply", "remove"]
    assert torch.equal(output(pipe), base)


def test_misuse_is_refused():
    pipe, other = small_pipeline(), small_pipeline()
    adapter = pipe.attach(ScaleOutput(2.0))
    with pytest.raises(TypeError, match="attach\\(\\) takes a latentgen.Adapter"):
        pipe.attach(torch.nn.Linear(2, 2))
    with pytest.raises(AdapterError, match="already attached"):
        pipe.attach(adapter)
    with pytest.raises(AdapterError, match="attached to another pipeline"):
        other.attach(adapter)
    with pytest.raises(AdapterError, match="is not attached to this pipeline"):
        other.detach(adapter)
    with pytest.raises(TypeError, match="implements neither|abstract"):
        type("Half", (latentgen.Adapter,), {"apply": lambda self, pipe: None})()
