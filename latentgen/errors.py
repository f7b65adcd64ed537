"""Exceptions latentgen raises: each names the component, the wrong value and the fix."""


class LatentgenError(Exception):
    """Base class of every error latentgen raises on purpose."""


class ComponentNotFoundError(LatentgenError, LookupError):
    """A component name that no installed distribution registers."""


class ComponentConflictError(LatentgenError):
    """Two distributions register the same name for the same kind."""


class PluginLoadError(LatentgenError, ImportError):
    """A registered entry point could not be imported or built."""


class IncompatibleComponentsError(LatentgenError, ValueError):
    """Components that cannot work together (channels, widths, conditioning keys)."""


class CheckpointError(LatentgenError, ValueError):
    """A checkpoint file that is missing, truncated, foreign or inconsistent."""


class ConfigError(LatentgenError, ValueError):
    """A configuration that names something impossible."""


class SettingTypeError(ConfigError, TypeError):
    """A setting or argument of the wrong type (a string where a number belongs, a float count)."""


class AdapterError(LatentgenError, ValueError):
    """An adapter that cannot apply to a pipeline, or an adapter file that is empty, foreign or inconsistent."""


class InsufficientMemoryError(LatentgenError, MemoryError):
    """A request that needs more memory than the device has available."""
