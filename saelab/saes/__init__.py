"""SAE architectures, one per file, each registered by name."""

from saelab.saes import batchtopk, clt, crosscoder, gated, jumprelu, matryoshka, standard, topk  # noqa: F401  (registers them)
from saelab.saes.base import SAE
from saelab.saes.config import SAEConfig
from saelab.saes.outputs import SparseLatents, TrainOutput
from saelab.saes.registry import (
    architecture_class,
    available_architectures,
    create_sae,
    make_config,
    register,
    sae_from_config,
)

__all__ = [
    "SAE",
    "SAEConfig",
    "SparseLatents",
    "TrainOutput",
    "architecture_class",
    "available_architectures",
    "create_sae",
    "make_config",
    "register",
    "sae_from_config",
]
