"""latentgen's package list, found from the tree (pyproject.toml holds everything else): the latentgen.*
packages, plus latentgen.conf, which pyproject's package-dir maps to the top-level conf/ folder."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["latentgen", "latentgen.*"]), "latentgen.conf"])
