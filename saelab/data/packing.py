"""Token packing: documents concatenated into fixed-length contexts, as SAELens builds its training contexts.

Documents are joined with a separator token (BOS by default) so the model sees where one ends, the stream is
cut into pieces of `context_size - 1` tokens, and each piece gets a BOS in front so every context starts the
way the model was trained. The ragged tail is dropped; the order is the documents' order (deterministic).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from saelab.core.errors import ConfigError


def pack_tokens(
    documents: Iterable[list[int]],
    context_size: int,
    bos_token_id: int | None,
    separator_token_id: int | None = None,
) -> Iterator[Tensor]:
    """Contexts `(context_size,)` of token ids from tokenised documents.

    With `bos_token_id` None no BOS is prepended (the whole context is document tokens). The separator goes
    between documents; None means the BOS token (or nothing when there is no BOS either).
    """
    if separator_token_id is None:
        separator_token_id = bos_token_id
    prefix = [] if bos_token_id is None else [bos_token_id]
    body = context_size - len(prefix)
    if body < 1:
        raise ConfigError(f"context_size {context_size} leaves no room for tokens after BOS")
    buffer: list[int] = []
    first = True
    for tokens in documents:
        if not tokens:
            continue
        if not first and separator_token_id is not None:
            buffer.append(separator_token_id)
        first = False
        buffer.extend(tokens)
        while len(buffer) >= body:
            yield torch.tensor(prefix + buffer[:body], dtype=torch.long)
            buffer = buffer[body:]
