"""The config every SAE architecture shares (`SAEConfig`), and its free-form `metadata`.

Besides its own fields, an `SAEConfig` answers the names SAELens and SAEBench read from `sae.cfg`
(`context_size`, `prepend_bos`, `dataset_path`, `hook_head_index`, ...): they live in `metadata`, where the
trainer records the run's data settings and where saelab keeps those keys of SAELens files, so a saved
`cfg.json` keeps saelab's own keys while code written for SAELens or SAEBench finds what it looks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from saelab.core.config import PYDANTIC, ConfigError, to_dict

Normalization = Literal["none", "expected_average_only_in", "layer_norm"]


MAX_MATRIX_ELEMENTS = 2**38  # 1 TiB of float32 per weight matrix: larger is a typo, not a plan


class Metadata(dict):
    """A dict whose keys are also attributes, as SAELens 6's `SAEMetadata`: `metadata.context_size` and
    `metadata["context_size"]` are the same entry, a missing one reads as None, and setting an attribute
    sets the key (SAEBench writes `cfg.metadata.hook_layer = ...`). Still a plain dict to JSON."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle protocols probe dunders: those must stay missing
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        self.pop(name, None)


def _from_metadata(key: str, default: Any, doc: str, fallback: str | None = None) -> property:
    """A config attribute stored in `metadata[key]` (or `metadata[fallback]`), `default` when not recorded."""

    def get(cfg: SAEConfig) -> Any:
        if key in cfg.metadata:
            return cfg.metadata[key]
        if fallback is not None and fallback in cfg.metadata:
            return cfg.metadata[fallback]
        return default() if callable(default) else default

    def set_(cfg: SAEConfig, value: Any) -> None:
        cfg.metadata[key] = value

    return property(get, set_, doc=doc)


@dataclass
class SAEConfig:
    """Shape, wiring and normalisation shared by every architecture."""

    __pydantic_config__ = PYDANTIC

    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents in the dictionary."""
    architecture: str = "standard"
    """Registered architecture name (see `saelab.available_architectures()`)."""
    d_out: int | None = None
    """Width of the activations it reconstructs; defaults to d_in. Differing from d_in makes a transcoder."""
    transcoder: bool = False
    """Reconstruct a different activation (hook_name_out) than the one read; implied by d_out != d_in or skip."""
    skip_connection: bool = False
    """Add a learned linear map of the input to the output (W_skip), as in skip transcoders."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding; defaults to true for SAEs and false for transcoders."""
    normalize_activations: Normalization = "none"
    """'none'; 'expected_average_only_in' (scale inputs so E||x|| = sqrt(d_in) while training, folded into the
    weights on save); or 'layer_norm' (normalise each input, undo it on the output)."""
    decoder_init_norm: float | None = None
    """Norm of each decoder row at initialisation; None uses the architecture's default."""
    normalize_decoder: bool | None = None
    """Keep decoder rows at unit norm during training (parallel gradient removed, rows renormalised after each
    step); None uses the architecture's default."""
    b_dec_init: Literal["zeros", "mean", "geometric_median"] = "zeros"
    """How the trainer initialises b_dec from a sample of targets before training."""
    dtype: str = "float32"
    """Parameter dtype (follows the parameters: `sae.to(torch.bfloat16)` sets it to 'bfloat16')."""
    device: str = "cpu"
    """Parameter device (follows the parameters, as dtype does)."""
    model_name: str | None = None
    """Name or path of the model whose activations the SAE reads."""
    hook_name: str | None = None
    """Hook point the SAE reads."""
    hook_layer: int | None = None
    """Layer index of hook_name."""
    hook_name_out: str | None = None
    """Hook point a transcoder reconstructs."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (dataset, context size, training settings)."""

    # SAELens / SAEBench attribute names, answered from metadata (not fields: cfg.json keeps them in metadata)
    context_size = _from_metadata("context_size", None, "Tokens per context the SAE was trained on.")
    prepend_bos = _from_metadata("prepend_bos", True, "Whether contexts started with the BOS token.")
    dataset_path = _from_metadata(
        "dataset_path", None, "Dataset trained on (saelab records it as 'dataset').", fallback="dataset"
    )
    dataset_trust_remote_code = _from_metadata("dataset_trust_remote_code", False, "SAELens's dataset flag.")
    exclude_special_tokens = _from_metadata(
        "exclude_special_tokens", False, "Whether activations at BOS/EOS/PAD positions were left out."
    )
    hook_head_index = _from_metadata(
        "hook_head_index", None, "Attention head read at hook_name (None: saelab reads whole hooks)."
    )
    model_from_pretrained_kwargs = _from_metadata(
        "model_from_pretrained_kwargs", dict, "Options for loading the model (SAELens's name)."
    )

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        self.transcoder = bool(self.transcoder or self.d_out != self.d_in or self.skip_connection or self.hook_name_out)
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.transcoder
        self.metadata = Metadata(self.metadata)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work together."""
        for name in ("d_in", "d_sae", "d_out"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        assert self.d_out is not None  # __post_init__ defaults it to d_in
        if self.d_sae * max(self.d_in, self.d_out) > MAX_MATRIX_ELEMENTS:
            raise ConfigError(
                f"d_sae {self.d_sae} x d_in {self.d_in} is beyond any machine's memory (check d_sae / expansion_factor)"
            )
        if self.apply_b_dec_to_input and self.transcoder:
            raise ConfigError("apply_b_dec_to_input needs an SAE, not a transcoder: b_dec lives in output space")
        if self.normalize_activations == "layer_norm" and self.transcoder:
            raise ConfigError("normalize_activations='layer_norm' is only defined for SAEs, not transcoders")
        try:
            getattr(torch, self.dtype)
        except AttributeError:
            raise ConfigError(f"unknown dtype '{self.dtype}'") from None

    def input_hooks(self) -> list[str]:
        """The hook points whose activations, concatenated, are the input (one for an SAE; one per layer for a
        dictionary over several layers)."""
        return [] if self.hook_name is None else [self.hook_name]

    def output_hooks(self) -> list[str]:
        """The hook points whose activations, concatenated, are the target (a transcoder's hook_name_out)."""
        hook = self.hook_name_out if self.transcoder and self.hook_name_out else self.hook_name
        return [] if hook is None else [hook]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict of the fields (what `cfg.json` holds, and what SAEBench's results record)."""
        return {**to_dict(self), "metadata": dict(self.metadata)}
