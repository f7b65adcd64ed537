"""Hydra imports this package at start-up and finds latentgen-example's SearchPathPlugin in searchpath.py."""
