"""Train the embedded demo from Python instead of the command line: compose, train, sample.

    python examples/train_in_python.py            # the smoke experiment: seconds
    python examples/train_in_python.py shapes     # the full demo: ~12 minutes on 2 CPU cores
"""

import sys
from pathlib import Path

from latentgen import LatentDiffusionPipeline
from latentgen.config import compose
from latentgen.training.run import run_training


def main() -> None:
    experiment = sys.argv[1] if len(sys.argv) > 1 else "smoke"
    cfg = compose("train", [f"experiment={experiment}"])
    checkpoint = run_training(cfg, Path("outputs") / f"python-{experiment}")
    pipe = LatentDiffusionPipeline.from_checkpoint(checkpoint)
    pipe(["a large red circle", "a small blue star"], num_images=4, seed=0)[0].save(f"outputs/python-{experiment}/first.png")
    print(f"checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
