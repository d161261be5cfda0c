"""Synthetic activations with known ground-truth features."""

from saelab.synthetic.planted import PlantedFeatures, SyntheticSource, feature_recovery

__all__ = ["PlantedFeatures", "SyntheticSource", "feature_recovery"]
