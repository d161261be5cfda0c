"""Activations, after the model: harvesting them at hook points, shuffling, the on-disk cache, in-memory sources.

Every source is an iterable of batches whose position can be saved and restored (`ActivationSource`), so a
resumed run sees the same next batch.
"""

from saelab.activations.source import ActivationSource, Batch, TensorSource

__all__ = ["ActivationSource", "Batch", "TensorSource"]
