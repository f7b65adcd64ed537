"""Which run `resume=...` means, and the config a resumed run trains with.

resume=true continues the run directory given with hydra.run.dir when there is one, else the newest
run under outputs/train that holds a training state (a run keeps it until it finishes); resume=<path>
continues that run (its directory, its checkpoints/ folder or the state file itself). The run then
trains with the config it started with: the command line may change only RESUME_MAY_CHANGE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from latentgen.checkpoint import read_metadata
from latentgen.config.containers import to_plain
from latentgen.errors import ConfigError
from latentgen.training.run import RESUME_MAY_CHANGE, STATE_NAME, config_differences, state_path

DEFAULT_RUNS = Path("outputs") / "train"


def run_to_resume(value: bool | str, run_dir: str | None, runs: Path = DEFAULT_RUNS) -> Path:
    """The run directory to continue, or a ConfigError that says why there is none."""
    if isinstance(value, str):
        path = Path(value)
        if path.name == STATE_NAME:
            path = path.parent.parent
        elif path.name == "checkpoints":
            path = path.parent
        if not state_path(path).exists():
            raise ConfigError(f"resume={value}: nothing to resume there, no {state_path(path)} (a run keeps its training "
                              f"state until it finishes); pass a run directory of an unfinished run")
        if run_dir is not None and Path(run_dir).resolve() != path.resolve():
            raise ConfigError(f"resume={value} and hydra.run.dir={run_dir} name different runs; give one of them")
        return path
    if run_dir is not None:
        if not state_path(run_dir).exists():
            raise ConfigError(f"resume=true: nothing to resume in hydra.run.dir={run_dir}; it holds no "
                              f"checkpoints/{STATE_NAME} (a run keeps one until it finishes). Drop resume to start "
                              f"a new run there")
        return Path(run_dir)
    candidates = sorted(runs.glob(f"*/checkpoints/{STATE_NAME}"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
    if not candidates:
        raise ConfigError(f"resume=true: no unfinished run under {runs}/ (none holds checkpoints/{STATE_NAME}, which a "
                          f"run keeps until it finishes). Start a new run without resume, or pass resume=<run dir>")
    return candidates[-1].parent.parent


def stored_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config the run at `run_dir` started with."""
    return json.loads(read_metadata(state_path(run_dir))["latentgen.config"])


def overrides_refused(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides a resumed run cannot take (they would change what it computes)."""
    refused = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not any(key == name or key.startswith(name + ".") for name in RESUME_MAY_CHANGE):
            refused.append(override)
    return refused


def resumed_config(run_dir: Path, overrides: Sequence[str], composed: Any) -> dict[str, Any]:
    """The run's own config, with the values of the allowed overrides taken from `composed` (the
    command line's config). Other overrides are accepted only where the keys they name keep the run's
    values (e.g. the original command repeated with resume=true); keys the command line does not name keep
    the run's values."""
    from omegaconf import OmegaConf

    config = stored_config(run_dir)
    composed = composed if OmegaConf.is_config(composed) else OmegaConf.create(composed)
    refused = overrides_refused(overrides)
    if refused:
        touched = [override.split("=", 1)[0].lstrip("+~") for override in refused]
        # Only what the command line names counts: a key it does not repeat keeps the run's value (the run
        # may have been started with more overrides), and a preset (experiment=...) is the run's own choice.
        changed = [line for line in config_differences(config, to_plain(composed), RESUME_MAY_CHANGE)
                   if any(line.split(":", 1)[0] == key or line.startswith(key + ".") for key in touched)]
        if changed:
            raise ConfigError(f"resume continues '{run_dir}' with the config it started with, but the command line "
                              f"changes {changed[:5]}. Drop those overrides (only {', '.join(RESUME_MAY_CHANGE[1:])} "
                              f"may change when resuming), or start a new run")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if overrides_refused([override]):
            continue
        value = OmegaConf.select(composed, key, default=None)
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return config
