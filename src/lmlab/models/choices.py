"""The check every network applies to a setting with a fixed set of values."""

from __future__ import annotations

from collections.abc import Iterable

from lmlab.errors import ConfigError


def choice(key: str, value: str, options: Iterable[str]) -> str:
    """``value`` if it is one of ``options``; else a :class:`ConfigError` naming ``key`` and the options."""
    options = tuple(options)
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}, got '{value}'.")
    return value
