"""Per-latent statistics of an SAE over a corpus, in one streaming pass with bounded memory.

`FeatureStatistics.add(tokens, latents)` takes one batch of contexts at a time and keeps, per latent:
how often it fires, the sum and max of its activations, a histogram of its nonzero activations, the top-k
contexts by the latent's maximum in them (with a window of tokens and activations around that maximum), and
how often it fires on tokens of named token sets, and a uniform random sample of the tokens whose activation
falls in each of `quantile_intervals` equal parts of its activation range (with their windows; Neuronpedia shows
these beside the top contexts). Memory does not grow with the corpus: the histogram has a fixed number of bins per
latent whose width doubles (merging pairs of bins, which keeps counts exact) when a larger activation arrives; an
interval is a fixed group of bins, and its sample keeps the tokens with the smallest random keys, so when bins
merge, the samples of the two intervals merge into an exact uniform sample of their union. Optionally it also keeps
a uniform sample of `random_windows` windows of the whole stream (not per latent) with every latent's maximum in
each, from which the windows where a latent never fires can be drawn (non-activating examples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor

from saelab.core.files import atomic_write_bytes


@dataclass
class FeatureStats:
    """What `FeatureStatistics` gathered, one row per latent. Contexts are numbered in the order they were
    added; `top_*` hold the top-k contexts in descending order (value 0 and context -1 where fewer fired)."""

    n_tokens: int
    firing_counts: Tensor
    activation_sums: Tensor
    max_activations: Tensor
    histogram: Tensor
    bin_widths: Tensor
    top_values: Tensor
    top_contexts: Tensor
    top_positions: Tensor
    top_tokens: Tensor
    top_acts: Tensor
    window_left: int
    token_set_names: list[str] = field(default_factory=list)
    token_set_firings: Tensor | None = None
    token_set_tokens: Tensor | None = None
    logits: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    interval_tokens: Tensor | None = None
    """(d_sae, intervals, samples, window) token windows around tokens sampled per interval of the activation
    range [i * w, (i + 1) * w), w = histogram bin width * bins per interval (-1 where fewer were seen)."""
    interval_acts: Tensor | None = None
    """The latent's activations over those windows (the sampled token sits at index window_left)."""
    random_tokens: Tensor | None = None
    """(windows, window) token windows around uniformly sampled counted tokens (-1 beyond the context)."""
    random_max: Tensor | None = None
    """(windows, d_sae) each latent's maximum activation over each of those windows (0: it never fires there)."""

    @property
    def interval_width(self) -> Tensor:
        """Width of each latent's activation intervals (float64, 0 for latents that never fired)."""
        assert self.interval_tokens is not None
        return self.bin_widths * (self.histogram.shape[1] // self.interval_tokens.shape[1])

    @property
    def interval_counts(self) -> Tensor:
        """(d_sae, intervals): how many tokens' activations fell in each interval (exact)."""
        assert self.interval_tokens is not None
        return self.histogram.view(self.d_sae, self.interval_tokens.shape[1], -1).sum(-1)

    @property
    def d_sae(self) -> int:
        return len(self.firing_counts)

    @property
    def density(self) -> Tensor:
        """Fraction of tokens each latent fires on."""
        return self.firing_counts.double() / max(self.n_tokens, 1)

    @property
    def mean_activations(self) -> Tensor:
        """Mean activation of each latent over the tokens it fires on (0 if it never fires)."""
        return self.activation_sums / self.firing_counts.clamp_min(1)

    def enrichment(self, name: str) -> Tensor:
        """For token set `name`, per latent: the fraction of its firings on the set's tokens over the set's
        share of all tokens (1 = no preference; 0 for latents that never fire)."""
        if name not in self.token_set_names:
            raise KeyError(f"no token set '{name}'; the statistics have {self.token_set_names}")
        assert self.token_set_firings is not None and self.token_set_tokens is not None
        i = self.token_set_names.index(name)
        share = float(self.token_set_tokens[i]) / max(self.n_tokens, 1)
        if share == 0:
            return torch.zeros(self.d_sae, dtype=torch.float64)
        return self.token_set_firings[i].double() / self.firing_counts.clamp_min(1) / share

    def save(self, path: str | Path) -> None:
        """One safetensors file (tensors, with the rest as JSON in its metadata), written atomically."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors = {name: value.contiguous() for name, value in values.items() if isinstance(value, Tensor)}
        tensors.update({f"logits.{k}": v.contiguous() for k, v in self.logits.items()})
        meta = {
            "n_tokens": self.n_tokens,
            "window_left": self.window_left,
            "token_set_names": self.token_set_names,
            "info": self.info,
        }
        atomic_write_bytes(path, save(tensors, metadata={"saelab_feature_stats": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        from safetensors import safe_open

        from saelab.core.files import FileFormatError

        try:
            with safe_open(str(path), "pt") as handle:
                meta = json.loads((handle.metadata() or {})["saelab_feature_stats"])
            tensors = load_file(str(path))
        except Exception as error:  # a truncated or foreign file
            raise FileFormatError(f"{path}: not a saelab feature-statistics file ({error})") from error
        logits = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("logits.")}
        plain: dict[str, Any] = {k: v for k, v in tensors.items() if not k.startswith("logits.")}  # field: value
        try:
            return cls(**plain, logits=logits, **meta)
        except TypeError as error:  # tensors or metadata missing, or not ours
            raise FileFormatError(f"{path}: not a saelab feature-statistics file ({error})") from None


class FeatureStatistics:
    """Streaming accumulator of `FeatureStats`; see the module docstring."""

    def __init__(
        self,
        d_sae: int,
        top_k: int = 16,
        window: tuple[int, int] = (24, 8),
        n_bins: int = 32,
        token_sets: Mapping[str, Tensor] | None = None,
        quantile_intervals: int = 8,
        samples_per_interval: int = 4,
        seed: int = 0,
        random_windows: int = 0,
    ):
        if n_bins % 2:
            raise ValueError("n_bins must be even (bins merge in pairs)")
        if quantile_intervals < 1 or n_bins % quantile_intervals:
            raise ValueError(f"quantile_intervals must divide n_bins ({n_bins}), got {quantile_intervals}")
        self.d_sae, self.k, self.n_bins = d_sae, top_k, n_bins
        self.left, self.right = window
        width = self.left + 1 + self.right
        self.n_tokens = self.n_contexts = 0
        self.firing_counts = torch.zeros(d_sae, dtype=torch.long)
        self.activation_sums = torch.zeros(d_sae, dtype=torch.float64)
        self.max_activations = torch.zeros(d_sae)
        self.histogram = torch.zeros(d_sae, n_bins, dtype=torch.long)
        self.bin_widths = torch.zeros(d_sae, dtype=torch.float64)
        self.top_values = torch.zeros(d_sae, top_k)
        self.top_contexts = torch.full((d_sae, top_k), -1, dtype=torch.long)
        self.top_positions = torch.full((d_sae, top_k), -1, dtype=torch.long)
        self.top_tokens = torch.full((d_sae, top_k, width), -1, dtype=torch.int32)  # int32: half the memory
        self.top_acts = torch.zeros(d_sae, top_k, width)
        self.token_sets = {name: torch.as_tensor(ids, dtype=torch.long) for name, ids in (token_sets or {}).items()}
        self.token_set_firings = torch.zeros(len(self.token_sets), d_sae, dtype=torch.long)
        self.token_set_tokens = torch.zeros(len(self.token_sets), dtype=torch.long)
        # Samples per activation interval: (d_sae, intervals, samples) random keys, the smallest kept
        self.n_intervals, self.n_samples = quantile_intervals, samples_per_interval
        self.sample_keys = torch.full((d_sae, quantile_intervals, samples_per_interval), math.inf)
        self.sample_tokens = torch.full((*self.sample_keys.shape, width), -1, dtype=torch.int32)
        self.sample_acts = torch.zeros(*self.sample_keys.shape, width)
        self.generator = torch.Generator().manual_seed(seed)
        # A uniform sample of windows of the stream: the smallest random keys seen, as for the intervals
        self.random_keys = torch.full((random_windows,), math.inf)
        self.random_tokens = torch.full((random_windows, width), -1, dtype=torch.int32)
        self.random_max = torch.zeros(random_windows, d_sae)

    @torch.no_grad()
    def add(self, tokens: Tensor, latents: Tensor, keep: Tensor | None = None) -> None:
        """One batch: token ids `(contexts, positions)`, latents `(contexts, positions, d_sae)`, and which
        positions count (`keep`, e.g. not special tokens; default all)."""
        tokens, latents = tokens.cpu(), latents.detach().float().cpu()
        if latents.shape[:2] != tokens.shape or latents.shape[-1] != self.d_sae:
            raise ValueError(
                f"latents {tuple(latents.shape)} do not match tokens {tuple(tokens.shape)} x d_sae {self.d_sae}"
            )
        keep = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep.cpu()
        latents = latents * keep.unsqueeze(-1)
        self.n_tokens += int(keep.sum())
        firing = latents > 0
        self.firing_counts += firing.sum((0, 1))
        self.activation_sums += latents.double().sum((0, 1))
        self.max_activations = torch.maximum(self.max_activations, latents.amax((0, 1)))
        rows, cols = firing.reshape(-1, self.d_sae).nonzero(as_tuple=True)
        bins = self._add_to_histogram(cols, latents.reshape(-1, self.d_sae)[rows, cols].double())
        self._add_samples(tokens, latents, rows, cols, bins)
        self._add_top_contexts(tokens, latents)
        self._add_random_windows(tokens, latents, keep)
        for i, ids in enumerate(self.token_sets.values()):
            in_set = torch.isin(tokens, ids) & keep
            self.token_set_tokens[i] += int(in_set.sum())
            self.token_set_firings[i] += firing[in_set].sum(0)
        self.n_contexts += tokens.shape[0]

    def _add_to_histogram(self, cols: Tensor, values: Tensor) -> Tensor:
        """Count the firings (latent `cols`, activation `values`) into the histogram; returns their bins."""
        batch_max = torch.zeros(self.d_sae, dtype=torch.float64).scatter_reduce_(0, cols, values, "amax")
        first = (self.bin_widths == 0) & (batch_max > 0)
        self.bin_widths[first] = batch_max[first] / self.n_bins
        while True:  # double the bin width of latents whose new maximum lies beyond their last bin
            over = (batch_max >= self.bin_widths * self.n_bins) & (batch_max > 0)
            if not over.any():
                break
            merged = self.histogram[over].view(-1, self.n_bins // 2, 2).sum(-1)
            self.histogram[over] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.bin_widths[over] *= 2
            self._merge_interval_samples(over)
        bins = (values / self.bin_widths[cols]).long().clamp_(0, self.n_bins - 1)
        self.histogram.view(-1).index_add_(0, cols * self.n_bins + bins, torch.ones_like(bins))
        return bins

    def _keep_smallest_keys(self, keys: Tensor, tokens: Tensor, acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Of candidates `(..., n)` (windows `(..., n, width)`), the `n_samples` with the smallest keys."""
        kept = keys.topk(self.n_samples, dim=-1, largest=False).indices  # ascending: empty (inf) slots last
        spread = kept.unsqueeze(-1).expand(*kept.shape, tokens.shape[-1])
        return keys.gather(-1, kept), tokens.gather(-2, spread), acts.gather(-2, spread)

    def _merge_interval_samples(self, latents: Tensor) -> None:
        """Bins of `latents` merged pairwise: interval i now spans old intervals 2i and 2i + 1, so its sample is
        the smallest keys of both (the upper half of the intervals is empty again)."""
        if self.n_samples == 0:
            return
        keys, tokens, acts = self.sample_keys[latents], self.sample_tokens[latents], self.sample_acts[latents]
        if self.n_intervals % 2:  # an odd last interval merges with an empty one
            keys = torch.cat([keys, torch.full_like(keys[:, :1], math.inf)], 1)
            tokens = torch.cat([tokens, torch.full_like(tokens[:, :1], -1)], 1)
            acts = torch.cat([acts, torch.zeros_like(acts[:, :1])], 1)
        m, pairs, width = len(keys), keys.shape[1] // 2, tokens.shape[-1]
        keys, tokens, acts = self._keep_smallest_keys(
            keys.reshape(m, pairs, -1), tokens.reshape(m, pairs, -1, width), acts.reshape(m, pairs, -1, width)
        )
        empty = self.n_intervals - pairs
        self.sample_keys[latents] = torch.cat([keys, torch.full((m, empty, self.n_samples), math.inf)], 1)
        self.sample_tokens[latents] = torch.cat(
            [tokens, torch.full((m, empty, self.n_samples, width), -1, dtype=tokens.dtype)], 1
        )
        self.sample_acts[latents] = torch.cat([acts, torch.zeros(m, empty, self.n_samples, width)], 1)

    def _add_samples(self, tokens: Tensor, latents: Tensor, rows: Tensor, cols: Tensor, bins: Tensor) -> None:
        """Offer this batch's firings (flat token `rows`, latent `cols`, histogram `bins`) to their intervals'
        samples: each gets a uniform random key, and every interval keeps the smallest keys it has seen."""
        if self.n_samples == 0 or len(cols) == 0:
            return
        segment = cols * self.n_intervals + bins // (self.n_bins // self.n_intervals)
        keys = torch.rand(len(cols), generator=self.generator)
        order = keys.argsort()
        order = order[segment[order].argsort(stable=True)]  # by segment, smallest keys first within each
        touched, counts = segment[order].unique_consecutive(return_counts=True)
        rank = torch.arange(len(order)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        first = rank < self.n_samples  # only a segment's n_samples smallest keys can enter its sample
        order, rank = order[first], rank[first]
        slot = torch.repeat_interleave(torch.arange(len(touched)), counts)[first]
        # windows around the candidates (window_left before, window_right after; -1 / 0 beyond the context)
        positions = tokens.shape[1]
        context, position = rows[order] // positions, rows[order] % positions
        span = position.unsqueeze(1) + torch.arange(-self.left, self.right + 1)
        inside = (span >= 0) & (span < positions)
        span = span.clamp(0, positions - 1)
        window_tokens = tokens[context.unsqueeze(1), span].to(torch.int32).masked_fill(~inside, -1)
        window_acts = latents[context.unsqueeze(1), span, cols[order].unsqueeze(1)] * inside
        shape = (len(touched), self.n_samples)
        new_keys = torch.full(shape, math.inf).index_put_((slot, rank), keys[order])
        new_tokens = torch.full((*shape, span.shape[1]), -1, dtype=torch.int32).index_put_((slot, rank), window_tokens)
        new_acts = torch.zeros(*shape, span.shape[1]).index_put_((slot, rank), window_acts)
        flat_keys = self.sample_keys.view(-1, self.n_samples)
        flat_tokens = self.sample_tokens.view(-1, self.n_samples, span.shape[1])
        flat_acts = self.sample_acts.view(-1, self.n_samples, span.shape[1])
        merged = self._keep_smallest_keys(
            torch.cat([flat_keys[touched], new_keys], 1),
            torch.cat([flat_tokens[touched], new_tokens], 1),
            torch.cat([flat_acts[touched], new_acts], 1),
        )
        flat_keys[touched], flat_tokens[touched], flat_acts[touched] = merged

    def _add_random_windows(self, tokens: Tensor, latents: Tensor, keep: Tensor, chunk: int = 32) -> None:
        """Offer this batch's counted tokens to the uniform window sample (each with a uniform random key)."""
        n = len(self.random_keys)
        if n == 0:
            return
        keys = torch.rand(tokens.shape, generator=self.generator).masked_fill_(~keep, math.inf).view(-1)
        keys, flat = keys.topk(min(n, len(keys)), largest=False)
        flat = flat[keys.isfinite()]
        keys = keys[keys.isfinite()]
        positions = tokens.shape[1]
        context, position = flat // positions, flat % positions
        span = position.unsqueeze(1) + torch.arange(-self.left, self.right + 1)
        inside = (span >= 0) & (span < positions)
        span = span.clamp(0, positions - 1)
        window_tokens = tokens[context.unsqueeze(1), span].to(torch.int32).masked_fill(~inside, -1)
        window_max = torch.zeros(len(flat), self.d_sae)
        for start in range(0, len(flat), chunk):  # (chunk, window, d_sae) at a time: d_sae may be large
            part = slice(start, start + chunk)
            acts = latents[context[part].unsqueeze(1), span[part]] * inside[part].unsqueeze(-1)
            window_max[part] = acts.amax(1).clamp_min(0)
        kept = torch.cat([self.random_keys, keys]).topk(n, largest=False).indices
        self.random_keys = torch.cat([self.random_keys, keys])[kept]
        self.random_tokens = torch.cat([self.random_tokens, window_tokens])[kept]
        self.random_max = torch.cat([self.random_max, window_max])[kept]

    def _add_top_contexts(self, tokens: Tensor, latents: Tensor) -> None:
        context_max, context_argmax = latents.max(dim=1)  # (contexts, d_sae)
        values, slot = torch.cat([self.top_values, context_max.T], dim=1).topk(self.k, dim=1)
        from_batch = slot >= self.k
        kept = slot.clamp_max(self.k - 1)
        contexts = self.top_contexts.gather(1, kept)
        positions = self.top_positions.gather(1, kept)
        window = self.top_tokens.shape[-1]
        win_tokens = self.top_tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, window)).clone()
        win_acts = self.top_acts.gather(1, kept.unsqueeze(-1).expand(-1, -1, window)).clone()
        latent, place = from_batch.nonzero(as_tuple=True)
        if len(latent):
            context = slot[latent, place] - self.k
            position = context_argmax[context, latent]
            contexts[latent, place] = self.n_contexts + context
            positions[latent, place] = position
            span = position.unsqueeze(1) + torch.arange(window)  # in padded coordinates
            padded_tokens = F.pad(tokens.to(torch.int32), (self.left, self.right), value=-1)
            padded_latents = F.pad(latents, (0, 0, self.left, self.right))
            win_tokens[latent, place] = padded_tokens[context.unsqueeze(1), span]
            win_acts[latent, place] = padded_latents[context.unsqueeze(1), span, latent.unsqueeze(1)]
        empty = values <= 0
        contexts[empty], positions[empty], win_tokens[empty], win_acts[empty] = -1, -1, -1, 0.0
        self.top_values, self.top_contexts, self.top_positions = values.clamp_min(0), contexts, positions
        self.top_tokens, self.top_acts = win_tokens, win_acts

    def result(self, logits: Mapping[str, Tensor] | None = None, info: Mapping[str, Any] | None = None) -> FeatureStats:
        return FeatureStats(
            n_tokens=self.n_tokens,
            firing_counts=self.firing_counts,
            activation_sums=self.activation_sums,
            max_activations=self.max_activations,
            histogram=self.histogram,
            bin_widths=self.bin_widths,
            top_values=self.top_values,
            top_contexts=self.top_contexts,
            top_positions=self.top_positions,
            top_tokens=self.top_tokens,
            top_acts=self.top_acts,
            window_left=self.left,
            token_set_names=list(self.token_sets),
            token_set_firings=self.token_set_firings,
            token_set_tokens=self.token_set_tokens,
            logits=dict(logits or {}),
            info=dict(info or {}),
            interval_tokens=self.sample_tokens,
            interval_acts=self.sample_acts,
            random_tokens=self.random_tokens[self.random_keys.isfinite()] if len(self.random_keys) else None,
            random_max=self.random_max[self.random_keys.isfinite()] if len(self.random_keys) else None,
        )
