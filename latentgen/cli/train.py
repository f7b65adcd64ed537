"""latentgen-train: train a pipeline from Hydra config groups (`latentgen-train experiment=smoke`).

`resume=true` (or `resume=<run dir>`) continues a stopped run where it stopped; under torchrun
(`torchrun --nproc_per_node=N -m latentgen.cli.train hydra.run.dir=<dir> ...`) the processes train
one run together, data-parallel.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from latentgen.cli.errors import reported
from latentgen.config import register_component_options
from latentgen.config.containers import to_plain
from latentgen.config.settings import TrainRunSettings, app_settings
from latentgen.errors import ConfigError

log = logging.getLogger("latentgen.train")


@hydra.main(config_path="pkg://latentgen.conf", config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with reported():
        resume = requested(cfg.get("resume"))
        if not resume:  # every setting checked before torch is even imported (a resumed run: its stored config)
            app_settings(TrainRunSettings, to_plain(cfg))
        from latentgen.training.resume import resumed_config
        from latentgen.training.run import run_training

        if resume:
            cfg = resumed_config(run_dir, list(HydraConfig.get().overrides.task), cfg)
        from latentgen.threads import configure_threads

        configure_threads(cfg.get("threads"))
        checkpoint = run_training(cfg, run_dir, resume=bool(resume))
    log.info("checkpoint: %s", checkpoint)
    log.info("sample grids: %s", run_dir / "samples")


def requested(value: Any) -> bool | str:
    """False, True, or the path a `resume` value names."""
    if value is None or value is False or str(value).lower() in ("false", "null", "none", "0", ""):
        return False
    if value is True or str(value).lower() in ("true", "1", "last"):
        return True
    return str(value)


def hydra_arguments(args: list[str], environment: dict[str, str]) -> list[str]:
    """The command line plus the Hydra settings that resuming and multi-process runs need: a resumed
    run writes into its own directory and keeps its .hydra/ record; processes other than rank 0 of a
    torchrun job write nothing of Hydra's own."""
    values = dict(arg.split("=", 1) for arg in args if "=" in arg and not arg.startswith("-"))
    run_dir = values.get("hydra.run.dir")
    resume = requested(values.get("resume"))
    extra: dict[str, str] = {}
    if resume:
        from latentgen.training.resume import run_to_resume

        target = run_to_resume(resume, run_dir)
        if run_dir is None:
            extra["hydra.run.dir"] = str(target)
        extra["hydra.output_subdir"] = "null"
    if int(environment.get("WORLD_SIZE", "1")) > 1:
        if run_dir is None and not resume:
            raise ConfigError("a multi-process (torchrun) run needs hydra.run.dir=<dir>, the same for every process: "
                              "the default timestamped directory can differ between processes")
        if int(environment.get("RANK", "0")) != 0:
            extra.update({"hydra.output_subdir": "null", "hydra/job_logging": "disabled",
                          "hydra/hydra_logging": "disabled"})
    given = set(values)
    return [*args, *(f"{key}={value}" for key, value in extra.items() if key not in given)]


def accept(config: dict[str, Any], run_dir: Path, overrides: list[str]) -> None:
    """Refuse, before Hydra writes into `run_dir`, a run that could not start or finish there: any bad setting
    (a resumed run: of its stored config with the command line's changes), a component that refuses its
    parameters, a directory another process holds, a fresh start into a directory that holds a run without
    overwrite=true."""
    from latentgen.run_dir import claim

    resume = requested(config.get("resume"))
    if resume:
        from latentgen.training.resume import resumed_config

        config = resumed_config(run_dir, overrides, config)
    settings = app_settings(TrainRunSettings, config)  # before torch is imported: a bad value costs a second
    from latentgen.devices import resolve_device
    from latentgen.training.run import (
        build_parts,
        check_batches_fit,
        check_codec_crop,
        check_start,
        validated_config,
    )

    config = validated_config(config)
    dataset, pipe = build_parts(config, weights=False)  # the components check their own parameters (seconds at most)
    adapter = (config.get("train") or {}).get("adapter")
    if adapter and pipe is not None:  # it must find what to train in the base, before any weight is read
        from latentgen.assembly import build_component

        build_component("adapter", adapter).check(pipe)
    check_batches_fit(config, dataset, pipe, resolve_device(settings.device))
    check_codec_crop(config, dataset, pipe)
    claim(run_dir)
    if not resume:
        check_start(run_dir, settings.overwrite)


def main() -> None:
    from latentgen.cli.preflight import preflight, task_overrides
    from latentgen.run_dir import release_all

    register_component_options()
    try:
        with reported():
            args = hydra_arguments(sys.argv[1:], dict(os.environ))
            if int(os.environ.get("RANK", "0")) == 0:  # the other processes of a torchrun job write nothing
                args = preflight("train", args, lambda config, run_dir: accept(config, run_dir, task_overrides(args)))
            sys.argv = [sys.argv[0], *args]
        _train()
    finally:
        release_all()


if __name__ == "__main__":
    main()
