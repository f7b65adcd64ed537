"""Hydra integration: registry components as config-group options, and composing latentgen's configs."""

from latentgen.config.options import CONFIG_MODULE, compose, group_options, register_component_options

__all__ = ["CONFIG_MODULE", "compose", "group_options", "register_component_options"]
