"""Synthetic activations with known ground-truth features, and how well an SAE recovers them."""

from saelab.synthetic.planted import PlantedFeatures, SyntheticSource, feature_dictionary, feature_recovery
from saelab.synthetic.recovery import feature_recall, mcc
from saelab.synthetic.toy import train_toy_sae

__all__ = [
    "PlantedFeatures",
    "SyntheticSource",
    "feature_dictionary",
    "feature_recall",
    "feature_recovery",
    "mcc",
    "train_toy_sae",
]
