"""Puts latentgen-example's config options (`scheduler=rk4`) into latentgen's Hydra groups.

Hydra imports every module under `hydra_plugins` when any Hydra application starts, so this one imports
only Hydra, and adds its path only where latentgen's own configs are being searched.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "latentgen-example"
LATENTGEN_CONFIGS = "pkg://latentgen.conf"
PLUGIN_CONFIGS = "pkg://latentgen_example.conf"


class LatentgenExampleSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if any(element.path == LATENTGEN_CONFIGS for element in search_path.get_path()):
            search_path.append(provider=PROVIDER, path=PLUGIN_CONFIGS)
