"""LoRA training (experiment=lora): only the new branches train on a loaded base, the run resumes exactly,
and the kohya-ss file it writes is read back by the `lora` adapter to the same outputs."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from latentgen import LatentDiffusionPipeline, registry
from latentgen.config import compose
from latentgen.errors import AdapterError, ConfigError
from latentgen.training.run import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = Path(__file__).parents[1] / "data" / "image_folder"


@pytest.fixture(scope="module")
def base(tmp_path_factory, shared_dir):
    """sd-tiny's architecture with the full CLIP vocabulary, as an original Stable Diffusion single file."""
    from latentgen.interop.original_config import pipeline_config, read_original_config

    original = read_original_config(shared_dir / "golden" / "sd-tiny-config.yaml")
    original["model"]["params"]["cond_stage_config"]["params"]["text_config"]["vocab_size"] = 49408
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline.from_config(pipeline_config(original))
    with torch.no_grad():
        for parameter in pipe.denoiser.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return pipe.save(tmp_path_factory.mktemp("base") / "sd-tiny-full-vocab.safetensors", format="stable_diffusion")


def overrides(base, *extra):
    return ["experiment=lora", f"base={base}", f"dataset.path={IMAGES}", "dataset.image_size=32",
            "train.denoiser.steps=4", "train.denoiser.batch_size=2", "train.denoiser.lr=0.01",
            "train.checkpoint_every=2", "train.grid_size=2", "train.tensorboard=false", "train.log_every=1",
            "train.adapter.rank=2", "train.adapter.alpha=1", "train.adapter.text_encoder=true", "device=cpu", *extra]


def test_train_resume_and_read_back(base, tmp_path):
    before = base.read_bytes()
    whole = tmp_path / "whole"
    lora = run_training(compose("train", overrides(base)), whole)
    assert lora == whole / "checkpoints" / "lora.safetensors" and not (whole / "checkpoints" / "last.safetensors").exists()
    assert base.read_bytes() == before  # the base is only read
    tensors = safetensors.torch.load_file(str(lora))
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names  # diffusers naming
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any("resnets" in name for name in names)  # modules=attention: no LoCon convs
    ups = [value for key, value in tensors.items() if key.endswith("lora_up.weight")]
    assert all(value.abs().sum() > 0 for value in ups)  # every branch moved off its zero start
    assert float(tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 1.0

    # stopped after 3 steps and resumed: the same file, bit for bit
    split = tmp_path / "split"
    run_training(compose("train", overrides(base, "train.stop_after_steps=3")), split)
    partial = safetensors.torch.load_file(str(split / "checkpoints" / "lora.safetensors"))  # written at step 2
    assert not all(torch.equal(partial[key], tensors[key]) for key in tensors)
    run_training(compose("train", overrides(base)), split, resume=True)
    again = safetensors.torch.load_file(str(split / "checkpoints" / "lora.safetensors"))
    assert set(again) == set(tensors) and all(torch.equal(again[key], tensors[key]) for key in tensors)

    # the file read back by the lora adapter computes what the trained branches computed
    pipe = LatentDiffusionPipeline.from_checkpoint(base)
    trained = registry.build("adapter", "trainable_lora", rank=2, alpha=1, text_encoder=True)
    pipe.attach(trained)
    state = {f"{path}.{key}": value for path in trained.branches for key, value in
             trained.branches[path].state_dict().items()}
    names_of = trained._names
    trained.load_state_dict({key: tensors[f"{names_of[key.rsplit('.', 2)[0]]}.{key.rsplit('.', 2)[1]}.weight"]
                             for key in state})
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([400.0])
    ids = pipe.conditioner.tokenize(["a red square"])
    with torch.no_grad():
        context = pipe.conditioner.encode_ids(ids)
        expected = pipe.denoiser(x, t, {"crossattn": context})
    pipe.detach(trained)
    for merge in (True, False):
        loaded = pipe.attach(registry.build("adapter", "lora", path=lora, merge=merge))
        with torch.no_grad():
            context_back = pipe.conditioner.encode_ids(ids)
            out = pipe.denoiser(x, t, {"crossattn": context_back})
        assert torch.allclose(context_back, context, atol=1e-5) and torch.allclose(out, expected, atol=1e-5)
        pipe.detach(loaded)


def test_only_the_branches_train_and_bad_settings_are_refused(base, tmp_path):
    pipe = LatentDiffusionPipeline.from_checkpoint(base)
    for module in pipe.modules():
        module.requires_grad_(False)
    adapter = pipe.attach(registry.build("adapter", "trainable_lora", rank=2, modules="all"))
    trainable = [name for name, p in pipe.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.lora_down." in name or ".lora.lora_up." in name for name in trainable)
    assert any("in_layers.2.lora" in name for name in trainable)  # modules=all: LoCon on the 3x3 convs
    with torch.no_grad():  # up starts at zero: the model computes exactly what it did
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([10.0])
        with_branches = pipe.denoiser(x, t, {"crossattn": torch.randn(1, 77, 32)})
    pipe.detach(adapter)
    assert not any(name for name, _ in pipe.denoiser.named_parameters() if ".lora." in name)
    with pytest.raises(ConfigError, match="ema_decay=0.5: must be 0 when training an adapter"):
        run_training(compose("train", overrides(base, "train.denoiser.ema_decay=0.5")), tmp_path / "ema")
    with pytest.raises(ConfigError, match="base: no file"):
        run_training(compose("train", overrides(tmp_path / "missing.safetensors")), tmp_path / "missing")
    with pytest.raises(Exception, match="rank must be a positive integer"):
        run_training(compose("train", overrides(base, "train.adapter.rank=0")), tmp_path / "rank")
    assert with_branches.shape == x.shape
    with pytest.raises(AdapterError, match="nothing to save"):
        registry.build("adapter", "trainable_lora").save(tmp_path / "x.safetensors")


def test_the_train_app_checks_the_base_from_its_header_and_trains(base, tmp_path, monkeypatch):
    from latentgen.cli import train as app

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["latentgen-train", *overrides(base, "train.denoiser.steps=2", *args)])
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            try:
                app.main()
                return 0, errors.getvalue()
            except SystemExit as exc:
                return exc.code, errors.getvalue()

    status, errors = run("train.adapter.modules=everything", f"hydra.run.dir={tmp_path / 'refused'}")
    assert status == 1 and "modules='everything'" in errors
    assert not (tmp_path / "refused" / "checkpoints").exists()
    status, errors = run(f"hydra.run.dir={tmp_path / 'run'}")
    assert status in (0, None), errors
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["adapter"]["name"] == "trainable_lora" and summary["checkpoint"].endswith("lora.safetensors")
    assert (tmp_path / "run" / "samples" / "stage2_samples.png").is_file()
