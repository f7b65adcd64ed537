"""The scripts in examples/ run as documented."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
