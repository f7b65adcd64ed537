"""Adds latentgen-minilm's config options (`conditioner=minilm`, `conditioner=minilm_pooled`) to latentgen's apps.

Hydra imports every module under `hydra_plugins` at start-up, in every Hydra application: this one
imports only Hydra, and touches only search paths that already hold latentgen's configs.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

LATENTGEN_CONFIGS = "pkg://latentgen.conf"
PLUGIN_CONFIGS = "pkg://latentgen_minilm.conf"


class LatentgenMiniLMSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if any(element.path == LATENTGEN_CONFIGS for element in search_path.get_path()):
            search_path.append(provider="latentgen-minilm", path=PLUGIN_CONFIGS)
