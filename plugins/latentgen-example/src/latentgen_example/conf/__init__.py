"""Hydra presets this plugin adds to latentgen's groups (on Hydra's search path through its `latentgen.configs` entry point)."""
