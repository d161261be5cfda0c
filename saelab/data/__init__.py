"""Data, before the model: text sources, the built-in corpus, tokenising and packing into contexts."""

from saelab.data.config import DataConfig

__all__ = ["DataConfig"]
