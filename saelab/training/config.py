"""Training settings: one dataclass whose documented fields become `--train.*` CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saelab.core.config import PYDANTIC, ConfigError


@dataclass
class TrainConfig:
    """How to optimise: budget, optimiser, schedules, upkeep, logging and checkpoints."""

    __pydantic_config__ = PYDANTIC

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
    """Held-out contexts per evaluation during training (of each source, on a built-in corpus of several)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints; None writes only the final SAE."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    progress_bar: bool = True
    """Show a tqdm progress bar."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb package)."""
    compile: bool = False
    """Run each SAE's training forward through torch.compile (its first steps are slow while it compiles; on
    this machine's CPU it gained nothing: the step is matmul-bound; worth trying on a GPU)."""
    autocast: bool | Literal["auto"] = False
    """Run the forward pass (the SAEs' matmuls; end-to-end: the model's too) in bfloat16 under torch.autocast.
    Weights, gradients, optimiser state and losses stay float32. Fast on GPUs and on CPUs with bfloat16
    instructions (avx512_bf16 / AMX); slow on CPUs without them. 'auto' (the default of `saelab train`): on when
    the activations come from a model running in bfloat16 (model.dtype auto on such hardware), whose activations
    carry bfloat16's precision already; off otherwise, and off for a Trainer used without a run."""
    distributed: Literal["data", "module"] = "data"
    """Under torchrun with several processes: 'data' (each rank trains replicas of every SAE on its own share of
    the data, batch_size split between ranks, gradients averaged) or 'module' (the SAEs are dealt out to the
    ranks, the harvest is split and gathered, each rank trains its SAEs on the whole stream)."""
    distributed_timeout: float = 600.0
    """Seconds a rank waits for the others in a collective before failing with an error (instead of hanging)."""

    def __post_init__(self) -> None:
        positive = ("total_tokens", "batch_size", "log_every", "keep_checkpoints", "dead_window_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(f"train.total_tokens ({self.total_tokens}) is smaller than one batch ({self.batch_size})")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every must be positive or null, got {self.checkpoint_every}")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size


@dataclass
class ObjectiveConfig:
    """What the SAEs are trained to do. Local training (the default) reconstructs each SAE's own input; a
    positive `kl` or `downstream` trains end to end: the SAEs' outputs replace the activations inside the frozen
    model and the loss reads the model's outputs (the e2e_sae loss set). Terms add up, each with its coefficient."""

    __pydantic_config__ = PYDANTIC

    reconstruction: float = 1.0
    """Coefficient of each SAE's local reconstruction loss (its output against its input, or a transcoder's
    target); 0 for pure end-to-end training."""
    kl: float = 0.0
    """Coefficient of KL(clean model || spliced model) of the next-token distributions, averaged over tokens."""
    downstream: float = 0.0
    """Coefficient of the downstream reconstruction loss: at each of downstream_hooks, the squared error
    between the spliced and the clean activations, divided by the clean activations' mean squared norm."""
    downstream_hooks: list[str] = field(default_factory=list)
    """Hook points after the SAEs where the downstream loss is measured (e.g. the later blocks.N.hook_resid_post)."""

    def __post_init__(self) -> None:
        for name in ("reconstruction", "kl", "downstream"):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        if self.downstream > 0 and not self.downstream_hooks:
            raise ConfigError("objective.downstream needs objective.downstream_hooks (hook points after the SAEs)")
        if self.downstream_hooks and self.downstream == 0:
            raise ConfigError("objective.downstream_hooks are given but objective.downstream is 0")
        if self.reconstruction == 0 and not self.end_to_end:
            raise ConfigError("every objective coefficient is 0: set objective.reconstruction, kl or downstream")

    @property
    def end_to_end(self) -> bool:
        """True when the loss reads the model's outputs, so training runs the SAEs inside the model."""
        return self.kl > 0 or self.downstream > 0
