"""The absorption eval: SAEBench's per-word formulas by hand, absorption found on planted hierarchical features
when a child latent absorbs its parent and not when the SAE has clean latents, the first-letter prompts, and the
whole eval on a tiny local model (and, with -m slow, on the default model)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import WORDS, save_tiny_model, word_tokenizer

import saelab
from saelab.core.config import from_dict
from saelab.core.errors import ConfigError
from saelab.core.files import read_safetensors
from saelab.evals import first_letter as fl
from saelab.evals.absorption import (
    AbsorptionConfig,
    AbsorptionTask,
    absorption_on_task,
    ground_truth_probe,
    plot_absorption,
    run_absorption,
    split_feature_count,
    word_absorption,
)
from saelab.evals.probes import binary_metrics, train_probe
from saelab.evals.results import read_result, write_result
from saelab.models import load_model
from saelab.synthetic import PlantedFeatures

HOOK = "blocks.1.hook_resid_post"


def hand_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, hook: str | None = None) -> saelab.SAE:
    """A standard (ReLU) SAE with the given weights and zero biases."""
    sae = saelab.create_sae("standard", d_in=W_enc.shape[0], d_sae=W_enc.shape[1], hook_name=hook)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ----- the per-word formulas ---------------------------------------------------------------------------------------


def test_word_absorption_follows_saebench_formulas_by_hand():
    """Probe e0. Latent 0 (main) reads x1 and writes e0; latent 1 reads x2 and writes 0.8 e0 + 0.6 e1 (cos 0.8);
    latent 2 reads x3 and writes a row of cos 0.05 with the probe (too weak to absorb a fraction, enough to count
    for full absorption)."""
    W_enc = torch.zeros(4, 3)
    W_enc[1, 0] = W_enc[2, 1] = W_enc[3, 2] = 1.0
    W_dec = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0.05, 0, 0, math.sqrt(1 - 0.05**2)]])
    sae = hand_sae(W_enc, W_dec)
    x = torch.tensor(
        [
            [1.5, 0.5, 1.25, 0],  # P 1.5, M 0.5, A 1.0 -> a = min(1, 1) -> 1 / 1.5
            [2.0, 0.5, 3.0, 0],  # P 2, M 0.5, A 2.4 -> a = min(2.4, 1.5) -> 1.5 / 2
            [1.0, 0, 1.0, 0],  # M 0, A 0.8 >= 0.4 P: fraction 1; main silent, top cos 0.8, 0.8 >= 0.4: full
            [1.0, 0, 0.25, 0],  # A 0.2 < 0.4 P: no absorption
            [-1.0, 0.5, 1.0, 0],  # P < 0: no absorption
            [1.0, 2.0, 1.0, 0],  # M >= P: no absorption
            [1.0, 0, 0, 30.0],  # only latent 2 projects (1.5): cos 0.05 < 0.1 -> fraction 0, but full
        ]
    )
    out = word_absorption(x, torch.tensor([3.0, 0, 0, 0]), sae, main_latents=[0])  # the probe's norm is irrelevant
    expected = torch.tensor([1 / 1.5, 0.75, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(out["absorption_fraction"], expected, atol=1e-6)
    assert out["is_full_absorption"].tolist() == [False, False, True, False, False, False, True]
    assert torch.allclose(out["probe_projection"], x[:, 0])
    assert out["top_latent"].tolist()[2:] == [1, 1, 1, 0, 2]
    assert out["top_latent_cos"][-1] == pytest.approx(0.05)


def test_word_absorption_reads_the_sae_as_folded_to_unit_decoder_rows():
    """Scaling a latent by s and its decoder row by 1/s changes no reconstruction, and no absorption number."""
    torch.manual_seed(0)
    sae = saelab.create_sae("standard", d_in=16, d_sae=48)
    x, direction = torch.randn(64, 16), torch.randn(16)
    before = word_absorption(x, direction, sae, main_latents=[3, 7])
    sae.scale_latents(torch.rand(48) * 5 + 0.1)
    after = word_absorption(x, direction, sae, main_latents=[3, 7])
    assert before["absorption_fraction"].gt(0).any()  # a case where the numbers say something
    for key in ("absorption_fraction", "probe_projection", "main_projection", "top_projection", "top_latent_cos"):
        assert torch.allclose(before[key], after[key], atol=1e-5), key
    assert torch.equal(before["is_full_absorption"], after["is_full_absorption"])


def test_the_f1_jump_rule_keeps_latents_until_the_first_small_rise():
    assert split_feature_count([0.0, 0.02], 0.03) == 1  # the first latent always counts, even at F1 0
    assert split_feature_count([0.5, 0.6, 0.62, 0.95], 0.03) == 2  # stops at the first non-jump, for good
    assert split_feature_count([0.5, 0.6, 0.7], 0.03) == 3
    assert split_feature_count([0.5, 0.53], 0.03) == 1  # a rise of exactly the threshold is not a jump
    assert split_feature_count([], 0.03) == 0


# ----- planted features with a hierarchy ------------------------------------------------------------------------

PARENT, CHILDREN, N_FEATURES = 0, list(range(1, 11)), 24


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations of 24 orthogonal features: a parent (30% of rows) with 10 exclusive children that fire only
    with it (each on ~2.5% of its rows), 13 unrelated ones. Returns (activations, coefficients, directions)."""
    features = PlantedFeatures(
        d_in=32, n_features=N_FEATURES, magnitude="constant", orthogonalize=True,
        hierarchy=[{"parent": PARENT, "children": CHILDREN, "exclusive": True}],
    )  # fmt: skip
    features.probabilities = torch.tensor([0.3] + [0.025] * len(CHILDREN) + [0.1] * 13)
    acts, coefficients = features.sample(n, torch.Generator().manual_seed(seed))
    return acts, coefficients, features.features


def hierarchy_saes(directions: torch.Tensor) -> dict[str, saelab.SAE]:
    """Two SAEs that reconstruct the planted activations exactly: one latent per feature ("clean"), and one whose
    child latents absorb the parent ("absorbing": child rows f_child + f_parent, the parent latent silenced when
    a child fires)."""
    clean = hand_sae(directions.T.clone(), directions.clone())
    W_enc, W_dec = directions.T.clone(), directions.clone()
    W_enc[:, PARENT] -= 10 * directions[CHILDREN].sum(0)
    W_dec[CHILDREN] += directions[PARENT]
    return {"clean": clean, "absorbing": hand_sae(W_enc, W_dec)}


def test_a_child_latent_absorbing_its_parent_is_found_and_clean_latents_are_not():
    acts, coefficients, directions = planted(2000, seed=1)
    saes = hierarchy_saes(directions)
    for sae in saes.values():  # both are exact SAEs of the data: absorption costs no reconstruction
        assert torch.allclose(sae.decode(sae.encode(acts)), acts, atol=1e-5)
    parent_rows = coefficients[:, PARENT] > 0
    with_child = coefficients[parent_rows][:, CHILDREN].gt(0).any(1)
    assert 0.1 < float(with_child.float().mean()) < 0.4
    probe = directions[PARENT] * 2.0
    clean = word_absorption(acts[parent_rows], probe, saes["clean"], main_latents=[PARENT])
    absorbing = word_absorption(acts[parent_rows], probe, saes["absorbing"], main_latents=[PARENT])
    assert clean["absorption_fraction"].abs().max() == 0 and not clean["is_full_absorption"].any()
    assert torch.equal(absorbing["absorption_fraction"], with_child.float())
    assert torch.equal(absorbing["is_full_absorption"], with_child)
    absorbers = absorbing["top_latent"][with_child]
    assert set(absorbers.tolist()) <= set(CHILDREN) and len(set(absorbers.tolist())) > 5


def test_the_whole_measure_on_planted_features_finds_the_parent_latent_and_its_absorption():
    """absorption_on_task, no language model: a ground-truth probe for 'the parent fires', k-sparse probing picks
    the parent latent alone (each child adds too little F1), and the absorbing SAE's fraction is the share of
    parent rows where a child fires."""
    train, train_c, directions = planted(4000, seed=2)
    test, test_c, _ = planted(1000, seed=3)
    labels = [torch.where(c[:, PARENT] > 0, 0, -1) for c in (train_c, test_c)]
    task = AbsorptionTask(["parent"], train, labels[0], test, labels[1])
    config = AbsorptionConfig(min_feats_for_eval=1, probe_epochs=10)
    task.probe = ground_truth_probe(task, config)  # the same for both SAEs
    results = {name: absorption_on_task(sae, task, config) for name, sae in hierarchy_saes(directions).items()}
    share = float(test_c[test_c[:, PARENT] > 0][:, CHILDREN].gt(0).any(1).float().mean())
    for name, (metrics, details, unstructured) in results.items():
        (detail,) = details
        assert detail["split_feats"] == [PARENT] and metrics["mean"]["mean_num_split_features"] == 1, name
        assert detail["f1_probe"] > 0.99 and detail["num_probe_true_positives"] == int((labels[1] == 0).sum())
        assert unstructured["enough_letters"] and metrics["coverage"]["n_letters_evaluated"] == 1
        assert math.isnan(metrics["mean"]["std_dev_absorption_fraction_score"])  # one class: no spread
    clean, absorbing = results["clean"][0]["mean"], results["absorbing"][0]["mean"]
    assert clean["mean_absorption_fraction_score"] == 0 and clean["mean_full_absorption_score"] == 0
    assert absorbing["mean_absorption_fraction_score"] == pytest.approx(share, abs=1e-6)
    assert absorbing["mean_full_absorption_score"] == pytest.approx(share, abs=1e-6)
    examples = results["absorbing"][2]["absorbed_examples"]
    assert examples and all(e["is_full_absorption"] and e["top_latent"] in CHILDREN for e in examples)


# ----- probes ---------------------------------------------------------------------------------------------------


def test_probe_heads_learn_separable_classes_and_the_metrics_are_right():
    """Each Adam-trained head separates its class from the rest, and F1 / precision / recall / AUC agree with counts
    by hand. (The exact fit and the column ranking are tested in test_eval_probing.py.)"""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=generator)
    x = torch.randn(600, 8, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 8).float()
    probe = train_probe(x, torch.nn.functional.one_hot(labels, 3), epochs=30, batch_size=100, lr=0.05)
    for c in range(3):
        assert binary_metrics(probe.scores(x)[:, c], labels == c)["f1"] > 0.95
    m = binary_metrics(torch.tensor([2.0, 1.0, -1.0, 0.5, -2.0]), torch.tensor([1, 1, 1, 0, 0]))
    assert (m["precision"], m["recall"], m["accuracy"]) == pytest.approx((2 / 3, 2 / 3, 3 / 5))
    assert m["f1"] == pytest.approx(2 / 3) and m["auc"] == pytest.approx(5 / 6)


# ----- the first-letter task ------------------------------------------------------------------------------------


def test_vocabulary_prompts_and_word_positions_on_a_word_level_tokenizer():
    tokenizer = word_tokenizer()
    assert fl.first_letter_vocab(tokenizer) == WORDS  # every word is alphabetic; '.' and special tokens are not
    prompt, end = fl.icl_prompt("cat", ["dog", "red"], "{word} has the first letter:")
    assert prompt == "\ndog has the first letter: D\nred has the first letter: R\ncat has the first letter:"
    assert prompt[:end].endswith("\ncat")
    (ids,) = fl.word_positions(tokenizer, [(prompt, end)], prepend_bos=True)
    assert ids[0] == tokenizer.bos_token_id and ids[ids[-1]] == tokenizer.convert_tokens_to_ids("cat")
    unk, the = tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("the")
    assert ids[:-1][ids[-1] + 1 :] == [unk, the, unk, unk, unk]  # ' has the first letter :': 'the' is known here
    merged = fl.icl_prompt("cat", ["dog"], "{word}s first letter:")  # 'cats' is one (unknown) token
    assert fl.word_positions(tokenizer, [merged], prepend_bos=False) == [None]
    for bad in ("{w} has", "no word", "{word} {word}", "{word} {0}"):
        with pytest.raises(ConfigError, match="prompt_template"):
            fl.check_template(bad)
    with pytest.raises(ConfigError, match="unknown key 'n_word' in AbsorptionConfig. Did you mean 'n_words'"):
        from_dict(AbsorptionConfig, {"n_word": 10})
    with pytest.raises(ConfigError, match="test_fraction"):
        AbsorptionConfig(test_fraction=1.0)


def test_smollm2_vocabulary_and_positions_match_saebench():
    """On the default model's tokenizer: SAEBench's word count, and the computed position is its -6."""
    from transformers import AutoTokenizer

    from saelab.models.loading import convert_default_model

    tokenizer = AutoTokenizer.from_pretrained(convert_default_model())
    words = fl.first_letter_vocab(tokenizer)
    assert len(words) == 47_078 and sum(w.startswith(" ") for w in words) == 31_586
    sample = words[::2000]
    prompts = [fl.icl_prompt(w, words[1000:1010], "{word} has the first letter:") for w in sample]
    for word, ids in zip(sample, fl.word_positions(tokenizer, prompts, prepend_bos=True), strict=True):
        assert ids is not None and ids[-1] == len(ids) - 1 - 6
        assert tokenizer.decode(ids[ids[-1]]) == word


# ----- the whole eval on a tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


def tiny_config(**overrides) -> AbsorptionConfig:
    return AbsorptionConfig(
        **{"n_words": None, "test_fraction": 0.3, "n_icl_examples": 3, "probe_epochs": 5, "max_k_value": 3,
           "k_sparse_probe_num_epochs": 5, **overrides}
    )  # fmt: skip


def test_run_absorption_on_a_tiny_model_caches_its_prompts_and_plots(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    sae = saelab.create_sae("standard", d_in=32, d_sae=64, hook_name=HOOK)
    result = run_absorption(sae, tiny_model, tiny_config(min_GT_probe_f1=-1.0), progress=False)
    assert result["eval_type_id"] == "absorption_first_letter" and result["seconds"] > 0
    unstructured = result["eval_result_unstructured"]
    assert unstructured["n_vocab_words"] == len(WORDS) and unstructured["n_test_words"] == round(0.3 * len(WORDS))
    classes = unstructured["classes"]
    assert [c["class"] for c in classes] == list(fl.LETTERS)
    assert sum(c["n_train"] + c["n_test"] for c in classes) == len(WORDS)
    details = result["eval_result_details"]  # no F1 gate: every letter with training words is measured
    assert [d["first_letter"] for d in details] == [c["class"] for c in classes if c["n_train"]]
    assert len(details) == result["eval_result_metrics"]["coverage"]["n_letters_evaluated"]
    assert all(1 <= d["num_split_features"] <= 3 and 0 <= d["mean_absorption_fraction"] <= 1 for d in details)
    assert not unstructured["enough_letters"]  # 20 letters are needed; the tiny vocabulary has fewer
    (folder,) = (tmp_path / "cache" / "absorption").iterdir()

    def no_model_pass(*args, **kwargs):
        raise AssertionError("the cached activations should have been read")

    monkeypatch.setattr(fl, "_build", no_model_pass)
    again = run_absorption(sae, tiny_model, tiny_config(min_GT_probe_f1=-1.0), progress=False)
    assert again["eval_result_metrics"] == result["eval_result_metrics"] and again["eval_result_details"] == details
    with pytest.raises(AssertionError, match="cached"):  # another seed: other prompts, not the cached ones
        run_absorption(sae, tiny_model, tiny_config(random_seed=1), progress=False)
    write_result(result, tmp_path / "r.json")
    other = read_result(tmp_path / "r.json")
    (png,) = plot_absorption({"random": result, "again": other}, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_absorption_refuses_transcoders_and_reports_no_letters_without_failing(tiny_model):
    transcoder = saelab.create_sae("standard", d_in=32, d_sae=64, hook_name=HOOK, hook_name_out="blocks.1.mlp")
    with pytest.raises(ConfigError, match="not for transcoders"):
        run_absorption(transcoder, tiny_model, tiny_config(cache=False), progress=False)
    sae = saelab.create_sae("standard", d_in=32, d_sae=64, hook_name=HOOK)
    result = run_absorption(sae, tiny_model, tiny_config(cache=False, min_GT_probe_f1=1.0), progress=False)
    assert result["eval_result_details"] == [] and not result["eval_result_unstructured"]["enough_letters"]
    assert all(math.isnan(v) for v in result["eval_result_metrics"]["mean"].values())


# ----- the default model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_on_the_default_model_letters_are_probed_and_an_sae_of_the_probes_absorbs_nothing(tmp_path, monkeypatch):
    """SmolLM2 at blocks.5: the ground-truth probes find most first letters (which they cannot when the word's
    position is wrong), and an SAE whose latents are the probes' own directions has one main latent per letter
    and no absorption."""
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    model = load_model()
    hook = "blocks.5.hook_resid_post"
    config = AbsorptionConfig(n_words=3000)
    probe_sae = saelab.create_sae("standard", d_in=576, d_sae=26, hook_name=hook)  # encoder read first, replaced below
    first = run_absorption(probe_sae, model, config, progress=False)
    classes = first["eval_result_unstructured"]["classes"]
    assert sum(c["f1_probe"] > 0.6 for c in classes) >= 15
    (folder,) = (tmp_path / "absorption").iterdir()
    probe = read_safetensors(folder / f"probe-epochs{config.probe_epochs}.safetensors")
    directions = probe["weight"] / probe["weight"].norm(dim=1, keepdim=True)
    probe_sae = hand_sae(directions.T.contiguous(), directions, hook)
    result = run_absorption(probe_sae, model, config, progress=False)
    details = result["eval_result_details"]
    assert len(details) == sum(c["f1_probe"] > 0.6 for c in classes)
    assert all(d["split_feats"][0] == fl.LETTERS.index(d["first_letter"]) for d in details)
    mean = result["eval_result_metrics"]["mean"]
    assert mean["mean_absorption_fraction_score"] < 0.02 and mean["mean_full_absorption_score"] == 0
    assert mean["mean_num_split_features"] < 1.3
