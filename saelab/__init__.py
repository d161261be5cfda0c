"""saelab: train, evaluate and study sparse autoencoders and transcoders on language-model activations."""

from saelab.activations import TensorSource
from saelab.core.errors import ConfigError, FileFormatError, SaelabError
from saelab.evals.evaluate import evaluate
from saelab.io.load import load_sae
from saelab.io.publish import push_to_hub
from saelab.models import HookedModel, load_model
from saelab.runs.config import RunConfig
from saelab.runs.runner import cache_activations, pretokenize, resume, train
from saelab.saes import SAE, SAEConfig, available_architectures, create_sae, register
from saelab.training import TrainConfig, Trainer, TrainingDiverged

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "ConfigError",
    "FileFormatError",
    "HookedModel",
    "RunConfig",
    "SAEConfig",
    "SaelabError",
    "TensorSource",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "available_architectures",
    "cache_activations",
    "create_sae",
    "evaluate",
    "load_model",
    "load_sae",
    "pretokenize",
    "push_to_hub",
    "register",
    "resume",
    "train",
]
