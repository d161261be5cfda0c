"""Activations of short texts at a hook point, one row per text: what the probing and absorption evals read.

Texts are tokenised as the SAE's training data was (a BOS first when it had one), batched by length with right
padding and an attention mask, and each text's activations are reduced to one row: the mean over its tokens
(special tokens left out), its last token, or a given position. `encoders` map the per-token activations first
(an SAE's `encode`, say), so one model pass gives the raw rows and the SAE's latents alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

Pooling = Literal["mean", "last"]


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = 128, prepend_bos: bool = True) -> list[list[int]]:
    """Token ids of each text (no special tokens added by the tokenizer), a BOS first when `prepend_bos` and the
    tokenizer has one, cut to `max_length` tokens."""
    bos = tokenizer.bos_token_id if prepend_bos else None
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([bos] if bos is not None else []) + list(ids)
        out.append(ids[:max_length])
    return out


def pooled_activations(
    model,
    token_lists: Sequence[Sequence[int]],
    hook: str,
    pooling: Pooling | Sequence[int] = "mean",
    encoders: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    exclude_ids: Sequence[int] = (),
    batch_size: int = 16,
) -> dict[str, Tensor]:
    """One row per token list: `pooling` "mean" (over the tokens not in `exclude_ids`), "last", or a position per
    list (negative counts from the end). Returns {name: [n, width]} float32 on the CPU for each encoder (default:
    {"acts": the activations themselves})."""
    encoders = dict(encoders or {"acts": lambda x: x})
    positions = None if isinstance(pooling, str) else list(pooling)
    if positions is not None and len(positions) != len(token_lists):
        raise ValueError(f"{len(positions)} positions given for {len(token_lists)} token lists")
    device = next(model.model.parameters()).device
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))  # little padding per batch
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    excluded = torch.tensor(list(exclude_ids), dtype=torch.long)
    rows: dict[str, list[tuple[int, Tensor]]] = {name: [] for name in encoders}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        longest = max(len(token_lists[i]) for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(token_lists[i])] = torch.tensor(list(token_lists[i]), dtype=torch.long)
            mask[row, : len(token_lists[i])] = 1
        acts = model.run_with_cache(ids.to(device), [hook], attention_mask=mask.to(device))[hook].float()
        selected = []
        for row, i in enumerate(batch):
            n = len(token_lists[i])
            x = acts[row, :n]
            if pooling == "mean":
                keep = ~torch.isin(ids[row, :n], excluded)
                x = x[keep.to(x.device)] if bool(keep.any()) else x
            elif pooling == "last":
                x = x[n - 1 :]
            else:
                assert positions is not None
                p = positions[i] if positions[i] >= 0 else n + positions[i]
                if not 0 <= p < n:
                    raise ValueError(f"position {positions[i]} is outside text {i} ({n} tokens)")
                x = x[p : p + 1]
            selected.append(x)
        counts = [len(x) for x in selected]
        for name, encode in encoders.items():
            with torch.no_grad():  # every selected token of the batch encoded at once, then averaged per text
                encoded = encode(torch.cat(selected)).float().cpu()
            for i, part in zip(batch, encoded.split(counts), strict=True):
                rows[name].append((i, part.mean(0)))
    return {name: torch.stack([v for _, v in sorted(values, key=lambda t: t[0])]) for name, values in rows.items()}
