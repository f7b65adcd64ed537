"""Everything an app checks before Hydra writes into its run directory (`.hydra/`, the log file).

Hydra creates the run directory and records the job in it before the app's function runs, so an app that
refused a start only there would already have changed an existing run. Each app's `main()` therefore
composes its config as Hydra will, checks every setting and claims the run directory
(`latentgen.run_dir`), and only then hands the command line to Hydra, with the run directory it checked
pinned (its default name holds the time, which moves on). With a Hydra flag (a sweep's `-m`, `--help`,
`--cfg`, `--config-dir`) the app leaves this to the job itself, which runs the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from latentgen.config.containers import to_plain
from latentgen.errors import ConfigError


def overrides(args: Sequence[str]) -> list[str]:
    """The Hydra overrides of a command line (not its flags)."""
    return [arg for arg in args if not arg.startswith("-")]


def task_overrides(args: Sequence[str]) -> list[str]:
    """The overrides of the app's own config (not Hydra's `hydra.*` / `hydra/...`)."""
    return [arg for arg in overrides(args) if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]


def composed(app: str, args: Sequence[str]) -> Any | None:
    """The app's config (with Hydra's own node) as the job will see it; Hydra's reason, in one line, when it
    cannot compose it (an unknown option of a group, an override of a key that does not exist)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from latentgen.config.options import CONFIG_MODULE

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=app, overrides=overrides(args), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # ValueError: Hydra's for `group=null`
        text = " ".join(str(exc).split()).split(" Config search path:")[0]  # Hydra's message, in one line
        if "Could not find" in text:
            text += "; `latentgen plugins` lists every installed component"
        elif "Config group override must be a string or a list" in text:
            text = _null_group_message(app, args) or text
        raise ConfigError(text) from None


def _null_group_message(app: str, args: Sequence[str]) -> str | None:
    """Hydra's bare "Got NoneType" for `group=null` said as what it is and how to say it instead."""
    from latentgen.config.options import group_options

    for arg in overrides(args):
        key, _, value = arg.partition("=")
        group = key.lstrip("+~")
        options = group_options(group, app) if value.strip().lower() == "null" else []
        if options:
            return (f"{arg}: the config group '{group}' takes the name of one of its options, not null: "
                    f"{', '.join(options)}; or leave the override out to keep the default, or drop the group "
                    f"with ~{group}")
    return None


def preflight(app: str, args: Sequence[str], check: Callable[[dict[str, Any], Path], None]) -> list[str]:
    """`check(config, run_dir)` on the config the job will get (plain, without Hydra's node), raising a
    LatentgenError to refuse; the command line to give Hydra."""
    if any(arg.startswith("-") for arg in args):
        # Hydra's flags: -m makes a new directory per job (checked in the job), --help/--cfg/--info run no job,
        # and --config-dir/--config-name compose what this composition would not see. The job's own checks stay.
        return list(args)
    config = composed(app, args)
    from omegaconf import OmegaConf, open_dict

    run_dir = Path(OmegaConf.select(config, "hydra.run.dir"))
    with open_dict(config):
        del config["hydra"]  # Hydra's node holds values only a running job can resolve
    check(to_plain(config), run_dir)
    if any(arg.startswith("hydra.run.dir=") for arg in args):
        return list(args)
    return [*args, f"hydra.run.dir={run_dir}"]
