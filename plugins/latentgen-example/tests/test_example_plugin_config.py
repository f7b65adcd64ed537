"""latentgen-example as installed: its entry point, and its Hydra option found through its SearchPathPlugin."""

from __future__ import annotations

import importlib.metadata

import pytest

import latentgen_example
from latentgen import registry
from latentgen.config import CONFIG_MODULE, compose
from latentgen.errors import ConfigError

DIST = "latentgen-example"


def test_registered_under_its_distribution():
    (entry,) = registry.entries("scheduler")["rk4"]
    assert (entry.distribution, entry.version) == (DIST, importlib.metadata.version(DIST)) == (DIST, latentgen_example.__version__)
    assert entry.target == "latentgen_example.rk4:RK4Scheduler"
    scheduler = registry.build("scheduler", "rk4")
    assert (scheduler.registry_name, scheduler.registry_distribution) == ("rk4", DIST)
    with pytest.raises(ConfigError, match="scheduler 'rk4'"):
        registry.build("scheduler", "rk4", eta=1.0)  # it takes no parameters, and says so


def _sources(initialize):
    from hydra.core.global_hydra import GlobalHydra

    with initialize:
        return {source.provider: source for source in GlobalHydra.instance().config_loader().get_sources()}


def test_the_option_comes_from_the_plugins_yaml():
    from hydra import initialize_config_module

    sources = _sources(initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"))
    assert sources[DIST].path == "latentgen_example.conf"
    assert sources[DIST].is_config("scheduler/rk4")
    cfg = compose("sample", ["checkpoint=unused.safetensors", "scheduler=rk4"])
    assert dict(cfg.scheduler) == {"_target_": "latentgen.registry.build", "kind": "scheduler", "name": "rk4"}


def test_other_hydra_apps_are_left_alone(tmp_path):
    from hydra import initialize_config_dir

    (tmp_path / "config.yaml").write_text("x: 1\n")
    sources = _sources(initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"))
    assert DIST not in sources
