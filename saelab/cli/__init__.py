"""The `saelab` command (`saelab.cli:main`)."""

from saelab.cli.main import main

__all__ = ["main"]
