"""Studying what latents mean: a corpus pass for `FeatureStats`, logit effects, token sets.

stats = feature_statistics(sae, n_contexts=512)   # model and data default to the SAE's own
stats.top_tokens[17], stats.logits["top_ids"][17], stats.enrichment("digits")
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from saelab.analysis.statistics import FeatureStatistics, FeatureStats
from saelab.data.config import DataConfig, data_config_from_metadata
from saelab.data.tokens import ContextBatches, excluded_token_ids
from saelab.models.hooks import HookedModel
from saelab.saes.base import SAE
from saelab.splice import hooks_of, model_for

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "ln_final")


class _LanguageModel(Protocol):
    """What `unembedding` reads of a model: a transformers one (TransformerLens's bridge forwards the call)."""

    def get_output_embeddings(self) -> Any: ...


def unembedding(model: HookedModel) -> Tensor:
    """`W_U` as `(vocab, d_model)`, with the final norm's elementwise scale folded in (as TransformerLens's
    `fold_ln` does), so that `direction @ W_U.T` is the direct effect of a residual direction on the logits."""
    W_U = cast(_LanguageModel, model.model).get_output_embeddings().weight.detach()
    base = getattr(model.model, "base_model", model.model)
    for name in FINAL_NORM_NAMES:
        weight = getattr(getattr(base, name, None), "weight", None)
        if isinstance(weight, Tensor) and weight.shape == (W_U.shape[1],):
            return W_U * weight.detach()
    return W_U


@torch.no_grad()
def logit_effects(sae: SAE, model: HookedModel, n: int = 10, n_bins: int = 32, chunk: int = 256) -> dict[str, Tensor]:
    """Per latent, the direct effect of its decoder direction on each token's logit (`W_dec @ W_U.T`): the `n`
    most promoted and most suppressed tokens with their values, and a histogram over the whole vocabulary.
    Empty when the SAE's output is not as wide as the model's residual stream."""
    W_U = unembedding(model).to(sae.dtype)
    W_dec = sae.W_dec.detach().cpu()
    if W_dec.shape[1] != W_U.shape[1]:
        return {}
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values", "histogram", "histogram_range")
    }
    for start in range(0, len(W_dec), chunk):
        effects = W_dec[start : start + chunk] @ W_U.T
        top = effects.topk(n, dim=1)
        bottom = (-effects).topk(n, dim=1)
        low, high = effects.min(1).values, effects.max(1).values
        bins = ((effects - low[:, None]) / (high - low).clamp_min(1e-12)[:, None] * n_bins).long().clamp_(0, n_bins - 1)
        histogram = torch.zeros(len(effects), n_bins, dtype=torch.long).scatter_add_(1, bins, torch.ones_like(bins))
        for key, value in (
            ("top_ids", top.indices),
            ("top_values", top.values),
            ("bottom_ids", bottom.indices),
            ("bottom_values", -bottom.values),
            ("histogram", histogram),
            ("histogram_range", torch.stack([low, high], 1)),
        ):
            parts[key].append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def token_set(tokenizer, strings: Sequence[str]) -> Tensor:
    """Token ids of `strings` (each alone and after a space, as a word inside a sentence is tokenised)."""
    ids: set[int] = set()
    for text in strings:
        for variant in (text, " " + text):
            ids.update(tokenizer(variant, add_special_tokens=False)["input_ids"])
    return torch.tensor(sorted(ids), dtype=torch.long)


def default_token_sets(tokenizer) -> dict[str, Tensor]:
    """A few token sets read off the vocabulary: digits, punctuation, capitalised words, lower-case words."""
    vocab = tokenizer.get_vocab()
    text = {i: tokenizer.convert_tokens_to_string([t]).strip() for t, i in vocab.items()}
    rules = {
        "digits": lambda s: s.isdigit(),
        "punctuation": lambda s: len(s) > 0 and all(c in string.punctuation for c in s),
        "capitalised words": lambda s: s[:1].isupper() and s.isalpha(),
        "lower-case words": lambda s: s.islower() and s.isalpha(),
    }
    return {
        name: torch.tensor(sorted(i for i, s in text.items() if rule(s)), dtype=torch.long)
        for name, rule in rules.items()
    }


@torch.no_grad()
def feature_statistics(
    sae: SAE,
    model: HookedModel | None = None,
    data: DataConfig | None = None,
    n_contexts: int = 256,
    batch_contexts: int = 8,
    top_k: int = 16,
    window: tuple[int, int] = (24, 8),
    token_sets: Mapping[str, Tensor] | None = None,
    n_logits: int = 10,
    progress: bool = False,
    quantile_intervals: int = 8,
    samples_per_interval: int = 4,
    random_windows: int = 0,
    seed: int = 0,
) -> FeatureStats:
    """`FeatureStats` of `sae` over `n_contexts` contexts: model and data default to those in the SAE's metadata;
    special tokens (BOS, separators) are not counted; `token_sets` default to `default_token_sets`; `n_logits` 0
    leaves the logit effects out. The last four arguments go to `FeatureStatistics`."""
    sae = sae.eval()
    model = model_for(sae, model)
    data = data or data_config_from_metadata(sae.cfg.metadata)
    token_sets = default_token_sets(model.tokenizer) if token_sets is None else token_sets
    hook_in, _ = hooks_of(sae)
    excluded = torch.tensor(excluded_token_ids(model.tokenizer, data.exclude_special_tokens), dtype=torch.long)
    stats = FeatureStatistics(
        sae.cfg.d_sae,
        top_k=top_k,
        window=window,
        token_sets=token_sets,
        quantile_intervals=quantile_intervals,
        samples_per_interval=samples_per_interval,
        random_windows=random_windows,
        seed=seed,
    )
    config = dataclasses.replace(data, contexts_per_batch=min(batch_contexts, n_contexts))
    contexts = ContextBatches(config, model.tokenizer, loop=False)
    batches = islice(contexts, max(1, n_contexts // config.contexts_per_batch))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=max(1, n_contexts // config.contexts_per_batch), desc="feature statistics")
    for tokens in batches:
        x = model.run_with_cache(tokens, [hook_in])[hook_in]
        latents = sae.encode(x.to(sae.device, sae.dtype))
        stats.add(tokens, latents, keep=~torch.isin(tokens, excluded))
    layer = sae.cfg.hook_layer if sae.cfg.hook_layer is not None else model.hook_point(hook_in).layer
    info: dict[str, Any] = {
        "model_name": sae.cfg.model_name,
        "hook_name": hook_in,
        "hook_layer": layer,
        "dataset": data.dataset,
        "context_size": data.context_size,
        "n_contexts": stats.n_contexts,
    }
    return stats.result(logits=logit_effects(sae, model, n_logits) if n_logits > 0 else {}, info=info)
