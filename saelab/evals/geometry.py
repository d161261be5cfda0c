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
from collections.abc import Iterator, Mapping
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
    batch_tokens: int = 4096
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


def _given_batches(
    sae: SAE, activations: Tensor, targets: Tensor | None, batch_tokens: int
) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """(inputs, targets, context of each row or None) from tensors: (n, d) rows or (sequences, length, d)."""
    if activations.shape[-1] != sae.cfg.d_in or activations.dim() not in (2, 3):
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
    for start in range(0, activations.shape[0], per_batch):
        x, y = activations[start : start + per_batch], targets[start : start + per_batch]
        contexts = None
        if x.dim() == 3:
            contexts = torch.arange(x.shape[0], device=sae.device).repeat_interleave(x.shape[1])
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        yield x.to(sae.device, sae.dtype), y.to(sae.device, sae.dtype), contexts


def _model_batches(
    sae: SAE, model, data: DataConfig | None, config: GeometryConfig
) -> tuple[int, Iterator[tuple[Tensor, Tensor, Tensor | None]]]:
    """(number of batches, batches) of held-out contexts, as `evaluate` reads them."""
    from saelab.data.tokens import excluded_token_ids
    from saelab.evals.evaluate import activation_batches, data_config_of, heldout_contexts
    from saelab.splice import model_for

    model = model_for(sae, model)
    data = data or data_config_of(sae)
    exclude = data.exclude_special_tokens if config.exclude_special_tokens is None else config.exclude_special_tokens
    token_batches = heldout_contexts(model, data, config.n_contexts, config.batch_contexts)
    batches = activation_batches(sae, model, token_batches, excluded_token_ids(model.tokenizer, exclude))
    rows = (
        (b.inputs, b.targets, b.keep.nonzero()[:, 0].to(sae.device)) for b in batches
    )  # context of each kept position
    return len(token_batches), rows


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
    sae = original
    folded = False
    if config.fold_decoder_norm:
        sae = original.clone()
        folded = sae.fold_W_dec_norm()
    if activations is not None:
        batches = _given_batches(sae, activations, targets, config.batch_tokens)
        per_batch = config.batch_tokens // activations.shape[1] if activations.dim() == 3 else config.batch_tokens
        n_batches, source = -(-activations.shape[0] // max(1, per_batch)), "given activations"
    else:
        n_batches, batches = _model_batches(original, model, data, config)
        source = f"the first {config.n_contexts} contexts of the SAE's dataset"
    d_sae = sae.cfg.d_sae
    blocks = M.pairwise_blocks(d_sae, config.chunk_size) * (2 if config.encoder_cosines else 1)
    bar = tqdm(total=n_batches + blocks, desc="geometry: activations", disable=not progress)

    fire_counts = torch.zeros(d_sae, dtype=torch.float64, device=sae.device)
    firing_contexts = torch.zeros(d_sae, dtype=torch.float64, device=sae.device)
    terms, per_sequence = [], True
    for x, y, contexts in batches:
        latents = sae.encode(x)
        terms.append(M.shrinkage_terms(y, sae.output(latents, x)))
        fired = (latents != 0).double()
        fire_counts += fired.sum(0)
        if contexts is None:
            per_sequence = False
        elif len(contexts):
            per_context = torch.zeros(int(contexts.max()) + 1, d_sae, dtype=torch.float64, device=sae.device)
            firing_contexts += (per_context.index_add_(0, contexts, fired) > 0).sum(0)
        bar.update()
    n_tokens = sum(len(t) for t in terms)
    if n_tokens == 0:
        bar.close()
        raise ConfigError("geometry read no tokens: every position was a special token, or no activations were given")

    bar.set_description("geometry: decoder cosines")
    decoder = M.decoder_geometry(original.W_dec.detach(), config.chunk_size, config.top_pairs, bar.update)
    max_encoder = torch.full((d_sae,), float("nan"))
    if config.encoder_cosines:
        bar.set_description("geometry: encoder cosines")
        max_encoder = M.pairwise_cosines(encoder_directions(sae), config.chunk_size, on_block=bar.update)["max_cosine"]
    bar.close()
    enc_dec = encoder_decoder_cosines(sae)
    enc_dec_values = torch.full((d_sae,), float("nan")) if enc_dec is None else enc_dec
    encoder_norms = encoder_directions(sae).float().norm(dim=-1)
    fire_counts = fire_counts.cpu()
    density = fire_counts / n_tokens
    max_decoder = decoder["max_decoder_cosine"]

    metrics = {
        "shrinkage": M.shrinkage(torch.cat(terms)),
        "misc_metrics": {
            **M.density_metrics(fire_counts, n_tokens),
            "average_max_encoder_cosine_sim": float(max_encoder.mean()),
            "average_max_decoder_cosine_sim": float(max_decoder.mean()),
        },
        "density": {"tokens": n_tokens, **M.density_counts(fire_counts, n_tokens, config.dense_threshold)},
        "weights": {
            "decoder_norm_mean": float(decoder["decoder_norms"].mean()),
            "decoder_norm_std": float(decoder["decoder_norms"].std()) if d_sae > 1 else 0.0,
            "largest_decoder_cosine_sim": float(max_decoder.max()),
            "average_encoder_decoder_cosine_sim": float(enc_dec_values.mean()),
        },
    }
    details = []
    if config.per_latent_details:
        columns = {
            "feature_density": density,
            # firing tokens per sequence in which the latent fires at all (NaN: never fired, or rows without sequences)
            "consistent_activation_heuristic": (
                fire_counts / firing_contexts.cpu() if per_sequence else torch.full((d_sae,), torch.nan)
            ),
            "encoder_bias": encoder_biases(sae).float(),
            "encoder_norm": encoder_norms,
            "encoder_decoder_cosine_sim": enc_dec_values,
            "max_encoder_cosine_sim": max_encoder,
            "max_decoder_cosine_sim": max_decoder,
            "max_decoder_cosine_partner": decoder["max_decoder_cosine_partner"],
            "decoder_norm": decoder["decoder_norms"].float(),
        }
        lists = {name: values.cpu().tolist() for name, values in columns.items()}
        details = [{"index": i, **{name: values[i] for name, values in lists.items()}} for i in range(d_sae)]
    pairs = decoder.get("top_pairs", torch.empty(0, 2, dtype=torch.long)).tolist()
    pair_cosines = decoder.get("top_pair_cosines", torch.empty(0)).tolist()
    unstructured = {
        "top_decoder_pairs": [
            {"latent_a": a, "latent_b": b, "cosine_sim": c} for (a, b), c in zip(pairs, pair_cosines, strict=True)
        ],
        "histograms": {
            "log10_feature_density": _histogram(
                M.log_feature_density(fire_counts, n_tokens)[fire_counts > 0], DENSITY_EDGES
            ),
            "encoder_decoder_cosine_sim": _histogram(enc_dec_values, COSINE_EDGES),
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
    written = []
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
