"""Transcoder sets and cross-layer transcoders in circuit-tracer's layout and as per-layer SAELens transcoders:
round trips, the files checked against circuit-tracer's maths (and its own loaders when installed), SAELens
loading each layer, and the one-line refusals."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import saelab
from saelab.cli import main
from saelab.core.errors import ConfigError, FileFormatError
from saelab.io import load_circuit_tracer, save_circuit_tracer, save_saelens_layers
from saelab.saes.clt import CrossLayerTranscoder, TranscoderSet
from saelab.saes.clt_layers import layer_transcoder, transcoder_set_from_layers

D, M, K = 8, 16, 3  # width per layer, latents per layer, TopK's k
HOOKS = {"hook_name": "blocks.{layer}.hook_resid_mid", "hook_name_out": "blocks.{layer}.hook_mlp_out"}
VARIANTS = [
    ("transcoder_set", "jumprelu", False),
    ("transcoder_set", "jumprelu", True),
    ("transcoder_set", "topk", False),
    ("transcoder_set", "topk", True),
    ("clt", "jumprelu", False),
]
CT_MISSING = "circuit-tracer not installed (0.5.0 pins transformers<=4.57.3 and huggingface-hub<1.0)"


def make(kind="transcoder_set", activation="jumprelu", skip=False, layers=(0, 1, 2), seed=0, **options):
    """A set or CLT with random weights: positive thresholds; TopK pre-activations shifted up so that the k kept
    ones are positive (where circuit-tracer's TopK, which has no ReLU, agrees with saelab's)."""
    L = len(layers)
    sae = saelab.create_sae(
        kind,
        d_in=L * D,
        d_sae=L * M,
        d_out=L * options.pop("d_out", D),
        layers=list(layers),
        activation=activation,
        k=K,
        skip_connection=skip,
        model_name="tiny-model",
        **{**HOOKS, **options},
    )
    g = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(t.shape, generator=g) for name, t in sae.weights_for_saving().items()}
    if activation == "jumprelu":
        weights["threshold"] = torch.rand(weights["threshold"].shape, generator=g) * 2
    else:
        weights["b_enc"] += 6
    sae.load_saved_weights(weights)
    return sae.eval()


def inputs(sae, n=20, seed=1):
    return torch.randn(n, sae.cfg.d_in, generator=torch.Generator().manual_seed(seed))


def same_weights(a, b):
    wa, wb = a.weights_for_saving(), b.weights_for_saving()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def by_circuit_tracer_maths(folder, x):
    """What circuit-tracer computes from the files (its formulas, read with safetensors and yaml only)."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    L = len(list(folder.glob("layer_*.safetensors")) or list(folder.glob("W_enc_*.safetensors")))
    xs = x.view(len(x), L, -1)
    if config["model_kind"] == "transcoder_set":
        outs = []
        for i in range(L):
            t = load_file(folder / f"layer_{i}.safetensors")
            pre = xs[:, i] @ t["W_enc"].T + t["b_enc"]
            if config.get("activation") == "topk":
                top = pre.topk(config["k"], dim=-1)
                assert (top.values > 0).all()  # where the two TopKs agree
                acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            else:
                acts = pre * (pre > t.get("activation_function.threshold", torch.tensor(0.0)))
            out = acts @ t["W_dec"] + t["b_dec"]
            outs.append(out + xs[:, i] @ t["W_skip"].T if "W_skip" in t else out)
        return torch.cat(outs, dim=-1)
    enc = [load_file(folder / f"W_enc_{i}.safetensors") for i in range(L)]
    dec = [load_file(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(L)]
    acts = []
    for i, t in enumerate(enc):
        pre = xs[:, i] @ t[f"W_enc_{i}"].T + t[f"b_enc_{i}"]
        acts.append(pre * (pre > t[f"threshold_{i}"]))
    outs = [enc[j][f"b_dec_{j}"] + sum(acts[i] @ dec[i][:, j - i] for i in range(j + 1)) for j in range(L)]
    return torch.cat(outs, dim=-1)


# ----- circuit-tracer: round trips and the files ------------------------------------------------------------------
@pytest.mark.parametrize("kind, activation, skip", VARIANTS)
def test_round_trip_keeps_weights_and_outputs(tmp_path, kind, activation, skip):
    sae = make(kind, activation, skip)
    save_circuit_tracer(sae, tmp_path / "ct")
    back = saelab.load_sae(tmp_path / "ct")
    assert type(back) is type(sae) and same_weights(back, sae)
    x = inputs(sae)
    assert torch.equal(back(x), sae(x)) and torch.equal(back.encode(x), sae.encode(x))
    assert (back.encode(x) > 0).float().mean() > 0.05  # latents fire: the comparison means something
    assert (back.cfg.layers, back.cfg.activation, back.cfg.model_name) == ([0, 1, 2], activation, "tiny-model")
    assert (back.cfg.hook_name, back.cfg.hook_name_out) == (HOOKS["hook_name"], HOOKS["hook_name_out"])
    assert back.cfg.k == K or activation != "topk"
    as_double = load_circuit_tracer(tmp_path / "ct", dtype="float64")
    assert as_double.W_enc.dtype == torch.float64 and torch.allclose(as_double(x.double()).float(), sae(x), atol=1e-5)


@pytest.mark.parametrize("kind, activation, skip", VARIANTS)
def test_files_are_what_circuit_tracer_reads(tmp_path, kind, activation, skip):
    sae = make(kind, activation, skip)
    save_circuit_tracer(sae, tmp_path / "ct")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    expected = {
        "model_kind": "cross_layer_transcoder" if kind == "clt" else "transcoder_set",
        "model_name": "tiny-model",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }
    assert config == ({**expected, "activation": "topk", "k": K} if activation == "topk" else expected)
    files = sorted(p.name for p in (tmp_path / "ct").iterdir())
    if kind == "clt":
        assert files == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                         "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]  # fmt: skip
        enc = load_file(tmp_path / "ct" / "W_enc_1.safetensors")
        shapes = {name: tuple(t.shape) for name, t in enc.items()}
        assert shapes == {"W_enc_1": (M, D), "b_enc_1": (M,), "b_dec_1": (D,), "threshold_1": (M,)}
        assert load_file(tmp_path / "ct" / "W_dec_1.safetensors")["W_dec_1"].shape == (M, 2, D)  # layers 1 and 2
        assert torch.equal(enc["b_dec_1"], sae.b_dec[D : 2 * D])  # the decoder bias of output layer 1
    else:
        assert files == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
        layer = load_file(tmp_path / "ct" / "layer_2.safetensors")
        shapes = {"W_enc": (M, D), "b_enc": (M,), "W_dec": (M, D), "b_dec": (D,)}
        if activation == "jumprelu":
            shapes["activation_function.threshold"] = (M,)
        if skip:
            shapes["W_skip"] = (D, D)
        assert {name: tuple(t.shape) for name, t in layer.items()} == shapes  # no `k` tensor: its loader refuses one
        assert torch.equal(layer["W_enc"], sae.W_enc[2].T)  # one row per latent
    x = inputs(sae)
    assert torch.allclose(by_circuit_tracer_maths(tmp_path / "ct", x), sae(x), atol=1e-5)


@pytest.mark.parametrize("kind, activation, skip", VARIANTS)
def test_circuit_tracers_own_loaders_compute_the_same(tmp_path, kind, activation, skip):
    pytest.importorskip("circuit_tracer", reason=CT_MISSING)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    sae = make(kind, activation, skip)
    save_circuit_tracer(sae, tmp_path / "ct")
    folder = tmp_path / "ct"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    hooks = {"feature_input_hook": config["feature_input_hook"], "feature_output_hook": config["feature_output_hook"]}
    x = inputs(sae)
    xs = x.view(len(x), 3, D).transpose(0, 1).contiguous()  # circuit-tracer's (layers, positions, d)
    cpu = torch.device("cpu")
    if kind == "clt":  # as its loaders do with config.yaml (utils/hf_utils.py, utils/caching.py)
        theirs = load_clt(str(folder), **hooks, device=cpu, dtype=torch.float32)
    else:
        options = {"activation": config.get("activation"), "k": config.get("k")}
        if "activation" not in inspect.signature(load_transcoder_set).parameters:
            if activation == "topk":
                pytest.skip("this circuit-tracer version reads no TopK transcoders (added after 0.5.0)")
            options = {}
        paths = {i: str(folder / f"layer_{i}.safetensors") for i in range(3)}
        theirs = load_transcoder_set(paths, scan=str(folder), **hooks, device=cpu, **options)
    with torch.no_grad():
        out = theirs.decode(theirs.encode(xs), xs).transpose(0, 1).reshape(len(x), -1)
    assert torch.allclose(out, sae(x), atol=1e-5)


def test_relu_sets_in_the_may_2025_config_that_lists_its_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    entries = []
    for i in range(2):
        tensors = {"W_enc": torch.randn(M, D, generator=g), "b_enc": torch.randn(M, generator=g),
                   "W_dec": torch.randn(M, D, generator=g), "b_dec": torch.randn(D, generator=g)}  # fmt: skip
        save_file(tensors, str(tmp_path / f"relu-{i}.safetensors"))
        entries.append({"id": f"relu-{i}", "layer": i, "filepath": f"relu-{i}.safetensors"})
    config = {"model_name": "m", "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "mlp.hook_out"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "transcoders": entries[::-1]}))
    sae = saelab.load_sae(tmp_path)
    assert isinstance(sae, TranscoderSet) and sae.cfg.activation == "jumprelu" and not sae.threshold.any()
    assert sae.cfg.hook_name == "blocks.{layer}.ln2.hook_normalized"
    assert sae.cfg.hook_name_out == "model.layers.{layer}.mlp"
    x = inputs(sae)
    t = load_file(tmp_path / "relu-1.safetensors")
    assert torch.allclose(sae(x)[:, D:], torch.relu(x[:, D:] @ t["W_enc"].T + t["b_enc"]) @ t["W_dec"] + t["b_dec"])
    save_circuit_tracer(sae, tmp_path / "again")  # and the hook names translate back
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert (again["feature_input_hook"], again["feature_output_hook"]) == ("ln2.hook_normalized", "mlp.hook_out")


# ----- circuit-tracer: refusals and damaged files -----------------------------------------------------------------
@pytest.mark.parametrize(
    "sae, message",
    [
        (lambda: make(layers=(1, 2, 3)), r"covers layers \[1, 2, 3\]"),
        (lambda: make("clt", "topk"), "cross-layer transcoders are ReLU or JumpReLU, not TopK"),
        (lambda: make("clt", skip=True), "cross-layer transcoder files have no skip connection"),
        (lambda: make(hook_name="blocks.{layer}.hook_resid_pre"),
         r"no name for the input hook 'blocks.\{layer\}.hook_resid_pre'.*blocks.\{layer\}.hook_resid_mid"),
        (lambda: make(hook_name_out="blocks.{layer}.hook_resid_post"), "no name for the output hook"),
        (lambda: make(d_out=4), "read and write one width; this transcoder set maps 8 -> 4"),
        (lambda: make(normalize_activations="expected_average_only_in"), "fold normalize_activations"),
        (lambda: saelab.create_sae("jumprelu", d_in=D, d_sae=M), "not a jumprelu SAE"),
    ],
)  # fmt: skip
def test_what_circuit_tracer_would_misread_is_refused_and_nothing_written(tmp_path, sae, message):
    with pytest.raises(ConfigError, match=message):
        save_circuit_tracer(sae(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_is_written_whole(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_circuit_tracer(make(), tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    save_circuit_tracer(make(), tmp_path / "ct")
    save_circuit_tracer(make(layers=(0, 1), seed=5), tmp_path / "ct")  # an earlier export is replaced whole
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["config.yaml", "layer_0.safetensors",
                                                                   "layer_1.safetensors"]  # fmt: skip
    assert same_weights(saelab.load_sae(tmp_path / "ct"), make(layers=(0, 1), seed=5))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _edit_config(**changes):
    def edit(folder):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, **changes}))

    return edit


def _add_tensor(file, name, tensor):
    def edit(folder):
        tensors = load_file(folder / file)
        save_file({**tensors, name: tensor}, str(folder / file))

    return edit


@pytest.mark.parametrize(
    "kind, damage, message",
    [
        ("transcoder_set", lambda f: (f / "layer_1.safetensors").unlink(), "layer_1.safetensors is missing"),
        ("transcoder_set", lambda f: _truncate(f / "layer_2.safetensors"),
         "layer_2.safetensors: not a valid safetensors file"),
        ("transcoder_set", lambda f: (f / "config.yaml").write_text("model_kind: [\n"), "config.yaml: invalid YAML"),
        ("transcoder_set", _edit_config(feature_input_hook="hook_resid_pre"),
         "feature_input_hook 'hook_resid_pre' is not one saelab can place"),
        ("transcoder_set", _edit_config(model_kind="sae"), "model_kind 'sae' is neither"),
        ("transcoder_set", _edit_config(activation="topk"), "activation topk, but the files hold JumpReLU thresholds"),
        ("transcoder_set", _add_tensor("layer_0.safetensors", "log_thresholds", torch.zeros(M)),
         r"unexpected tensors \['log_thresholds'\]"),
        ("transcoder_set", _edit_config(transcoders=["hf://owner/repo/layer_0.safetensors"]),
         "on the Hugging Face hub"),
        ("clt", lambda f: (f / "W_dec_2.safetensors").unlink(), "W_dec_2.safetensors: file not found"),
        ("clt", lambda f: save_file({"W_dec_1": torch.zeros(M, 3, D)}, str(f / "W_dec_1.safetensors")),
         r"'W_dec_1' has shape \(16, 3, 8\), expected \(16, 2, 8\)"),
    ],
)  # fmt: skip
def test_damaged_files_are_one_error_naming_the_file(tmp_path, kind, damage, message):
    save_circuit_tracer(make(kind), tmp_path / "ct")
    damage(tmp_path / "ct")
    with pytest.raises(FileFormatError, match=message) as error:
        saelab.load_sae(tmp_path / "ct")
    assert "\n" not in str(error.value) and str(tmp_path / "ct") in str(error.value)


# ----- transcoder sets as per-layer SAELens transcoders -----------------------------------------------------------
@pytest.mark.parametrize(
    "activation, skip, their_class",
    [
        ("jumprelu", False, "JumpReLUTranscoder"),
        ("jumprelu", True, "JumpReLUSkipTranscoder"),
        ("topk", False, "TopKSAE"),
    ],
)
def test_saelens_loads_each_layer_of_a_set_with_the_same_outputs(tmp_path, activation, skip, their_class):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens not installed (pip install -e '.[interop]')")
    tset = make(activation=activation, skip=skip, layers=(2, 5))
    save_saelens_layers(tset, tmp_path / "layers")
    assert sorted(p.name for p in (tmp_path / "layers").iterdir()) == ["layer_2", "layer_5"]
    x = inputs(tset)
    ours = tset(x)
    for i, layer in enumerate((2, 5)):
        theirs = sae_lens.SAE.load_from_disk(tmp_path / "layers" / f"layer_{layer}")
        assert type(theirs).__name__ == their_class
        assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_mid"
        assert theirs.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        with torch.no_grad():
            assert torch.allclose(theirs(x[:, i * D : (i + 1) * D]), ours[:, i * D : (i + 1) * D], atol=1e-5)
    back = saelab.load_sae(tmp_path / "layers")  # the folder of layers reads back as the set
    assert isinstance(back, TranscoderSet) and back.cfg.layers == [2, 5] and same_weights(back, tset)
    assert back.cfg.hook_name == HOOKS["hook_name"] and torch.equal(back(x), ours)


def test_what_saelens_has_no_class_for_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="SAELens 6 has no TopK transcoder class.*has a skip connection"):
        save_saelens_layers(make(activation="topk", skip=True), tmp_path / "out")
    with pytest.raises(ConfigError, match="holds a transcoder set, not a cross-layer transcoder"):
        save_saelens_layers(make("clt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layers_of_relu_transcoders_join_into_a_set():
    g = torch.Generator().manual_seed(0)
    layers = []
    for layer in (3, 4):
        sae = saelab.create_sae("standard", d_in=D, d_sae=M, hook_name=f"blocks.{layer}.hook_mlp_in",
                                hook_name_out=f"blocks.{layer}.hook_mlp_out", hook_layer=layer)  # fmt: skip
        sae.load_saved_weights({name: torch.randn(t.shape, generator=g) for name, t in sae.state_dict().items()})
        layers.append(sae)
    tset = transcoder_set_from_layers(layers[::-1])  # in any order: hook_layer places them
    x = inputs(tset)
    assert tset.cfg.layers == [3, 4] and tset.cfg.hook_name == "blocks.{layer}.hook_mlp_in"
    assert torch.allclose(tset(x), torch.cat([layers[0](x[:, :D]), layers[1](x[:, D:])], dim=-1), atol=1e-6)
    layers[1].cfg.hook_name = "blocks.4.hook_resid_mid"
    with pytest.raises(ConfigError, match="differ in hook_name"):
        transcoder_set_from_layers(layers)
    with pytest.raises(ConfigError, match="only a transcoder set's layer is an ordinary transcoder"):
        layer_transcoder(make("clt"), 0)
    negative = make()  # as circuit-tracer files may hold: pre * (pre > threshold) passes negative values
    negative.threshold[M : 2 * M] = -1.0
    assert torch.equal(layer_transcoder(negative, 0).threshold, negative.threshold[:M])
    with pytest.raises(ConfigError, match="layer 1 has negative thresholds"):
        layer_transcoder(negative, 1)


# ----- the command line -------------------------------------------------------------------------------------------
def test_convert_writes_circuit_tracer_and_per_layer_saelens(tmp_path, capsys):
    tset, clt = make(activation="topk"), make("clt")
    tset.save(tmp_path / "set")
    clt.save(tmp_path / "clt")
    assert main(["convert", str(tmp_path / "set"), str(tmp_path / "ct"), "--to", "circuit-tracer"]) == 0
    assert same_weights(saelab.load_sae(tmp_path / "ct"), tset)
    assert main(["convert", str(tmp_path / "set"), str(tmp_path / "per_layer")]) == 0  # --to saelens: per layer
    assert sorted(p.name for p in (tmp_path / "per_layer").iterdir()) == ["layer_0", "layer_1", "layer_2"]
    assert main(["convert", str(tmp_path / "clt"), str(tmp_path / "ct_clt"), "--to", "circuit-tracer"]) == 0
    assert isinstance(saelab.load_sae(tmp_path / "ct_clt"), CrossLayerTranscoder)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "clt"), str(tmp_path / "no")]) == 2  # SAELens cannot read a CLT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SAELens has no class for dictionaries over several layers" in err
    assert not (tmp_path / "no").exists()
