"""Hydra config groups of latentgen (shipped in the wheel as latentgen.conf)."""
