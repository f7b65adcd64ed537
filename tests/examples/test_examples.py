"""The scripts in examples/ run as documented."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the apps, torchrun or pip in subprocesses

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(*args, cwd):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_custom_scheduler_example(tmp_path):
    assert "scheduler euler_example: 10 steps, 2 images" in run(EXAMPLES / "custom_scheduler.py", cwd=tmp_path)


def test_train_in_python_then_generate(tmp_path):
    out = run(EXAMPLES / "train_in_python.py", cwd=tmp_path)
    checkpoint = out.strip().splitlines()[-1].removeprefix("checkpoint: ")
    assert Path(tmp_path, checkpoint).is_file() and (tmp_path / "outputs" / "python-smoke" / "first.png").is_file()
    out = run(EXAMPLES / "generate.py", checkpoint, "a red circle", "a blue star", "--steps", "3", "--num-images", "2",
              "--scheduler", "ddpm", cwd=tmp_path)
    assert "4 images -> generated.png" in out and (tmp_path / "generated.png").is_file()


def test_stable_diffusion_examples(tmp_path, shared_dir):
    """txt2img, img2img and inpainting scripts on a tiny original-layout checkpoint."""
    import torch
    import yaml
    from PIL import Image

    from latentgen.interop.original_config import pipeline_config
    from latentgen.interop.stable_diffusion import save_original
    from latentgen.pipeline import LatentDiffusionPipeline

    original = yaml.safe_load((shared_dir / "golden" / "sd-tiny-config.yaml").read_text())
    original["model"]["params"]["cond_stage_config"]["params"]["text_config"]["vocab_size"] = 49408
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(original))
    torch.manual_seed(0)
    save_original(LatentDiffusionPipeline.from_config(pipeline_config(original)), tmp_path / "tiny.safetensors")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "photo.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    common = ["--config", tmp_path / "config.yaml", "--steps", "2"]
    assert "2 images -> txt2img.png" in run(EXAMPLES / "txt2img.py", tmp_path / "tiny.safetensors", "a red circle",
                                            "a cat", *common, "--negative", "blurry", cwd=tmp_path)
    assert "1 images -> img.png" in run(EXAMPLES / "txt2img.py", tmp_path / "tiny.safetensors", "a red circle", *common,
                                        "--image", tmp_path / "photo.png", "--strength", "0.5", "--out", "img.png",
                                        cwd=tmp_path)
    assert "2 images -> inpaint.png" in run(EXAMPLES / "inpaint.py", tmp_path / "tiny.safetensors", tmp_path / "photo.png",
                                            tmp_path / "mask.png", "a blue square", *common, cwd=tmp_path)
