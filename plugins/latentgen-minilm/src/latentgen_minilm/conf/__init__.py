"""Hydra config options this plugin adds to latentgen's groups (found through hydra_plugins.latentgen_minilm)."""
