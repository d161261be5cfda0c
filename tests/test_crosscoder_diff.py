"""Model diffing: one crosscoder over the same hook point of two models (model.compare_with, '<hook>@compare'),
and the relative decoder norms that sort its latents into A-only, B-only and shared."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import save_tiny_model, sentences, word_tokenizer, write_jsonl

import saelab
from saelab.activations import TensorSource
from saelab.activations.harvest import make_harvester
from saelab.analysis import decoder_cosines, diff_summary, relative_decoder_norms
from saelab.core.errors import ConfigError
from saelab.data.config import DataConfig
from saelab.data.tokens import training_contexts
from saelab.evals import explained_variance
from saelab.io.load import load_sae
from saelab.models import load_model
from saelab.models.pair import COMPARED, ModelPair
from saelab.training import TrainConfig, Trainer

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base model folder, a perturbed copy of it with the same tokenizer, a dataset)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("pair")
    base = save_tiny_model(folder / "base")
    tuned = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tuned.save_pretrained(folder / "tuned")
    word_tokenizer().save_pretrained(folder / "tuned")
    return str(base), str(folder / "tuned"), str(write_jsonl(folder / "text.jsonl", sentences(400)))


def test_the_harvest_reads_the_compared_model_on_the_same_tokens(pair):
    base, tuned, dataset = pair
    first, second = load_model(base), load_model(tuned)
    data = DataConfig(dataset=dataset, context_size=16, contexts_per_batch=4)
    harvester = make_harvester(ModelPair(first, second), data, [HOOK, HOOK + COMPARED])
    tokens = next(iter(training_contexts(data, first.tokenizer)))
    rows, row_tokens = harvester(tokens)
    keep = ~torch.isin(tokens, torch.tensor([0, 1, 2, 3]))  # the word tokenizer's special tokens are left out
    assert keep.sum() < keep.numel() and torch.equal(row_tokens, tokens[keep])
    directly = {name: m.run_with_cache(tokens, [HOOK])[HOOK][keep] for name, m in (("a", first), ("b", second))}
    torch.testing.assert_close(rows[HOOK], directly["a"])
    torch.testing.assert_close(rows[HOOK + COMPARED], directly["b"])
    assert not torch.allclose(directly["a"], directly["b"], atol=1e-2)  # two different models
    # without a second model, a '@compare' hook is a clear error
    with pytest.raises(ConfigError, match="model.compare_with"):
        make_harvester(first, data, [HOOK + COMPARED])


def run_config(pair, out, **model):
    base, tuned, dataset = pair
    return {
        "model": {"name": base, "compare_with": tuned, "hook_name": HOOK, **model},
        "data": {"dataset": dataset, "context_size": 16, "contexts_per_batch": 8, "shuffle_buffer": 256},
        "train": {"total_tokens": 1024, "batch_size": 128, "progress_bar": False, "eval_every": 0},
        "sae": {"architecture": "crosscoder", "hook_names": [HOOK, HOOK + COMPARED], "expansion_factor": 2},
        "out_dir": str(out),
    }


def test_a_run_trains_a_crosscoder_on_two_models(pair, tmp_path):
    cc = saelab.train(run_config(pair, tmp_path / "run"))["sae"]
    assert cc.cfg.input_hooks() == [HOOK, HOOK + COMPARED] and cc.cfg.d_in == 64 and cc.cfg.d_sae == 128
    assert cc.cfg.hook_name == HOOK and cc.cfg.hook_layer == 1
    assert cc.cfg.metadata["compare_with"] == pair[1]
    saved = load_sae(tmp_path / "run" / "sae")
    assert saved.cfg.hook_names == [HOOK, HOOK + COMPARED]
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in cc.state_dict().items())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sae"]["tokens"] >= 1024


def test_two_models_with_different_tokenizers_are_refused(pair, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(pair[1], other)
    vocab = {token: i for i, token in enumerate(word_tokenizer().get_vocab())}
    vocab["zebra"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(other)
    with pytest.raises(ConfigError, match="different tokenizer"):
        saelab.train(run_config(pair, tmp_path / "run", compare_with=str(other)))
    assert not (tmp_path / "run").exists()


def test_compare_with_and_an_activation_cache_are_refused(pair, tmp_path):
    config = run_config(pair, tmp_path / "run")
    config["data"]["cache"] = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.cache holds one model"):
        saelab.train(config)


def test_hook_names_and_layers_are_not_both_given():
    with pytest.raises(ConfigError, match="not both"):
        saelab.create_sae("crosscoder", 8, 4, hook_names=["a", "b"], layers=[1, 2])
    from saelab.runs.specs import spec_hooks

    with pytest.raises(ConfigError, match="not both"):
        spec_hooks({"hook_name": "blocks.{layer}.x", "layers": [0, 1], "hook_names": ["a", "b"]})
    with pytest.raises(ConfigError, match="not one of hook_names"):
        saelab.create_sae("crosscoder", 8, 4, hook_names=["a", "b"], hook_name="c")


def test_relative_norms_of_hand_set_decoders():
    cc = saelab.create_sae("crosscoder", 2 * 4, 3, hook_names=[HOOK, HOOK + COMPARED])
    direction = torch.tensor([1.0, 2.0, 0.0, -1.0])
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, :4] = direction  # writes to model A only
        cc.W_dec[1, 4:] = direction  # model B only
        cc.W_dec[2] = torch.cat([direction, -2 * direction])  # both, opposite directions, twice as much into B
    torch.testing.assert_close(relative_decoder_norms(cc), torch.tensor([0.0, 1.0, 2 / 3]))
    torch.testing.assert_close(decoder_cosines(cc)[2], torch.tensor(-1.0))
    torch.testing.assert_close(relative_decoder_norms(cc, a=1, b=0), torch.tensor([1.0, 0.0, 1 / 3]))
    summary = diff_summary(cc)
    assert summary.pop("shared_median_cosine") == pytest.approx(-1.0)
    assert summary == {"latents": 3, "a_only": 1, "b_only": 1, "shared": 1}
    with pytest.raises(IndexError, match="two different blocks"):
        relative_decoder_norms(cc, a=0, b=2)


def test_relative_norms_sort_planted_features():
    """Planted features: 6 in both models (in different directions), 6 in A only, 6 in B only."""
    d = 12
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(18, 2, d, generator=g)
    directions[6:12, 1] = 0
    directions[12:, 0] = 0
    directions /= directions.flatten(1).norm(dim=1).view(-1, 1, 1)

    def sample(n, seed):
        gen = torch.Generator().manual_seed(seed)
        codes = torch.rand(n, 18, generator=gen) * (torch.rand(n, 18, generator=gen) < 2 / 18)
        return torch.einsum("nf,fld->nld", codes, directions).reshape(n, 2 * d)

    torch.manual_seed(0)
    cc = saelab.create_sae(
        "crosscoder",
        2 * d,
        36,
        hook_names=[HOOK, HOOK + COMPARED],
        l1_coefficient=0.5,
        normalize_activations="expected_average_only_in",
    )
    config = TrainConfig(total_tokens=256 * 500, batch_size=256, lr=3e-3, progress_bar=False)
    trained = Trainer(cc, config).fit(TensorSource(sample(8192, 1), 256))["sae"]
    x = sample(2048, 2)
    with torch.no_grad():
        assert explained_variance(x, trained(x)) > 0.9
        cos = torch.nn.functional.normalize(trained.W_dec, dim=1) @ directions.flatten(1).T
        best = cos.argmax(dim=0)  # the latent that best matches each planted feature
    assert float(cos.max(dim=0).values.mean()) > 0.9
    r = relative_decoder_norms(trained)
    assert bool(((r[best[:6]] > 0.3) & (r[best[:6]] < 0.7)).all()), r[best[:6]]
    assert bool(r[best[6:12]].lt(0.1).all()) and bool(r[best[12:]].gt(0.9).all()), r[best[6:]]
    summary = diff_summary(trained)
    assert summary["a_only"] >= 6 and summary["b_only"] >= 6 and summary["shared"] >= 6
