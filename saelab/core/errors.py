"""The errors saelab raises for things a user can fix: the CLI prints their message as one line.

Each also derives from the built-in error it refines (a bad config value is still a ValueError), so callers
that catch the built-in keep working. Any other exception is a bug, and the CLI shows its traceback.
"""

from __future__ import annotations


class SaelabError(Exception):
    """An error whose message tells the user what to change."""


class ConfigError(SaelabError, ValueError):
    """A config value or key that cannot be used."""


class FileFormatError(SaelabError, ValueError):
    """A file that is missing, truncated, corrupt or inconsistent with its config."""


class MissingDependency(SaelabError, ImportError):
    """An optional package that this feature needs is not installed; the message says what to install."""
