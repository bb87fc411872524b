"""Exceptions raised for bad user input. Each names the file or field and what was expected."""

__all__ = ["Perception3DError", "DataError", "ConfigError"]


class Perception3DError(Exception):
    """Base class of the toolkit's user-facing errors."""


class DataError(Perception3DError, ValueError):
    """A data file or array is malformed (wrong size, NaN values, missing file, bad line)."""


class ConfigError(Perception3DError, ValueError):
    """A config file is malformed (unknown key, wrong type, missing _base_)."""
