"""Hydra discovers latentgen-minilm's SearchPathPlugin in this package (see searchpath.py)."""
