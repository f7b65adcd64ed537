"""latentgen-sample with adapters: lora= and controlnet= (with conditioning.control=<file>) change the images,
adapters=[...] takes any registered adapter with options, and sample.json records what was attached."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from latentgen import LatentDiffusionPipeline
from latentgen.adapters.controlnet_model import ControlNetModel
from latentgen.adapters.module_names import lora_targets
from latentgen.config import compose


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The smoke model, a LoRA on all its UNet Linears and a ControlNet for its UNet (random weights)."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"]))
    with torch.no_grad():
        for parameter in pipe.denoiser.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    checkpoint = pipe.save(root / "smoke.safetensors")
    lora = {}
    for name, target in lora_targets(pipe).items():
        if name.startswith("lora_unet_") and isinstance(target.module, torch.nn.Linear):
            out, width = target.shape()
            lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = torch.randn(2, width), torch.randn(out, 2)
    safetensors.torch.save_file(lora, str(root / "style.safetensors"))
    net = ControlNetModel(pipe.denoiser.build_params)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.1)
    safetensors.torch.save_file({f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()},
                                str(root / "control.safetensors"))
    latent_h, latent_w = pipe.latent_size(pipe.sampling["height"], pipe.sampling["width"])
    edges = np.zeros((8 * latent_h, 8 * latent_w, 3), np.uint8)  # a ControlNet reads maps at 8x the latent grid
    edges[8:40, 8:40] = 255
    Image.fromarray(edges).save(root / "edges.png")
    return root, checkpoint


def sample(args, run_dir):
    from latentgen.cli import sample as app

    argv, sys.argv = sys.argv, ["latentgen-sample", *args, f"hydra.run.dir={run_dir}", "num_images=1", "progress=false"]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            app.main()
    except SystemExit as exc:
        assert exc.code in (0, None), errors.getvalue()
    finally:
        sys.argv = argv
    record = json.loads((run_dir / "sample.json").read_text())
    return record, np.asarray(Image.open(record["images"][0]), dtype=np.float32)


@pytest.mark.slow
def test_sample_with_lora_controlnet_and_adapters_list(files, tmp_path):
    root, checkpoint = files
    base = [f"checkpoint={checkpoint}", "prompt=a red circle"]
    plain, plain_image = sample(base, tmp_path / "plain")
    assert "adapters" not in plain
    styled, styled_image = sample([*base, f"lora={root}/style.safetensors", "lora_scale=0.7"], tmp_path / "lora")
    assert styled["adapters"] == [{"name": "lora", "path": f"{root}/style.safetensors", "scale": 0.7,
                                   "text_scale": None, "merge": True}]
    assert np.abs(styled_image - plain_image).mean() > 0.5
    made_by = json.loads(Image.open(styled["images"][0]).text["latentgen"])  # the PNG carries its record
    assert made_by["adapters"] == styled["adapters"] and made_by["caption"] == "a red circle"
    controlled, controlled_image = sample([*base, f"controlnet={root}/control.safetensors",
                                           f"conditioning.control={root}/edges.png"], tmp_path / "control")
    assert controlled["adapters"][0]["name"] == "controlnet"
    assert np.abs(controlled_image - plain_image).mean() > 0.5
    listed, listed_image = sample([*base, f"adapters=[{{name: lora, path: {root}/style.safetensors, scale: 0.7}}]"],
                                  tmp_path / "listed")
    assert listed["adapters"] == styled["adapters"] and np.array_equal(listed_image, styled_image)
