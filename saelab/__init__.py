"""saelab: train, evaluate and study sparse autoencoders and transcoders on language-model activations."""

from saelab.config import ConfigError
from saelab.io.saelens_format import FileFormatError, load_sae
from saelab.saes import SAE, SAEConfig, available_architectures, create_sae, register
from saelab.training import TrainConfig, Trainer, TrainingDiverged

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "ConfigError",
    "FileFormatError",
    "SAEConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "available_architectures",
    "create_sae",
    "load_sae",
    "register",
]
