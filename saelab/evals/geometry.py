"""Geometry: what an SAE's weights and a few of its activations say about it, without splicing it into the model.

- Shrinkage (`shrinkage/*`, SAEBench's core names): mean norms in and out, `l2_ratio` = mean ||x_hat|| / ||x||, and
  `relative_reconstruction_bias` = E||x_hat||^2 / E[x . x_hat], on held-out contexts of the SAE's training data
  (or on activations you pass). A transcoder is measured against its target: x is then the output-hook activation.
- Density (`misc_metrics/frac_alive`, `freq_over_*`; `density/*`): how often each latent fired on the tokens read.
- Weights: each latent's largest decoder cosine with another latent (and which), the most similar decoder pairs,
  the cosine of each latent's encoder and decoder directions, its largest encoder cosine, encoder and decoder norms.

The encoder direction of latent i is column i of W_enc for every saelab architecture: its pre-activation is
sae_in . W_enc[:, i] plus a bias, and what follows acts on that one number (ReLU; JumpReLU's threshold; TopK's and
BatchTopK's selection; gated's gate, whose magnitude path uses exp(r_mag_i) W_enc[:, i], the same direction). A
transcoder reads one activation and writes another, so its encoder and decoder live in different spaces and the
encoder-decoder cosine is undefined (NaN); a skip transcoder's W_skip is a linear map beside the dictionary, not a
latent: it enters the output (shrinkage) but none of the per-latent geometry.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.core.config import PYDANTIC
from saelab.core.errors import ConfigError
from saelab.core.files import atomic_write_bytes
from saelab.data.config import DataConfig
from saelab.evals import metrics as M
from saelab.evals.results import make_result
from saelab.saes.base import SAE

EVAL_TYPE_ID = "geometry"
DENSITY_EDGES = torch.linspace(-8, 0, 81)  # log10 firing frequency, 0.1 wide: the same bins for every SAE
COSINE_EDGES = torch.linspace(-1, 1, 101)


@dataclass
class GeometryConfig:
    """Settings of the geometry eval."""

    __pydantic_config__ = PYDANTIC

    n_contexts: int = 64
    """Contexts read from the SAE's dataset, from its start: the held-out ones (64 by default; more read training
    text). More tokens give a truer density: a latent that fires once in 100k tokens looks dead in 8k."""
    batch_contexts: int = 8
    """Contexts per forward pass of the model."""
    exclude_special_tokens: bool | None = None
    """Leave out BOS/EOS/PAD positions; None: as the SAE was trained."""
    batch_tokens: int = 1024
    """Rows per SAE pass over activations you pass in (`run_geometry(activations=...)`)."""
    fold_decoder_norm: bool = True
    """Measure (a copy of) the SAE with unit-norm decoder rows, norms moved into the encoder, as SAEBench does: only
    `encoder_norm` and `encoder_bias` change (outputs, densities and cosines do not); `decoder_norm` is reported
    before folding."""
    top_pairs: int = 20
    """The most similar pairs of decoder rows kept (`eval_result_unstructured.top_decoder_pairs`)."""
    chunk_size: int | None = None
    """Latents compared with all others at a time in the pairwise cosines; None: as many as fit 2**24 entries
    (64 MiB), so d_sae 64k needs no d_sae x d_sae matrix."""
    encoder_cosines: bool = True
    """Also compute each latent's largest cosine with another encoder direction (a second d_sae x d_sae pass)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense (`density/dense_latents`)."""
    per_latent_details: bool = True
    """One record per latent in `eval_result_details` (SAEBench's CoreFeatureMetric fields and a few more)."""

    def __post_init__(self) -> None:
        for name in ("n_contexts", "batch_contexts", "batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"geometry {name} must be a positive integer, got {getattr(self, name)}")
        if self.top_pairs < 0:
            raise ConfigError(f"geometry top_pairs must be 0 or more, got {self.top_pairs}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"geometry chunk_size must be a positive integer or None, got {self.chunk_size}")
        if not 0 <= self.dense_threshold <= 1:
            raise ConfigError(f"geometry dense_threshold must be a fraction in [0, 1], got {self.dense_threshold}")


def encoder_directions(sae: SAE) -> Tensor:
    """(d_sae, d_in): the direction each latent reads from its (centred, normalised) input (see the module doc)."""
    return sae.W_enc.detach().T


def encoder_biases(sae: SAE) -> Tensor:
    """Each latent's encoder bias: b_enc, or a gated SAE's magnitude bias b_mag (as SAEBench), else zeros."""
    for name in ("b_enc", "b_mag"):
        bias = getattr(sae, name, None)
        if isinstance(bias, Tensor):
            return bias.detach()
    return torch.zeros(sae.cfg.d_sae, device=sae.device)


def encoder_decoder_cosines(sae: SAE) -> Tensor | None:
    """cos(W_enc[:, i], W_dec[i]) per latent; None for a transcoder (its encoder and decoder are in different
    spaces)."""
    if sae.cfg.transcoder:
        return None
    encoder, decoder = encoder_directions(sae).float(), sae.W_dec.detach().float()
    return torch.nn.functional.cosine_similarity(encoder, decoder, dim=-1, eps=1e-12)


Batches = Iterator[tuple[Tensor, Tensor, list[int] | None]]
"""(inputs, targets, rows of each sequence in order or None): what the eval reads, one batch at a time."""


def _given_batches(sae: SAE, activations: Tensor, targets: Tensor | None, batch_tokens: int) -> tuple[int, Batches]:
    """(number of batches, batches) of tensors: (n, d) rows or (sequences, length, d), checked before any work."""
    if activations.dim() not in (2, 3) or activations.shape[-1] != sae.cfg.d_in:
        raise ConfigError(
            f"geometry activations must be (tokens, {sae.cfg.d_in}) or (sequences, length, {sae.cfg.d_in}) for "
            f"this SAE, got {tuple(activations.shape)}"
        )
    if targets is None and sae.cfg.transcoder:
        raise ConfigError("geometry of a transcoder needs `targets` (its output-hook activations) beside activations")
    targets = activations if targets is None else targets
    if targets.shape != (*activations.shape[:-1], sae.cfg.d_out):
        raise ConfigError(
            f"geometry targets must be {(*activations.shape[:-1], sae.cfg.d_out)}, got {tuple(targets.shape)}"
        )
    per_batch = max(1, batch_tokens // activations.shape[1]) if activations.dim() == 3 else batch_tokens

    def batches() -> Batches:
        for start in range(0, activations.shape[0], per_batch):
            x, y = activations[start : start + per_batch], targets[start : start + per_batch]
            lengths = [x.shape[1]] * x.shape[0] if x.dim() == 3 else None
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            yield x.to(sae.device, sae.dtype), y.to(sae.device, sae.dtype), lengths

    return -(-activations.shape[0] // per_batch), batches()


def _model_batches(sae: SAE, model, data: DataConfig | None, config: GeometryConfig) -> tuple[int, int, Batches]:
    """(contexts, number of batches, batches) of held-out contexts, read as `evaluate` reads them."""
    from saelab.data.tokens import excluded_token_ids
    from saelab.evals.evaluate import activation_batches, data_config_of
    from saelab.evals.heldout import heldout_contexts
    from saelab.splice import model_for

    model = model_for(sae, model)
    data = data or data_config_of(sae)
    exclude = data.exclude_special_tokens if config.exclude_special_tokens is None else config.exclude_special_tokens
    token_batches = heldout_contexts(model, data, config.n_contexts, config.batch_contexts)
    batches = activation_batches(sae, model, token_batches, excluded_token_ids(model.tokenizer, exclude))
    n_contexts = sum(len(t) for t in token_batches)
    return n_contexts, len(token_batches), ((b.inputs, b.targets, b.keep.sum(1).tolist()) for b in batches)


@torch.no_grad()
def weight_geometry(
    sae: SAE,
    chunk_size: int | None = None,
    top_pairs: int = 0,
    encoder_cosines: bool = True,
    on_block: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """Per latent, (d_sae,) each: `decoder_norm`, `max_decoder_cosine_sim` (with another decoder row) and its
    `max_decoder_cosine_partner`, `encoder_norm`, `encoder_bias`, `encoder_decoder_cosine_sim` (NaN for a
    transcoder) and `max_encoder_cosine_sim` (NaN unless `encoder_cosines`); and the `top_pairs` most similar decoder
    pairs (`top_pairs` (n, 2), `top_pair_cosines`). The pairwise cosines go `chunk_size` latents at a time."""
    d_sae = sae.cfg.d_sae
    decoder = M.decoder_geometry(sae.W_dec.detach(), chunk_size, top_pairs, on_block)
    max_encoder = torch.full((d_sae,), float("nan"), device=sae.device)
    if encoder_cosines:
        max_encoder = M.pairwise_cosines(encoder_directions(sae), chunk_size, on_block=on_block)["max_cosine"]
    enc_dec = encoder_decoder_cosines(sae)
    return {
        "decoder_norm": decoder["decoder_norms"].float(),
        "max_decoder_cosine_sim": decoder["max_decoder_cosine"],
        "max_decoder_cosine_partner": decoder["max_decoder_cosine_partner"],
        "encoder_norm": encoder_directions(sae).float().norm(dim=-1),
        "encoder_bias": encoder_biases(sae).float(),
        "encoder_decoder_cosine_sim": torch.full_like(max_encoder, float("nan")) if enc_dec is None else enc_dec,
        "max_encoder_cosine_sim": max_encoder,
        "top_pairs": decoder.get("top_pairs", torch.empty(0, 2, dtype=torch.long)),
        "top_pair_cosines": decoder.get("top_pair_cosines", torch.empty(0)),
    }


def _firing_and_shrinkage(
    sae: SAE, batches: Batches, on_batch: Callable[[], None]
) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """Over every batch: the shrinkage terms of each token, how often each latent fired, and in how many sequences
    (None when the rows were given without sequences)."""
    fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.device)
    firing_sequences: Tensor | None = torch.zeros_like(fire_counts)
    terms: list[Tensor] = []
    for x, y, lengths in batches:
        latents = sae.encode(x)
        terms.append(M.shrinkage_terms(y, sae.output(latents, x)))
        fired = latents != 0
        fire_counts += fired.sum(0)
        if lengths is None:
            firing_sequences = None
        elif firing_sequences is not None:
            for sequence in fired.split(lengths):  # rows come sequence by sequence
                firing_sequences += sequence.any(0)
        on_batch()
    if not sum(len(t) for t in terms):
        raise ConfigError("geometry read no tokens: every position was a special token, or no activations were given")
    return terms, fire_counts.cpu(), None if firing_sequences is None else firing_sequences.cpu()


def _histogram(values: Tensor, edges: Tensor) -> dict[str, list]:
    values = values[values.isfinite()].double().cpu()
    counts = torch.histogram(values.clamp(float(edges[0]), float(edges[-1])), edges.double()).hist
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts]}


@torch.no_grad()
def run_geometry(
    sae: SAE,
    model=None,
    config: GeometryConfig | None = None,
    progress: bool = True,
    data: DataConfig | None = None,
    activations: Tensor | None = None,
    targets: Tensor | None = None,
) -> dict[str, Any]:
    """The geometry eval of `sae` as a result dict (`saelab.evals.results`): metrics, one record per latent, the top
    decoder pairs and histograms. Activations come from `config.n_contexts` held-out contexts of `data` (default:
    the SAE's training data) through `model` (default: the SAE's), or from `activations` ((tokens, d_in), or
    (sequences, length, d_in) for the per-sequence heuristic) and, for a transcoder, `targets`."""
    from tqdm.auto import tqdm

    config = config or GeometryConfig()
    started = time.perf_counter()
    original = sae.eval()
    if activations is not None:
        n_batches, batches = _given_batches(original, activations, targets, config.batch_tokens)
        source = "given activations"
    else:
        n_contexts, n_batches, batches = _model_batches(original, model, data, config)
        source = f"the first {n_contexts} contexts of the SAE's dataset"
    sae, folded = original, False
    if config.fold_decoder_norm:  # on a copy: the caller's SAE is left as it is
        sae = original.clone()
        folded = sae.fold_W_dec_norm()
    d_sae = sae.cfg.d_sae
    blocks = M.pairwise_blocks(d_sae, config.chunk_size) * (2 if config.encoder_cosines else 1)
    bar = tqdm(total=n_batches + blocks, desc="geometry: activations", disable=not progress)
    try:
        terms, fire_counts, firing_sequences = _firing_and_shrinkage(sae, batches, bar.update)
        bar.set_description("geometry: weights")
        weights = weight_geometry(sae, config.chunk_size, config.top_pairs, config.encoder_cosines, bar.update)
    finally:
        bar.close()
    weights["decoder_norm"] = original.W_dec.detach().float().norm(dim=-1)  # before folding: as trained
    n_tokens = sum(len(t) for t in terms)
    max_decoder, max_encoder = weights["max_decoder_cosine_sim"], weights["max_encoder_cosine_sim"]
    enc_dec = weights["encoder_decoder_cosine_sim"]

    metrics: dict[str, dict[str, float]] = {
        "shrinkage": M.shrinkage(torch.cat(terms)),
        "misc_metrics": {
            **M.density_metrics(fire_counts, n_tokens),
            "average_max_encoder_cosine_sim": float(max_encoder.mean()),
            "average_max_decoder_cosine_sim": float(max_decoder.mean()),
        },
        "density": {"tokens": n_tokens, **M.density_counts(fire_counts, n_tokens, config.dense_threshold)},
        "weights": {
            "decoder_norm_mean": float(weights["decoder_norm"].mean()),
            "decoder_norm_std": float(weights["decoder_norm"].std()) if d_sae > 1 else 0.0,
            "largest_decoder_cosine_sim": float(max_decoder.max()),
            "average_encoder_decoder_cosine_sim": float(enc_dec.mean()),
        },
    }
    details: list[dict[str, Any]] = []
    if config.per_latent_details:
        columns = {
            "feature_density": fire_counts / n_tokens,
            # firing tokens per sequence in which the latent fires at all (NaN: never fired, or rows without sequences)
            "consistent_activation_heuristic": (
                torch.full((d_sae,), torch.nan) if firing_sequences is None else fire_counts / firing_sequences
            ),
            **{name: values for name, values in weights.items() if not name.startswith("top_")},
        }
        lists = {name: values.cpu().tolist() for name, values in columns.items()}
        details = [{"index": i, **{name: values[i] for name, values in lists.items()}} for i in range(d_sae)]
    pairs, pair_cosines = weights["top_pairs"].tolist(), weights["top_pair_cosines"].tolist()
    unstructured = {
        "top_decoder_pairs": [
            {"latent_a": a, "latent_b": b, "cosine_sim": c} for (a, b), c in zip(pairs, pair_cosines, strict=True)
        ],
        "histograms": {
            "log10_feature_density": _histogram(
                M.log_feature_density(fire_counts, n_tokens)[fire_counts > 0], DENSITY_EDGES
            ),
            "encoder_decoder_cosine_sim": _histogram(enc_dec, COSINE_EDGES),
            "max_decoder_cosine_sim": _histogram(max_decoder, COSINE_EDGES),
            "max_encoder_cosine_sim": _histogram(max_encoder, COSINE_EDGES),
        },
        "decoder_folded": folded,
        "tokens_from": source,
    }
    return make_result(EVAL_TYPE_ID, original, config, metrics, details, unstructured, time.perf_counter() - started)


def plot_geometry(results: Mapping[str, dict], folder: str | Path) -> list[Path]:
    """PNGs comparing the SAEs of `results` (name -> geometry result): their log10 feature density histograms
    (dead latents counted in the legend), encoder-decoder cosines and largest decoder cosines, overlaid."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written: list[Path] = []
    plots = (
        ("log10_feature_density", "log10 firing frequency (alive latents)", "geometry_density.png"),
        ("encoder_decoder_cosine_sim", "cosine of a latent's encoder and decoder directions", "geometry_enc_dec.png"),
        ("max_decoder_cosine_sim", "largest cosine of a decoder row with another", "geometry_max_decoder.png"),
    )
    for key, xlabel, file in plots:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        drawn = False
        for name, result in results.items():
            histogram = result["eval_result_unstructured"]["histograms"][key]
            if not sum(histogram["counts"]):
                continue  # e.g. a transcoder's encoder-decoder cosines
            label = name
            if key == "log10_feature_density":
                label += f" ({result['eval_result_metrics']['density']['dead_latents']} dead)"
            ax.stairs(histogram["counts"], histogram["edges"], label=label)
            drawn = True
        if drawn:
            ax.set_xlabel(xlabel)
            ax.set_ylabel("latents")
            ax.legend(fontsize="small")
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            atomic_write_bytes(folder / file, buffer.getvalue())
            written.append(folder / file)
        plt.close(fig)
    return written
