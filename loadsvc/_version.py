"""The installed distribution's version (one place; the package root re-exports it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loadsvc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
