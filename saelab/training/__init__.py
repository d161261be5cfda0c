"""Training: one trainer, composable objectives, schedules."""

from saelab.training.config import TrainConfig
from saelab.training.objectives import (
    Auxiliary,
    Objective,
    Reconstruction,
    Sparsity,
    StepContext,
    TrainingDiverged,
    local_objectives,
)
from saelab.training.trainer import Trainer

__all__ = [
    "Auxiliary",
    "Objective",
    "Reconstruction",
    "Sparsity",
    "StepContext",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "local_objectives",
]
