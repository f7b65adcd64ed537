"""How fast each bad setting is refused by the apps, each run as its own process (as a user runs it).

The cases are those of tests/reliability/test_app_settings.py (which checks the messages in-process); this
script times `latentgen-train`, `latentgen-sample` and `latentgen-eval` from start to exit and prints a table.

    python benchmarks/bad_settings.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cases() -> list[tuple[str, list[str], str]]:
    tests = REPO / "tests" / "reliability"
    sys.path.insert(0, str(tests))  # the cases' module imports its conftest helpers
    spec = importlib.util.spec_from_file_location("bad_settings_cases", tests / "test_app_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CASES


def main() -> None:
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).save(
            Path(tmp) / "smoke.safetensors")
        given = {"train": ["experiment=smoke"], "sample": [f"checkpoint={checkpoint}", "prompt=a red circle"],
                 "eval": [f"checkpoint={checkpoint}"]}
        bin_dir = Path(sys.executable).parent
        print(f"{'app':<7} {'setting':<38} {'seconds':>7}  exit  first line of stderr")
        for number, (app, args, _) in enumerate(cases()):
            base = [arg for arg in given[app] if not any(arg.split("=")[0] == other.split("=")[0] for other in args)]
            command = [str(bin_dir / f"latentgen-{app}"), *base, *args, f"hydra.run.dir={tmp}/run{number}"]
            began = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            seconds = time.perf_counter() - began
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            print(f"{app:<7} {' '.join(args):<38} {seconds:>7.2f}  {result.returncode:>4}  {lines[0] if lines else ''}"
                  + (f"  (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""))


if __name__ == "__main__":
    main()
