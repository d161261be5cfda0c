"""Cross-layer transcoders spliced into a tiny model (against a replacement forward written by hand), and the
replacement eval's metrics (against direct computation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import save_tiny_model, sentences, write_jsonl

import saelab
from saelab.cli import main
from saelab.core.errors import ConfigError
from saelab.data.config import DataConfig
from saelab.data.tokens import excluded_token_ids
from saelab.evals.evaluate import evaluate
from saelab.evals.heldout import heldout_contexts
from saelab.evals.replacement import ReplacementConfig, replacement_metrics, run_replacement
from saelab.evals.results import read_result
from saelab.evals.suite import run_suite
from saelab.models import load_model
from saelab.splice import check_fits, spliced

IN, OUT = "blocks.{layer}.hook_mlp_in", "blocks.{layer}.hook_mlp_out"
LAYERS, D, M, K = [0, 1, 2], 32, 16, 4  # model layers covered, model width, latents per layer, TopK's k


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replacement")
    save_tiny_model(folder / "model")
    model = load_model(str(folder / "model"))
    data = DataConfig(dataset=str(write_jsonl(folder / "text.jsonl", sentences(300))), context_size=16)
    tokens = torch.cat(heldout_contexts(model, data, 8, 4))
    return model, data, tokens, folder


def random_clt(architecture: str = "clt", seed: int = 0, d_in: int = D, **options) -> saelab.SAE:
    """A CLT (or transcoder set) over the three MLPs with every parameter random, so that it changes the model;
    `d_in` per layer."""
    options = {"skip_connection": True, "k": K, "hook_name": IN, "hook_name_out": OUT, **options}
    n = len(LAYERS)
    clt = saelab.create_sae(architecture, d_in=n * d_in, d_sae=n * M, d_out=n * D, layers=LAYERS, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return clt


def by_hand(model, clt, tokens, keep=None):
    """Logits of the model with each MLP output replaced (at the `keep` positions) by the CLT's output, from the
    parameters: layer i's latents relu(topk(x_i W_enc[i] + b_enc_i)) and layer j's output
    b_dec_j + W_skip[j] x_j + sum over i <= j of latents_i W_dec_i[:, j - i], every x from the replacement pass."""
    latents = []
    inputs = [IN.format(layer=layer) for layer in LAYERS]

    def replace(j):
        def write(activation):
            x = cache[inputs[j]]
            pre = x @ clt.W_enc[j] + clt.b_enc[j * M : (j + 1) * M]
            top = pre.topk(K, dim=-1)
            latents.append(torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()))
            out = clt.b_dec[j * D : (j + 1) * D] + x @ clt.W_skip[j].T
            for i in range(j + 1):
                W = getattr(clt, f"W_dec_{i}")
                if j - i < W.shape[1]:  # a transcoder set's latents write their own layer only
                    out = out + latents[i] @ W[:, j - i]
            return out if keep is None else torch.where(keep[..., None], out, activation)

        return write

    with torch.no_grad(), model.hooks(read=inputs) as cache:
        return model.logits(tokens, write={OUT.format(layer=layer): replace(j) for j, layer in enumerate(LAYERS)})


@pytest.mark.parametrize("architecture", ["clt", "transcoder_set"])
def test_spliced_without_error_terms_is_the_replacement_forward_written_by_hand(tiny, architecture):
    model, _, tokens, _ = tiny
    clt = random_clt(architecture)
    clean = model.logits(tokens)
    with torch.no_grad(), spliced(model, clt):
        logits = model.logits(tokens)
        assert torch.equal(model.logits(tokens), logits)  # each pass computes its own latents
    assert torch.allclose(logits, by_hand(model, clt, tokens), atol=1e-5)
    assert not torch.allclose(logits, clean, atol=1e-2)
    keep = tokens != model.tokenizer.bos_token_id
    names = [f"{OUT.format(layer=layer)}.hook_sae_acts_post" for layer in LAYERS]
    with torch.no_grad(), spliced(model, clt, positions=keep, read=names) as cache:
        logits = model.logits(tokens)
    assert torch.allclose(logits, by_hand(model, clt, tokens, keep), atol=1e-5)
    assert torch.equal(logits[:, 0], clean[:, 0])  # BOS is first, left alone and attends to nothing else
    assert all(cache[name].shape == (int(keep.sum()), M) for name in names)


@pytest.mark.parametrize("architecture", ["clt", "transcoder_set"])
def test_with_error_terms_the_logits_are_the_clean_ones_exactly(tiny, architecture):
    model, _, tokens, _ = tiny
    clt = random_clt(architecture)
    names = [f"{OUT.format(layer=layer)}.{point}" for layer in LAYERS for point in ("hook_sae_acts_post",)]
    with torch.no_grad(), model.hooks(read=[IN.format(layer=layer) for layer in LAYERS]) as clean_inputs:
        clean = model.logits(tokens)
    with torch.no_grad(), spliced(model, clt, error_term=True, read=names) as cache:
        logits = model.logits(tokens)
    assert torch.equal(logits, clean)
    for j, layer in enumerate(LAYERS):  # and every layer's latents are those of the clean inputs
        expected = clt.encode_layer(j, clean_inputs[IN.format(layer=layer)])
        assert torch.equal(cache[f"{OUT.format(layer=layer)}.hook_sae_acts_post"], expected)


def test_a_transcoder_set_splices_as_its_transcoders_spliced_side_by_side(tiny):
    model, _, tokens, _ = tiny
    clt = random_clt("transcoder_set")
    transcoders = []
    for j, layer in enumerate(LAYERS):
        hooks = {"hook_name": IN.format(layer=layer), "hook_name_out": OUT.format(layer=layer)}
        sae = saelab.create_sae("topk", d_in=D, d_sae=M, k=K, skip_connection=True, **hooks)
        with torch.no_grad():
            sae.W_enc.copy_(clt.W_enc[j])
            sae.b_enc.copy_(clt.b_enc[j * M : (j + 1) * M])
            sae.W_dec.copy_(getattr(clt, f"W_dec_{j}")[:, 0])
            sae.b_dec.copy_(clt.b_dec[j * D : (j + 1) * D])
            sae.W_skip.copy_(clt.W_skip[j])
        transcoders.append(sae)
    names = [f"{OUT.format(layer=layer)}.hook_sae_acts_post" for layer in LAYERS]
    with torch.no_grad(), spliced(model, clt, read=names) as together:
        logits = model.logits(tokens)
    with torch.no_grad(), spliced(model, transcoders, read=names) as apart:
        assert torch.allclose(model.logits(tokens), logits, atol=1e-5)
    assert all(torch.allclose(together[name], apart[name], atol=1e-5) for name in names)


def test_an_edit_of_one_layers_latents_moves_only_what_comes_after(tiny):
    model, _, tokens, _ = tiny
    clt = random_clt()
    out = [OUT.format(layer=layer) for layer in LAYERS]
    names = [f"{hook}.{point}" for hook in out for point in ("hook_sae_input", "hook_sae_acts_post", "hook_sae_output")]
    names += [f"{hook}.hook_sae_recons" for hook in out]
    with torch.no_grad(), spliced(model, clt, error_term=True, read=names) as clean:
        clean_logits = model.logits(tokens)
    edit = {f"{out[1]}.hook_sae_acts_post": lambda z: 3.0 * z}
    with torch.no_grad(), spliced(model, clt, error_term=True, read=names, edit=edit) as edited:
        logits = model.logits(tokens)
    assert torch.equal(edited[f"{out[0]}.hook_sae_output"], clean[f"{out[0]}.hook_sae_output"])
    change = edited[f"{out[1]}.hook_sae_acts_post"] - clean[f"{out[1]}.hook_sae_acts_post"]
    assert torch.allclose(change, 2.0 * clean[f"{out[1]}.hook_sae_acts_post"])  # the edit, seen by reads
    moved = edited[f"{out[1]}.hook_sae_output"] - clean[f"{out[1]}.hook_sae_output"]
    assert torch.allclose(moved, change @ clt.decoder(1, 1), atol=1e-5)  # exactly the decoded change
    assert not torch.allclose(edited[f"{out[2]}.hook_sae_output"], clean[f"{out[2]}.hook_sae_output"])
    assert not torch.allclose(logits, clean_logits)
    # layer 2 decodes the edited latents of layer 1 (through the cross-layer decoder), from this pass
    latents = [edited[f"{hook}.hook_sae_acts_post"] for hook in out]
    expected = clt.decode_layer(2, latents) + clt.skip_layer(2, edited[f"{out[2]}.hook_sae_input"])
    assert torch.allclose(edited[f"{out[2]}.hook_sae_recons"], expected, atol=1e-5)
    unedited = clt.decode_layer(2, [latents[0], clean[f"{out[1]}.hook_sae_acts_post"], latents[2]])
    assert not torch.allclose(unedited + clt.skip_layer(2, edited[f"{out[2]}.hook_sae_input"]), expected, atol=1e-3)


def direct_metrics(model, clt, tokens, excluded):
    """What the replacement eval reports, computed directly on one batch of every held-out context."""
    keep = ~torch.isin(tokens, torch.tensor(excluded))
    hooks = [h.format(layer=layer) for layer in LAYERS for h in (IN, OUT)]
    acts = model.run_with_cache(tokens, hooks)
    layers, errors, deviations, norms, l0s = [], [], [], [], []
    latents = []
    for j, layer in enumerate(LAYERS):
        x, y = acts[IN.format(layer=layer)][keep], acts[OUT.format(layer=layer)][keep]
        latents.append(clt.encode_layer(j, x))
        y_hat = clt.decode_layer(j, latents) + clt.skip_layer(j, x)
        error, deviation, norm = (y - y_hat).pow(2).sum(), (y - y.mean(0)).pow(2).sum(), y.pow(2).sum()
        l0 = float((latents[j] != 0).sum(-1).float().mean())
        dead = float(((latents[j] != 0).sum(0) == 0).float().mean())
        layers.append({"fvu": float(error / deviation), "nmse": float(error / norm), "l0": l0, "dead_fraction": dead})
        errors.append(error)
        deviations.append(deviation)
        norms.append(norm)
        l0s.append(l0)
    clean = model.logits(tokens)
    replaced = by_hand(model, clt, tokens, keep)
    zero = {OUT.format(layer=layer): lambda a: torch.where(keep[..., None], 0.0, a) for layer in LAYERS}
    ablated = model.logits(tokens, write=zero)

    def ce(logits):
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten(), reduction="none")
        return float(loss[keep[:, :-1].flatten()].mean())

    log_p, log_q = clean.double().log_softmax(-1), replaced.double().log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1)[keep].mean())
    ce_clean, ce_replaced, ce_ablated = ce(clean), ce(replaced), ce(ablated)
    return {
        "fvu": float(sum(errors) / sum(deviations)),
        "nmse": float(sum(errors) / sum(norms)),
        "l0": sum(l0s),
        "layers": layers,
        "ce_loss_without_sae": ce_clean,
        "ce_loss_with_sae": ce_replaced,
        "ce_loss_with_ablation": ce_ablated,
        "ce_loss_score": (ce_ablated - ce_replaced) / (ce_ablated - ce_clean),
        "kl_div_with_sae": kl,
        "top1_agreement_with_sae": float((replaced.argmax(-1) == clean.argmax(-1))[keep].float().mean()),
    }


def test_the_replacement_metrics_equal_a_direct_computation(tiny):
    model, data, tokens, _ = tiny
    clt = random_clt()
    with torch.no_grad():
        clt.b_enc[M : M + 5] = -1e4  # five latents of layer 1 that never fire
    result = replacement_metrics(clt, model, data, n_contexts=8, batch_contexts=4)
    excluded = excluded_token_ids(model.tokenizer, data.exclude_special_tokens)
    with torch.no_grad():
        direct = direct_metrics(model, clt, tokens, excluded)
    assert result["tokens"] == int((~torch.isin(tokens, torch.tensor(excluded))).sum()) < tokens.numel()
    for key in ("fvu", "nmse"):
        assert result["reconstruction"][key] == pytest.approx(direct[key], rel=1e-5)
    assert result["reconstruction"]["explained_variance"] == pytest.approx(1 - direct["fvu"], rel=1e-5)
    assert result["sparsity"]["l0"] == pytest.approx(direct["l0"])
    for measured, expected in zip(result["layers"], direct["layers"], strict=True):
        assert {k: measured[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert result["layers"][1]["dead_fraction"] >= 5 / M
    assert [layer["layer"] for layer in result["layers"]] == LAYERS
    for key in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score"):
        assert result["replacement"][key] == pytest.approx(direct[key], rel=1e-5)
    assert result["replacement"]["kl_div_with_sae"] == pytest.approx(direct["kl_div_with_sae"], rel=1e-4)
    assert result["replacement"]["top1_agreement_with_sae"] == pytest.approx(direct["top1_agreement_with_sae"])
    assert result["replacement"]["kl_div_with_sae"] > 1e-3  # a random CLT: the numbers say something
    assert result["replacement"]["kl_div_with_sae_and_error"] == 0.0
    # held-out contexts by source: each source's metrics, and the whole over all of them
    batches = heldout_contexts(model, data, 8, 4)
    sources = replacement_metrics(clt, model, data, contexts={"a": batches[:1], "b": batches[1:]}, error_term=False)
    first = replacement_metrics(clt, model, data, contexts={None: batches[:1]}, error_term=False)
    assert sources["sources"]["a"]["layers"] == first["layers"] and "sources" not in first
    assert sources["replacement"]["ce_loss_score"] == pytest.approx(direct["ce_loss_score"], rel=1e-5)


def test_a_clt_that_is_its_mlps_down_projection_replaces_them_perfectly(tiny):
    """In a Llama MLP the down projection is linear, without bias: a CLT reading its input whose skip connection
    is its weight, with no latent writing anything, reconstructs the MLP output exactly."""
    model, data, _, _ = tiny
    layers = model.model.model.layers
    clt = random_clt(d_in=64, hook_name="model.layers.{layer}.mlp.down_proj:input", k=2)
    with torch.no_grad():
        for j in range(3):
            getattr(clt, f"W_dec_{j}").zero_()
            clt.W_skip[j] = layers[j].mlp.down_proj.weight
        clt.b_dec.zero_()
    result = run_replacement(clt, model, ReplacementConfig(n_contexts=8, batch_contexts=4), data=data)
    metrics = result["eval_result_metrics"]
    assert metrics["reconstruction_quality"]["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert all(layer["nmse"] == pytest.approx(0.0, abs=1e-9) for layer in result["eval_result_details"])
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["model_behavior_preservation"]["top1_agreement_with_sae"] == 1.0
    assert metrics["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["model_performance_preservation"]["ce_loss_increase"] == pytest.approx(0.0, abs=1e-6)
    performance = metrics["model_performance_preservation"]
    assert performance["ce_loss_with_ablation"] != performance["ce_loss_without_sae"]  # the baseline is another model
    assert metrics["model_behavior_preservation"]["kl_div_with_ablation"] > 1e-5


def test_the_suite_writes_the_replacement_eval_and_the_command_runs_it(tiny, tmp_path, capsys):
    model, data, tokens, folder = tiny
    clt = random_clt()
    configs = {"replacement": {"n_contexts": 8, "batch_contexts": 4}}
    results = run_suite(
        {"clt": clt}, ["core", "replacement"], model, configs, tmp_path / "out", progress=False, data=data
    )
    written = read_result(tmp_path / "out" / "clt" / "replacement.json")
    with torch.no_grad():
        direct = direct_metrics(model, clt, tokens, excluded_token_ids(model.tokenizer, data.exclude_special_tokens))
    metrics = written["eval_result_metrics"]
    assert metrics == results["clt"]["replacement"]["eval_result_metrics"]
    assert metrics["model_performance_preservation"]["ce_loss_score"] == pytest.approx(
        direct["ce_loss_score"], rel=1e-5
    )
    assert metrics["reconstruction_quality"]["fvu"] == pytest.approx(direct["fvu"], rel=1e-5)
    assert [d["fvu"] for d in written["eval_result_details"]] == pytest.approx([d["fvu"] for d in direct["layers"]])
    assert "replacement" in results["clt"]["core"]["error"]  # the core eval is for one hook point: says so
    assert "repl. CE score" in (tmp_path / "out" / "comparison.md").read_text()
    assert "Replacement model per layer" in (tmp_path / "out" / "index.html").read_text()
    with pytest.raises(ConfigError, match="not a 'topk': use the core eval"):
        run_replacement(saelab.create_sae("topk", d_in=D, d_sae=M, k=K, hook_name="blocks.0.hook_mlp_out"), model)
    with pytest.raises(ConfigError, match="--suite replacement"):
        evaluate(clt, model, data)
    # the command, on a saved CLT
    clt.cfg.model_name = str(folder / "model")
    clt.save(tmp_path / "clt")
    flags = ["--data.dataset", data.dataset, "--data.context_size", "16", "--replacement.n_contexts", "4"]
    assert main(["eval", str(tmp_path / "clt"), "--suite", "replacement", "--out", str(tmp_path / "cli"), *flags]) == 0
    assert "repl. CE score" in capsys.readouterr().out
    assert read_result(tmp_path / "cli" / "clt" / "replacement.json")["eval_config"]["n_contexts"] == 4


def test_a_clt_that_does_not_fit_the_model_is_refused_per_layer(tiny):
    model, _, _, _ = tiny
    clt = random_clt(d_in=16)
    with pytest.raises(ConfigError, match="d_in per layer is 16 but blocks.0.hook_mlp_in has width 32"):
        check_fits(model, clt)
    with pytest.raises(ConfigError, match="same hook point 'blocks.1.hook_mlp_out'"):
        other = saelab.create_sae("topk", d_in=D, d_sae=M, k=K, hook_name="blocks.1.hook_mlp_out")
        with spliced(model, [random_clt(), other]):
            pass
