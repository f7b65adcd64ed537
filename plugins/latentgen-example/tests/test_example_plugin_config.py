"""latentgen-example as installed: its entry point, and its Hydra presets found through its `latentgen.configs`
entry point (no hydra_plugins module of its own)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import latentgen_example
import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_module

from latentgen import registry
from latentgen.config import compose, group_options
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


def test_its_presets_are_on_the_search_path_of_every_latentgen_app():
    assert ("latentgen_example.conf", DIST) in registry.config_packages()
    assert importlib.util.find_spec("hydra_plugins.latentgen_example") is None  # no Hydra plugin module needed
    for app in ("train", "sample", "eval"):
        overrides = [] if app == "train" else ["checkpoint=unused.safetensors"]
        cfg = compose(app, overrides)
        # Hydra's own record of where it looked: latentgen's configs, then the plugin's package.
        with initialize_config_module(config_module="latentgen.conf", version_base="1.3"):
            sources = hydra_compose(config_name=app, overrides=overrides,
                                    return_hydra_config=True).hydra.runtime.config_sources
        found = {source.path: source.provider for source in sources}
        assert found.get("latentgen_example.conf") == "hydra.searchpath in main", sources
        paths = list(found)
        assert paths.index("latentgen_example.conf") > paths.index("latentgen.conf"), paths
        assert cfg is not None
    assert "rk4" in group_options("scheduler", config_name="sample")
    cfg = compose("sample", ["checkpoint=unused.safetensors", "scheduler=rk4"])
    assert dict(cfg.scheduler) == {"_target_": "latentgen.registry.build", "kind": "scheduler", "name": "rk4"}


def test_blocking_the_plugin_takes_its_presets_away_too(monkeypatch):
    monkeypatch.setenv(registry.BLOCK_ENV, DIST)
    assert ("latentgen_example.conf", DIST) not in registry.config_packages()
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    monkeypatch.delenv(registry.BLOCK_ENV)
    assert registry.config_packages() == []
