"""User-facing errors. Each message names the value found and the fix.

They subclass ValueError so they pickle cleanly across Ray and read naturally in tracebacks.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; raised before any cluster time is spent."""


class TopologyError(ConfigError):
    """The cluster layout does not add up (devices, replicas, world size, batch arithmetic)."""


class CheckpointError(ConfigError):
    """A checkpoint, model folder or cache is missing, corrupt or does not match the run."""
