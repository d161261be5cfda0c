"""Other libraries' SAE files, written here the way those libraries write them (no peer library needed), for the
format tests to read."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file

D_IN, D_SAE, K = 12, 40, 5
"""The shapes of every file written here: d_in, d_sae and k of TopK files."""


def write_sparsify(folder, transcode=False, skip=False, seed=0):
    """A sparsify SparseCoder folder: nn.Linear encoder, W_dec (d_sae, d_in), b_dec, optional W_skip."""
    g = torch.Generator().manual_seed(seed)
    weights = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if skip:
        weights["W_skip"] = torch.randn(D_IN, D_IN, generator=g)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D_IN,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights


def sparsify_by_hand(w, x, transcode, skip):
    """What sparsify's forward computes: relu(encoder(x - b_dec)) top-k, decoded, + skip."""
    pre = torch.relu((x if transcode else x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(K, dim=-1)
    out = (top.values.unsqueeze(-1) * w["W_dec"][top.indices]).sum(1) + w["b_dec"]
    return out + x @ w["W_skip"].T if skip else out


def write_gemma_scope(folder, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)),
        "W_dec": rng.normal(size=(D_SAE, D_IN)),
        "b_enc": rng.normal(size=D_SAE),
        "b_dec": rng.normal(size=D_IN),
        "threshold": rng.uniform(0.1, 1, D_SAE),
    }
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})


def write_dictionary_learning(folder, dict_class, seed=0):
    """ae.pt and config.json as dictionary_learning's trainers save them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    layouts = {
        "AutoEncoder": {
            "bias": r(D_IN),
            "encoder.weight": r(D_SAE, D_IN),
            "encoder.bias": r(D_SAE),
            "decoder.weight": r(D_IN, D_SAE),
        },
        "GatedAutoEncoder": {
            "decoder_bias": r(D_IN),
            "encoder.weight": r(D_SAE, D_IN),
            "r_mag": r(D_SAE) * 0.1,
            "gate_bias": r(D_SAE),
            "mag_bias": r(D_SAE),
            "decoder.weight": r(D_IN, D_SAE),
        },
        "JumpReluAutoEncoder": {
            "W_enc": r(D_IN, D_SAE),
            "b_enc": r(D_SAE),
            "W_dec": r(D_SAE, D_IN),
            "b_dec": r(D_IN),
            "threshold": r(D_SAE).abs() + 0.1,
        },
        "AutoEncoderTopK": {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(-1.0),
            "decoder.weight": r(D_IN, D_SAE),
            "encoder.weight": r(D_SAE, D_IN),
            "encoder.bias": r(D_SAE),
            "b_dec": r(D_IN),
        },
        "BatchTopKSAE": {
            "k": torch.tensor(K, dtype=torch.int),
            "threshold": torch.tensor(0.7),
            "decoder.weight": r(D_IN, D_SAE),
            "encoder.weight": r(D_SAE, D_IN),
            "encoder.bias": r(D_SAE),
            "b_dec": r(D_IN),
        },
    }
    folder.mkdir(parents=True)
    torch.save(layouts[dict_class], folder / "ae.pt")
    trainer = {
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "lm_name": "tiny",
        "layer": 3,
        "submodule_name": "resid_post_layer_3",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return layouts[dict_class]


def dictionary_learning_by_hand(dict_class, w, x):
    """Each class's encode + decode as dictionary_learning computes them (up to its norm rescaling)."""
    if dict_class == "AutoEncoder":
        latents = torch.relu((x - w["bias"]) @ w["encoder.weight"].T + w["encoder.bias"])
        return latents @ w["decoder.weight"].T + w["bias"]
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - w["decoder_bias"]) @ w["encoder.weight"].T
        gate = (x_enc + w["gate_bias"] > 0).float()
        mag = torch.relu(w["r_mag"].exp() * x_enc + w["mag_bias"])
        return (gate * mag) @ w["decoder.weight"].T + w["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ w["W_enc"] + w["b_enc"]
        return torch.relu(pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    post = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    if dict_class == "BatchTopKSAE":
        f = post * (post > w["threshold"])
    else:
        top = post.topk(K, dim=-1)
        f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    return f @ w["decoder.weight"].T + w["b_dec"]


class CodeInPickle:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, ("touch " + self.marker,))


def saelens_weights(architecture, folder, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=g) + 0.1
    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    return w


def saelens_2_cfg(d_in, d_sae):
    """cfg.json as SAELens 2.x wrote it: its whole LanguageModelSAERunnerConfig, dtype as str(torch.float32)."""
    return {
        "model_name": "gpt2-small",
        "model_class_name": "HookedTransformer",
        "hook_point": "blocks.4.hook_resid_pre",
        "hook_point_eval": "blocks.{layer}.attn.pattern",
        "hook_point_layer": 4,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "streaming": True,
        "is_dataset_tokenized": False,
        "context_size": 128,
        "use_cached_activations": False,
        "cached_activations_path": None,
        "d_in": d_in,
        "d_sae": d_sae,
        "b_dec_init_method": "geometric_median",
        "expansion_factor": d_sae // d_in,
        "activation_fn": "relu",
        "normalize_sae_decoder": True,
        "noise_scale": 0.0,
        "from_pretrained_path": None,
        "apply_b_dec_to_input": True,
        "decoder_orthogonal_init": False,
        "decoder_heuristic_init": False,
        "init_encoder_as_decoder_transpose": False,
        "n_batches_in_buffer": 64,
        "training_tokens": 300_000_000,
        "finetuning_tokens": 0,
        "store_batch_size_prompts": 32,
        "train_batch_size_tokens": 4096,
        "normalize_activations": False,
        "device": "cuda",
        "seed": 42,
        "dtype": "torch.float32",
        "prepend_bos": True,
        "autocast": False,
        "compile_llm": False,
        "llm_compilation_mode": None,
        "compile_sae": False,
        "sae_compilation_mode": None,
        "adam_beta1": 0,
        "adam_beta2": 0.999,
        "mse_loss_normalization": None,
        "l1_coefficient": 8e-05,
        "lp_norm": 1,
        "scale_sparsity_penalty_by_decoder_norm": False,
        "l1_warm_up_steps": 0,
        "lr": 0.0004,
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": 5000,
        "lr_end": 4e-05,
        "lr_decay_steps": 0,
        "n_restart_cycles": 1,
        "finetuning_method": None,
        "use_ghost_grads": False,
        "feature_sampling_window": 1000,
        "dead_feature_window": 5000,
        "dead_feature_threshold": 1e-08,
        "n_eval_batches": 10,
        "eval_batch_size_prompts": None,
        "log_to_wandb": True,
        "log_activations_store_to_wandb": False,
        "log_optimizer_state_to_wandb": False,
        "wandb_project": "mats_sae_training_gpt2_small_resid_pre_5",
        "wandb_id": "a1b2c3",
        "run_name": "jb-l4",
        "wandb_entity": None,
        "wandb_log_frequency": 100,
        "eval_every_n_wandb_logs": 100,
        "resume": False,
        "n_checkpoints": 10,
        "checkpoint_path": "checkpoints/a1b2c3",
        "verbose": True,
        "model_kwargs": {},
        "model_from_pretrained_kwargs": {},
        "sae_lens_version": "2.1.3",
        "sae_lens_training_version": "2.1.3",
        "tokens_per_buffer": 33_554_432,
    }


def write_e2e_sae_run(folder, positions=("blocks.2.hook_resid_pre", "blocks.4.hook_resid_pre"), seed=0):
    """An e2e_sae run folder: SAETransformer.saes' state dict (positions with dashes) in samples_N.pt files and
    final_config.yaml. Decoder weight is (d_in, d_sae), normalised column-wise at use."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for position in positions:
        key = position.replace(".", "-")
        state.update(
            {
                f"{key}.encoder.0.weight": torch.randn(D_SAE, D_IN, generator=g),
                f"{key}.encoder.0.bias": torch.randn(D_SAE, generator=g),
                f"{key}.decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 3,
                f"{key}.decoder.bias": torch.randn(D_IN, generator=g),
            }
        )
    folder.mkdir(parents=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / "samples_1000.pt")  # older checkpoint
    torch.save(state, folder / "samples_25000.pt")
    (folder / "final_config.yaml").write_text(
        "tlens_model_name: gpt2\nsaes:\n  sae_positions: [" + ", ".join(positions) + "]\n"
        "  dict_size_to_input_ratio: 3.33\nloss:\n  logits_kl: {coeff: 1.0}\n"
    )
    return state


def e2e_sae_by_hand(state, position, x):
    """e2e_sae's SAE.forward: c = relu(encoder(x)); x_hat = c @ normalize(decoder.weight, dim=0).T + bias."""
    key = position.replace(".", "-")
    c = torch.relu(x @ state[f"{key}.encoder.0.weight"].T + state[f"{key}.encoder.0.bias"])
    dictionary = torch.nn.functional.normalize(state[f"{key}.decoder.weight"], dim=0)
    return c @ dictionary.T + state[f"{key}.decoder.bias"], c
