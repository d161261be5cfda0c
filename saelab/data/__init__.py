"""Activation sources: iterables of batches that can report and restore their exact position."""

from saelab.data.tensor_source import ActivationSource, TensorSource

__all__ = ["ActivationSource", "TensorSource"]
