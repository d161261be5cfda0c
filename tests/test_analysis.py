"""Analysis: splicing with hook points, edits and steering; streaming feature statistics; logit effects;
dashboard and Neuronpedia files (the browser test is in test_dashboard_browser.py)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.analysis import (
    FeatureStats,
    ablate,
    clamp,
    export_neuronpedia,
    feature_statistics,
    logit_effects,
    run_with_cache_and_saes,
    run_with_saes,
    sae_hook_names,
    spliced,
    steer,
    token_set,
    write_dashboard,
)
from saelab.core.files import FileFormatError
from saelab.data.config import DataConfig
from saelab.evals.heldout import heldout_contexts
from saelab.models import load_model
from saelab.models.hooks import UnknownHookError

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = load_model(str(save_tiny_model(folder / "model")))
    data = DataConfig(dataset=str(write_jsonl(folder / "text.jsonl", sentences(300))), context_size=16)
    with torch.no_grad():  # a final norm that is not all ones, so that folding it into W_U matters
        model.model.model.norm.weight.copy_(torch.rand(32) + 0.5)
    tokens = heldout_contexts(model, data, 4, 4)[0]
    return model, data, tokens


def random_sae(architecture="topk", **options):
    torch.manual_seed(1)
    sae = saelab.create_sae(architecture, d_in=32, d_sae=64, hook_name=HOOK, model_name="tiny", **options)
    with torch.no_grad():
        sae.b_enc.add_(0.1)
    return sae


def test_the_error_term_gives_exactly_the_clean_logits(tiny):
    model, _, tokens = tiny
    for sae in (random_sae(k=4), random_sae("standard"), random_sae("jumprelu")):
        clean = model.logits(tokens)
        assert torch.equal(run_with_saes(model, tokens, sae, error_term=True), clean)
        assert not torch.allclose(run_with_saes(model, tokens, sae), clean, atol=1e-3)  # the SAE alone changes them


def test_every_sae_hook_point_is_readable_and_consistent(tiny):
    model, _, tokens = tiny
    sae = random_sae(k=4)
    logits, cache = run_with_cache_and_saes(model, tokens, sae, error_term=True)
    assert set(cache) == set(sae_hook_names(sae))
    x, latents = cache[f"{HOOK}.hook_sae_input"], cache[f"{HOOK}.hook_sae_acts_post"]
    assert torch.allclose(latents, sae.encode(x)) and ((latents > 0).sum(-1) == 4).all()
    assert torch.allclose(cache[f"{HOOK}.hook_sae_recons"] + cache[f"{HOOK}.hook_sae_error"], x, atol=1e-5)
    assert torch.equal(cache[f"{HOOK}.hook_sae_output"], x)
    with pytest.raises(UnknownHookError, match="Did you mean .blocks.1.hook_resid_post.hook_sae_acts_post"):
        run_with_cache_and_saes(model, tokens, sae, names=[f"{HOOK}.hook_sae_acts"])


def test_zero_ablating_a_latent_moves_the_activation_by_its_decoder_contribution(tiny):
    model, _, tokens = tiny
    sae = random_sae(k=4)
    _, clean = run_with_cache_and_saes(model, tokens, sae, error_term=True)
    latents = clean[f"{HOOK}.hook_sae_acts_post"]
    latent = int((latents > 0).sum((0, 1)).argmax())  # one that fires somewhere
    _, ablated = run_with_cache_and_saes(
        model, tokens, sae, error_term=True, edit={f"{HOOK}.hook_sae_acts_post": ablate([latent])}
    )
    change = ablated[f"{HOOK}.hook_sae_output"] - clean[f"{HOOK}.hook_sae_output"]
    expected = -latents[..., latent : latent + 1] * sae.W_dec[latent].detach()
    assert torch.allclose(change, expected, atol=1e-5)
    assert ablated[f"{HOOK}.hook_sae_acts_post"][..., latent].abs().sum() == 0
    assert (latents[..., latent] > 0).any() and not torch.equal(change, torch.zeros_like(change))
    # clamping holds the latent at the value everywhere
    _, held = run_with_cache_and_saes(model, tokens, sae, edit={f"{HOOK}.hook_sae_acts_post": clamp([latent], 5.0)})
    assert (held[f"{HOOK}.hook_sae_acts_post"][..., latent] == 5.0).all()


def test_steering_adds_the_scaled_decoder_direction_at_the_hook(tiny):
    model, _, tokens = tiny
    sae = random_sae(k=4)
    with model.hooks(read=[HOOK, "blocks.2.hook_resid_post"]) as before:
        clean_logits = model.logits(tokens)
    before = dict(before)
    with steer(model, sae, latent=7, coefficient=3.0), model.hooks(read=[HOOK, "blocks.2.hook_resid_post"]) as after:
        steered_logits = model.logits(tokens)
    assert torch.allclose(after[HOOK] - before[HOOK], 3.0 * sae.W_dec[7].detach().expand_as(before[HOOK]), atol=1e-5)
    assert not torch.allclose(steered_logits, clean_logits)
    with steer(model, sae, latent=7, coefficient=3.0, positions=slice(2, 3)), model.hooks(read=[HOOK]) as partial:
        model.logits(tokens)
    moved = (partial[HOOK] - before[HOOK]).abs().sum(-1) > 1e-6
    assert moved[:, 2].all() and moved.sum() == tokens.shape[0]


def test_several_saes_and_model_hooks_read_in_one_pass(tiny):
    model, _, tokens = tiny
    first, second = random_sae(k=4), random_sae(k=2)
    second.cfg.hook_name = "blocks.2.hook_resid_post"
    names = [f"{HOOK}.hook_sae_acts_post", "blocks.2.hook_resid_post.hook_sae_input", "blocks.0.hook_resid_post"]
    with torch.no_grad(), spliced(model, [first, second], read=names) as cache:
        model.logits(tokens)
    assert set(names) <= set(cache)
    with pytest.raises(ValueError, match="same hook point"):
        with spliced(model, [first, random_sae(k=2)]):
            pass


def test_logit_effects_equal_W_dec_times_the_unembedding_by_hand(tiny):
    model, _, _ = tiny
    sae = random_sae(k=4)
    effects = logit_effects(sae, model, n=5, chunk=16)
    W_U = model.model.lm_head.weight.detach() * model.model.model.norm.weight.detach()
    by_hand = sae.W_dec.detach() @ W_U.T
    top = by_hand.topk(5, dim=1)
    assert torch.allclose(effects["top_values"], top.values, atol=1e-5)
    assert torch.equal(effects["top_ids"], top.indices)
    assert torch.allclose(effects["bottom_values"], -(-by_hand).topk(5, dim=1).values, atol=1e-5)
    assert (effects["histogram"].sum(1) == by_hand.shape[1]).all()
    assert torch.allclose(effects["histogram_range"][:, 1], by_hand.max(1).values, atol=1e-5)


def test_feature_statistics_on_a_model_finds_the_real_contexts(tiny, tmp_path):
    model, data, _ = tiny
    sae = random_sae(k=4)
    stats = feature_statistics(
        sae,
        model,
        data,
        n_contexts=16,
        batch_contexts=4,
        top_k=3,
        window=(4, 2),
        token_sets={"cat": token_set(model.tokenizer, ["cat"])},
    )
    contexts = torch.cat(heldout_contexts(model, data, 16, 4))
    latent = int(stats.firing_counts.argmax())
    context, position = int(stats.top_contexts[latent, 0]), int(stats.top_positions[latent, 0])
    x = model.run_with_cache(contexts[context : context + 1], [HOOK])[HOOK]
    actual = sae.encode(x)[0, :, latent].detach()
    assert float(actual[position]) == pytest.approx(float(stats.top_values[latent, 0]), rel=1e-5)
    assert stats.top_tokens[latent, 0, 4] == contexts[context, position]
    assert stats.n_tokens == int((contexts != model.tokenizer.bos_token_id).sum())
    assert stats.logits and stats.token_set_names == ["cat"]
    stats.save(tmp_path / "stats.safetensors")
    loaded = FeatureStats.load(tmp_path / "stats.safetensors")
    assert torch.equal(loaded.top_tokens, stats.top_tokens) and loaded.info == stats.info
    assert torch.equal(loaded.logits["top_ids"], stats.logits["top_ids"]) and loaded.token_set_names == ["cat"]
    data_bytes = (tmp_path / "stats.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(FileFormatError, match="cut.safetensors"):
        FeatureStats.load(tmp_path / "cut.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "stats.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(tmp_path / "stats.safetensors")
    del tensors["top_tokens"]  # a well-formed file missing one of the statistics
    save_file(tensors, tmp_path / "partial.safetensors", metadata=metadata)
    with pytest.raises(FileFormatError, match="partial.safetensors: not a saelab feature-statistics file"):
        FeatureStats.load(tmp_path / "partial.safetensors")


def read_script(path, call):
    text = path.read_text()
    assert text.startswith(call + "(") and text.rstrip().endswith(");")
    return text[len(call) + 1 : text.rstrip().rindex(")")]


def test_dashboard_files_hold_every_latent_and_replace_an_old_dashboard(tiny, tmp_path):
    model, data, _ = tiny
    stats = feature_statistics(random_sae(k=4), model, data, n_contexts=8, batch_contexts=4, top_k=2)
    out = tmp_path / "dash"
    index = write_dashboard(stats, model.tokenizer, out, chunk_size=16)
    assert index == out / "index.html" and (out / "latent.html").exists() and (out / "dashboard.js").exists()
    table = json.loads(read_script(out / "data" / "index.js", "saelab.index"))
    assert [row["id"] for row in table["latents"]] == list(range(64)) and table["chunk_size"] == 16
    chunk = read_script(out / "data" / "chunk_0001.js", "saelab.chunk")
    number, records = chunk.split(",", 1)
    records = json.loads(records)
    assert number == "1" and [r["id"] for r in records] == list(range(16, 32))
    fired = next(r for r in records if r["contexts"])
    context = fired["contexts"][0]
    assert len(context["tokens"]) == len(context["acts"])
    assert context["acts"][context["at"]] == pytest.approx(context["value"], rel=1e-3)
    assert len(fired["promoted"]) == 10 and all(isinstance(t, str) for t, _ in fired["promoted"])
    (out / "data" / "old.js").write_text("stale")
    write_dashboard(stats, model.tokenizer, out, chunk_size=32)  # replaces the whole folder
    assert not (out / "data" / "old.js").exists() and (out / "data" / "chunk_0001.js").exists()
    assert not (out / "data" / "chunk_0002.js").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saelab dashboard"):
        write_dashboard(stats, model.tokenizer, other)
    assert (other / "mine.txt").read_text() == "keep me"


def test_neuronpedia_export_has_their_batch_format(tiny, tmp_path):
    """What Neuronpedia's importer (convert-saedashboard-to-neuronpedia-export) reads, as SAEDashboard writes it."""
    model, data, _ = tiny
    stats = feature_statistics(random_sae(k=4), model, data, n_contexts=8, batch_contexts=4, top_k=2, window=(5, 2))
    out = export_neuronpedia(
        stats, model.tokenizer, tmp_path / "np", model_id="tiny", sae_set="res-test", layer=1, features_per_batch=50
    )
    batches = sorted(out.glob("batch-*.json"))
    assert [b.name for b in batches] == ["batch-0.json", "batch-1.json"]
    first = json.loads(batches[0].read_text())
    assert (first["model_id"], first["layer"], first["sae_set"], first["sae_id_suffix"]) == ("tiny", 1, "res-test", "")
    features = first["features"] + json.loads(batches[1].read_text())["features"]
    assert [f["feature_index"] for f in features] == list(range(64))
    feature = max(features, key=lambda f: len(f["activations"]))
    for key in (
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "frac_nonzero",
        "freq_hist_data_bar_values",
        "freq_hist_data_bar_heights",
        "logits_hist_data_bar_values",
        "logits_hist_data_bar_heights",
        "n_prompts_total",
        "n_tokens_in_prompt",
        "dataset",
        "neuron_alignment_indices",
        "decoder_weights_dist",
    ):
        assert key in feature
    assert feature["n_tokens_in_prompt"] == 5 + 1 + 2  # the windows shown, not the 16-token contexts
    latent = feature["feature_index"]
    top, intervals = feature["activations"][:2], feature["activations"][2:]
    assert [(a["bin_min"], a["bin_contains"]) for a in top] == [(-1, -1)] * 2
    assert max(top[0]["values"]) == pytest.approx(top[0]["bin_max"], abs=1e-3)
    assert intervals, "activations sampled per interval of the activation range follow the top contexts"
    for activation in feature["activations"]:
        assert len(activation["tokens"]) == len(activation["values"]) <= 8
        qualifying = activation["values"][activation["qualifying_token_index"]]
        if activation["bin_min"] >= 0:
            assert activation["bin_min"] - 1e-3 <= qualifying <= activation["bin_max"] + 1e-3
    bins = {(a["bin_min"], a["bin_max"]): a["bin_contains"] for a in intervals}
    assert [low for low, _ in bins] == sorted((low for low, _ in bins), reverse=True)  # highest interval first
    in_bins = sum(contains for contains in bins.values()) * stats.n_tokens
    assert in_bins <= int(stats.firing_counts[latent]) + 1e-6 and in_bins > 0
    assert sum(feature["freq_hist_data_bar_heights"]) == int(stats.firing_counts[latent])
    assert json.loads((out / "run_settings.json").read_text())["n_features"] == 64


def test_neuronpedia_export_refuses_an_unknown_layer(tiny, tmp_path):
    model, data, _ = tiny
    stats = feature_statistics(random_sae(k=4), model, data, n_contexts=4, batch_contexts=4, top_k=1)
    assert stats.info["hook_layer"] == 1  # the model's layer of the SAE's hook, blocks.1.hook_resid_post
    out = export_neuronpedia(stats, model.tokenizer, tmp_path / "np", model_id="tiny", sae_set="s")
    assert json.loads((out / "batch-0.json").read_text())["layer"] == 1
    stats.info["hook_layer"] = None  # e.g. statistics of an SAE read from a hook outside the blocks
    with pytest.raises(ValueError, match="layer of this SAE's hook .* is not known"):
        export_neuronpedia(stats, model.tokenizer, tmp_path / "np2", model_id="tiny", sae_set="s")
    assert not (tmp_path / "np2").exists()


def test_dashboard_command(tiny, tmp_path, capsys):
    from saelab.cli import main

    model, data, _ = tiny
    sae = random_sae(k=4)
    sae.cfg.model_name = str(model.model.name_or_path)
    sae.cfg.metadata.update({"dataset": data.dataset, "context_size": data.context_size})
    sae.save(str(tmp_path / "sae"))
    code = main(
        [
            "dashboard",
            str(tmp_path / "sae"),
            "--n_contexts",
            "8",
            "--batch_contexts",
            "4",
            "--top_k",
            "2",
            "--neuronpedia",
            str(tmp_path / "np"),
            "--neuronpedia_sae_set",
            "test",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dashboard ->" in printed and (tmp_path / "sae" / "dashboard" / "index.html").exists()
    assert (tmp_path / "sae" / "feature_stats.safetensors").exists() and (tmp_path / "np" / "batch-0.json").exists()
    assert json.loads((tmp_path / "np" / "batch-0.json").read_text())["layer"] == 1  # from the hook, not cfg
    with pytest.raises(SystemExit) as exit_info:
        main(["dashboard", str(tmp_path / "sae"), "--n_contxts", "8"])
    assert exit_info.value.code == 2 and "did you mean --n_contexts" in capsys.readouterr().err
