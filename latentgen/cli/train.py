"""latentgen-train: train a pipeline from Hydra config groups (`latentgen-train experiment=smoke`)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from latentgen.cli.errors import reported
from latentgen.config import register_component_options

log = logging.getLogger("latentgen.train")


@hydra.main(config_path="pkg://latentgen.conf", config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    from latentgen.training.run import run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        checkpoint = run_training(cfg, run_dir)
    log.info("checkpoint: %s", checkpoint)
    log.info("sample grids: %s", run_dir / "samples")


def main() -> None:
    register_component_options()
    _train()


if __name__ == "__main__":
    main()
