"""Every error loadsvc raises on purpose, in one tree, so a caller can catch them in one place.

    LoadsvcError
    ├── RegionError      (also a RuntimeError) a region file missing, corrupt, truncated or
    │                     not the one expected: the message names the file and what differs
    ├── ServeError       (also a RuntimeError) `serve` cannot start: a port in use, a bad
    │                     certificate, ...
    ├── BadRequest       (also a ValueError) a request value out of range; .field names it
    └── SettingsError    (also a ValueError) a setting (flag or environment variable) that
                          cannot be used; the message names it and what it accepts

The tools (loadsvc.tools) derive their own errors from LoadsvcError too. Plain
ValueError/TypeError still mean a caller passed a bad argument to a function.
"""

from __future__ import annotations

__all__ = ["LoadsvcError", "RegionError", "ServeError", "BadRequest", "SettingsError"]


class LoadsvcError(Exception):
    """The root of every error loadsvc raises on purpose."""


class RegionError(LoadsvcError, RuntimeError):
    """The region file is missing, corrupt, or does not match what the caller expects."""


class ServeError(LoadsvcError, RuntimeError):
    """The server could not start (a port in use, a bad certificate, ...); the message says why."""


class BadRequest(LoadsvcError, ValueError):
    """A request value out of range; the message names the field (reason: a short label, or "")."""

    def __init__(self, field_name: str, message: str, reason: str = "") -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = reason


class SettingsError(LoadsvcError, ValueError):
    """A setting (a flag or an environment variable) has a value loadsvc cannot use."""
