"""Training settings: one dataclass whose documented fields become `--train.*` CLI flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saelab.config import ConfigError


@dataclass
class TrainConfig:
    """How to optimise: budget, optimiser, schedules, upkeep, logging and checkpoints."""

    total_tokens: int = 2_000_000
    """Training budget in activation vectors (tokens); steps = total_tokens // batch_size."""
    batch_size: int = 4096
    """Activation vectors per optimiser step."""
    lr: float = 3e-4
    """Peak Adam learning rate."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    lr_warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from zero."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up."""
    lr_decay_steps: int | None = None
    """Steps over which the decay runs, ending with training; None means every step after warm-up."""
    lr_end_factor: float = 0.0
    """Learning rate at the end of the decay, as a fraction of lr."""
    sparsity_warmup_steps: int = 0
    """Steps of linear warm-up of the sparsity coefficient from zero."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; None disables clipping."""
    dead_window_tokens: int = 500_000
    """A latent that has not fired in this many tokens counts as dead (and feeds AuxK)."""
    norm_estimate_batches: int = 8
    """Batches used, before training, to estimate the normalisation scale and initialise b_dec."""
    seed: int = 0
    """Seed for initialisation and every random choice of the run."""
    log_every: int = 20
    """Steps between logged metrics (metrics.jsonl, progress bar, wandb)."""
    eval_every: int = 0
    """Steps between downstream evaluations (SAE spliced into the model on held-out contexts; 0: never).
    Needs a model source; results are logged as eval/ce_loss_score, eval/kl_div_score, ..."""
    eval_contexts: int = 4
    """Held-out contexts per evaluation during training."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; None writes only the final SAE."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb package)."""

    def __post_init__(self) -> None:
        positive = ("total_tokens", "batch_size", "log_every", "keep_checkpoints", "dead_window_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"train.total_tokens ({self.total_tokens}) is smaller than one batch ({self.batch_size})"
            )
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every must be positive or null, got {self.checkpoint_every}")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size
