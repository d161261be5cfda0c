"""The data pipeline on a tiny local model: text sources, contexts, shuffle buffer, activation store, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import save_tiny_model, sentences, write_jsonl

from saelab.activations.cache import CachedActivations, write_activation_cache
from saelab.activations.harvest import ActivationStore, Harvester
from saelab.activations.shuffle_buffer import ShuffleBuffer
from saelab.core.files import FileFormatError
from saelab.data.config import DataConfig
from saelab.data.text import DatasetFormatError, iter_documents
from saelab.data.tokens import ContextBatches, iter_contexts, pretokenize
from saelab.models import UnknownHookError, load_model

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = load_model(str(save_tiny_model(folder / "model")))
    data = write_jsonl(folder / "text.jsonl", sentences(400))
    return model, data


def data_config(path: Path, **options) -> DataConfig:
    return DataConfig(dataset=str(path), context_size=16, contexts_per_batch=4, shuffle_buffer=256, **options)


# ----- text and contexts -----------------------------------------------------------------------------------
def test_local_text_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    write_jsonl(tmp_path / "b.jsonl", ["second", "third"])
    assert list(iter_documents(str(tmp_path))) == ["first document", "second", "third"]
    (tmp_path / "tokens.jsonl").write_text('{"input_ids": [5, 6, 7]}\n')
    assert list(iter_documents(str(tmp_path / "tokens.jsonl"))) == [[5, 6, 7]]


def test_dataset_without_the_text_column_names_the_columns(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["hello"], column="content")
    with pytest.raises(DatasetFormatError, match="no text column 'text' \\(columns: content\\)"):
        list(iter_documents(str(tmp_path / "d.jsonl")))
    assert list(iter_documents(str(tmp_path / "d.jsonl"), text_column="content")) == ["hello"]


def test_contexts_start_with_bos_and_resume_at_their_position(tiny):
    model, data = tiny
    config = data_config(data)
    first = ContextBatches(config, model.tokenizer)
    stream = iter(first)
    batches = [next(stream) for _ in range(5)]
    assert all(b.shape == (4, 16) and (b[:, 0] == model.tokenizer.bos_token_id).all() for b in batches)
    resumed = ContextBatches(config, model.tokenizer)
    resumed.load_state_dict({"position": 12})
    assert torch.equal(next(iter(resumed)), batches[3])


def test_pretokenized_shards_give_the_same_contexts(tiny, tmp_path):
    model, data = tiny
    config = data_config(data)
    out = pretokenize(config, model.tokenizer, tmp_path / "tokens", shard_contexts=7)
    assert len(list(out.glob("tokens-*.safetensors"))) > 1
    direct = list(iter_contexts(config, model.tokenizer))
    from_shards = list(iter_contexts(data_config(out), model.tokenizer))
    assert len(direct) == len(from_shards) and all(torch.equal(a, b) for a, b in zip(direct, from_shards, strict=True))
    with pytest.raises(ValueError, match="holds contexts of 16 tokens"):
        next(iter_contexts(DataConfig(dataset=str(out), context_size=32), model.tokenizer))
    with pytest.raises(FileExistsError):
        pretokenize(config, model.tokenizer, out)


# ----- shuffle buffer --------------------------------------------------------------------------------------
def test_shuffle_buffer_keeps_every_row_once_mixes_them_and_stays_bounded():
    buffer = ShuffleBuffer(capacity=64, batch_size=16, seed=0)
    rows = torch.arange(1000, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    out = []
    for start in range(0, 1000, 40):
        block = rows[start : start + 40]
        while block.shape[0]:
            block = block[buffer.add(block) :]
            if buffer.full:
                out.append(buffer.draw())
        assert buffer.store is not None and buffer.store.shape == (64, 3) and buffer.size <= 64
    out += list(buffer.drain())
    seen = torch.cat(out)[:, 0]
    assert all(b.shape == (16, 3) for b in out)
    assert len(seen) == 992 and len(set(seen.tolist())) == 992  # 1000 rows, the last 8 do not fill a batch
    assert not torch.equal(seen, torch.sort(seen).values)  # shuffled
    first_batch = out[0][:, 0]
    assert first_batch.max() > 16  # drawn from the whole buffer, not the first rows in


# ----- harvesting ------------------------------------------------------------------------------------------
def test_harvester_drops_special_tokens_and_slices_positions(tiny):
    model, data = tiny
    tokens = next(iter(ContextBatches(data_config(data), model.tokenizer)))
    full = model.run_with_cache(tokens, [HOOK])[HOOK]
    everything, ids = Harvester(model, [HOOK])(tokens)
    assert torch.equal(everything[HOOK], full.reshape(-1, full.shape[-1])) and torch.equal(ids, tokens.reshape(-1))
    special = [model.tokenizer.bos_token_id]
    rows, ids = Harvester(model, [HOOK], exclude_token_ids=special, seq_start=2, seq_end=10)(tokens)
    window = tokens[:, 2:10]
    keep = window != special[0]
    assert torch.equal(rows[HOOK], full[:, 2:10][keep]) and torch.equal(ids, window[keep])
    with pytest.raises(UnknownHookError, match="Valid names: blocks.0.hook_resid_pre"):
        Harvester(model, ["blocks.1.hook_resid_pots"])


def test_activation_store_batches_and_resume_position(tiny):
    model, data = tiny
    config = data_config(data)
    harvester = Harvester(model, [HOOK, "blocks.0.hook_mlp_out"])
    store = ActivationStore(harvester, ContextBatches(config, model.tokenizer), batch_size=32, buffer_size=128)
    stream = iter(store)
    batch = next(stream)
    assert set(batch) == {HOOK, "blocks.0.hook_mlp_out"} and batch[HOOK].shape == (32, 32)
    assert store.state_dict()["contexts"]["position"] > 0


# ----- the on-disk cache -----------------------------------------------------------------------------------
def test_cache_round_trip_gives_the_same_activations(tiny, tmp_path):
    model, data = tiny
    config = data_config(data)
    harvester = Harvester(model, [HOOK], exclude_token_ids=[model.tokenizer.bos_token_id])
    contexts = ContextBatches(config, model.tokenizer, loop=False)
    cache = write_activation_cache(harvester, contexts, tmp_path / "cache", max_tokens=500, shard_rows=128)
    expected, expected_ids = [], []
    for tokens in ContextBatches(config, model.tokenizer, loop=False):
        rows, ids = harvester(tokens)
        expected.append(rows[HOOK])
        expected_ids.append(ids)
    expected, expected_ids = torch.cat(expected)[:500], torch.cat(expected_ids)[:500]
    reader = CachedActivations(cache, batch_size=20, buffer_size=100, loop=False)
    stored = torch.cat([reader.read_shard(i) for i in range(len(reader.metadata["shards"]))])
    assert torch.equal(stored, expected)
    from saelab.core.files import read_safetensors

    ids = torch.cat([read_safetensors(cache / s["file"])["token_ids"] for s in reader.metadata["shards"]])
    assert torch.equal(ids.long(), expected_ids)
    # shuffled reading gives every row exactly once per epoch
    served = torch.cat(list(reader))
    assert served.shape == (500, 32)
    assert torch.allclose(served.sum(0), expected.sum(0), atol=1e-3)
    assert not torch.equal(served, expected)


def test_unreadable_cache_shard_is_one_clear_error(tiny, tmp_path):
    model, data = tiny
    harvester = Harvester(model, [HOOK])
    contexts = ContextBatches(data_config(data), model.tokenizer, loop=False)
    cache = write_activation_cache(harvester, contexts, tmp_path / "cache", max_tokens=300, shard_rows=100)
    shard = cache / "acts-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated
    reader = CachedActivations(cache, batch_size=10, buffer_size=50, loop=False)
    with pytest.raises(FileFormatError, match="acts-00001.safetensors: not a valid safetensors file"):
        list(reader)


def test_failed_cache_leaves_nothing_behind(tiny, tmp_path):
    model, data = tiny

    def failing():
        yield from list(ContextBatches(data_config(data), model.tokenizer, loop=False))[:2]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_activation_cache(Harvester(model, [HOOK]), failing(), tmp_path / "cache", 10_000, shard_rows=16)
    assert list(tmp_path.iterdir()) == []


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one document", "another"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert list(iter_documents(str(tmp_path / "d.parquet"), text_column="body")) == ["one document", "another"]
    with pytest.raises(DatasetFormatError, match="columns: body, id"):
        list(iter_documents(str(tmp_path / "d.parquet")))


def test_saved_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a saved document", "and another"]}).save_to_disk(tmp_path / "single")
    assert list(iter_documents(str(tmp_path / "single"))) == ["a saved document", "and another"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[4, 5, 6]]})})
    splits.save_to_disk(tmp_path / "splits")
    assert list(iter_documents(str(tmp_path / "splits"))) == [[4, 5, 6]]
    with pytest.raises(DatasetFormatError, match="no split 'test' \\(splits: train\\)"):
        list(iter_documents(str(tmp_path / "splits"), split="test"))
