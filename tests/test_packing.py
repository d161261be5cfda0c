"""Packing tokenised documents into contexts."""

from __future__ import annotations

import pytest
import torch

from saelab.data.packing import pack_tokens

DOCS = [[10, 11, 12], [20, 21], [], [30, 31, 32, 33, 34], [40]]


def test_every_context_starts_with_bos_and_has_the_full_length():
    contexts = list(pack_tokens(DOCS, context_size=4, bos_token_id=1))
    assert all(c.shape == (4,) and c[0] == 1 and c.dtype == torch.long for c in contexts)


def test_the_stream_is_the_documents_joined_by_the_separator():
    contexts = list(pack_tokens(DOCS, context_size=4, bos_token_id=1, separator_token_id=2))
    stream = [t for c in contexts for t in c[1:].tolist()]
    joined = [10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 34, 2, 40]
    assert stream == joined[: len(stream)]
    assert len(stream) == len(joined) // 3 * 3  # only the ragged tail is dropped


def test_separator_defaults_to_bos_and_no_bos_means_plain_chunks():
    with_bos = list(pack_tokens(DOCS, context_size=5, bos_token_id=1))
    assert with_bos[0].tolist() == [1, 10, 11, 12, 1]
    plain = list(pack_tokens(DOCS, context_size=5, bos_token_id=None))
    assert plain[0].tolist() == [10, 11, 12, 20, 21]


def test_context_must_leave_room_after_bos():
    with pytest.raises(ValueError, match="no room"):
        list(pack_tokens(DOCS, context_size=1, bos_token_id=1))
