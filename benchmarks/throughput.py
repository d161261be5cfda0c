"""Throughput of SAE training steps and of activation harvesting, as ratios to bounds measured on this machine.

    python benchmarks/throughput.py [--d_in 576] [--d_sae 4608] [--batch 2048] [--large] [--no-model]

Bounds, from one fp32 (batch x d_in x d_sae) matmul timed here into a preallocated output:
- dense bound = 5 such matmuls (encoder forward, decoder forward, two for the decoder backward, one for the
  encoder weight gradient): what any dense SAE step must do;
- sparse bound = 1 matmul (the encoder forward): with k << d_sae, TopK's decoder and both weight gradients
  can be sparse.
Each case runs twice, in float32 and under `train.autocast` (bfloat16 matmuls, float32 weights), against bounds
from a float32 and a bfloat16 matmul respectively. Each case runs in its own process, so its peak resident
memory is its own. Harvesting, in float32 and with the model in bfloat16, is compared with the bare model
forward stopped at the same block. Figures are from one run: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial

import torch

CASES = {  # name: (architecture, options, dense SAE step?)
    "standard": ("standard", {}, True),
    "gated": ("gated", {}, True),
    "jumprelu": ("jumprelu", {}, True),
    "topk (dense)": ("topk", {"k": 32}, True),
    "topk": ("topk", {"k": 32}, False),
    "batchtopk": ("batchtopk", {"k": 32}, False),
    "matryoshka": ("matryoshka", {"k": 32}, False),
}


def timed(fn, seconds: float = 4.0) -> float:
    """Mean seconds per call, after two warm-up calls."""
    fn()
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def matmul_seconds(batch: int, d_in: int, d_sae: int, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(batch, d_in, dtype=dtype), torch.randn(d_in, d_sae, dtype=dtype)
    out = torch.empty(batch, d_sae, dtype=dtype)
    return timed(lambda: torch.mm(a, b, out=out))


def run_case(name: str, batch: int, d_in: int, d_sae: int, autocast: bool = False) -> dict:
    """Train-step time and peak memory of one case (run in a fresh process)."""
    import saelab
    from saelab.training import TrainConfig, Trainer

    architecture, options, dense = CASES[name]
    if architecture == "matryoshka":
        options = {**options, "matryoshka_widths": [d_sae // 8, d_sae // 2, d_sae]}
    sae = saelab.create_sae(architecture, d_in=d_in, d_sae=d_sae, **options)
    if dense and architecture == "topk":
        sae.sparse_training = False
    config = TrainConfig(total_tokens=10**12, batch_size=batch, progress_bar=False, autocast=autocast)
    trainer = Trainer(sae, config)
    trainer.prepared = True
    x = torch.randn(batch, d_in) * 3
    seconds = timed(lambda: trainer.train_step(x))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the bound's matmul in the same process, just after the step: the machine's speed drifts between processes
    gemm = matmul_seconds(batch, d_in, d_sae, torch.bfloat16 if autocast else torch.float32)
    return {"seconds": seconds, "peak_mib": peak_mib, "gemm": gemm}


def harvest_rates(
    layers: list[int], dtype: str = "float32", contexts: int = 16, context_size: int = 128
) -> list[tuple[int, float, float]]:
    """(layer, harvest tokens/s, bare forward tokens/s) on the default model."""
    from saelab.activations.harvest import Harvester
    from saelab.models import load_model

    model = load_model(dtype=dtype)
    tokens = torch.randint(3, 40000, (contexts, context_size))
    tokens[:, 0] = model.tokenizer.bos_token_id
    results = []
    for layer in layers:
        harvester = Harvester(model, [f"blocks.{layer}.hook_resid_post"], [model.tokenizer.bos_token_id])
        harvest = timed(partial(harvester, tokens))
        base, all_blocks = model.model.model, model.blocks
        base.layers = all_blocks[: layer + 1]  # the same model cut after the block: no hooks, no copies
        try:
            with torch.no_grad():
                bare = timed(partial(base, input_ids=tokens, use_cache=False))
        finally:
            base.layers = all_blocks
        results.append((layer, tokens.numel() / harvest, tokens.numel() / bare))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_in", type=int, default=576)
    parser.add_argument("--d_sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--large", action="store_true", help="also d_in 2304, d_sae 16384 (a 2B model's width)")
    parser.add_argument(
        "--no-model", action="store_true", help="skip the harvesting benchmark (needs the default model)"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in a subprocess
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)  # internal, with --case
    args = parser.parse_args()
    from saelab.training.memory import keep_freed_memory

    keep_freed_memory()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.d_in, args.d_sae, args.autocast)))
        return
    shapes = [(args.batch, args.d_in, args.d_sae)] + ([(args.batch, 2304, 16384)] if args.large else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for b, d, n in shapes:
        gemm, gemm16 = matmul_seconds(b, d, n), matmul_seconds(b, d, n, torch.bfloat16)
        print(
            f"\nbatch {b}, d_in {d}, d_sae {n}: one matmul {gemm * 1e3:.1f} ms float32 "
            f"({2 * b * d * n / gemm / 1e9:.0f} GFLOP/s), {gemm16 * 1e3:.1f} ms bfloat16 "
            "(each case re-measures its own)"
        )
        print(
            f"{'SAE step':<16}{'tokens/s':>10}{'ms/step':>9}{'peak MiB':>10}{'/ dense bound':>15}"
            f"{'/ sparse bound':>16}{'autocast tok/s':>16}{'speed-up':>10}{'/ bf16 bound':>14}"
        )
        speeds = {}
        for name, (_, _, dense) in CASES.items():
            results = {}
            for autocast in (False, True):
                command = [
                    sys.executable,
                    __file__,
                    "--case",
                    name,
                    "--batch",
                    str(b),
                    "--d_in",
                    str(d),
                    "--d_sae",
                    str(n),
                ]
                out = subprocess.run(command + ["--autocast"] * autocast, capture_output=True, text=True, check=True)
                results[autocast] = json.loads(out.stdout.strip().splitlines()[-1])
            fp32, bf16 = results[False], results[True]
            speeds[name] = b / fp32["seconds"]
            matmuls = 1 if not dense else 5
            dense_ratio = f"{5 * fp32['gemm'] / fp32['seconds']:>15.2f}"
            sparse_ratio = f"{'':>16}" if dense else f"{fp32['gemm'] / fp32['seconds']:>16.2f}"
            print(
                f"{name:<16}{b / fp32['seconds']:>10.0f}{fp32['seconds'] * 1e3:>9.1f}{fp32['peak_mib']:>10.0f}"
                f"{dense_ratio}{sparse_ratio}{b / bf16['seconds']:>16.0f}{fp32['seconds'] / bf16['seconds']:>9.1f}x"
                f"{matmuls * bf16['gemm'] / bf16['seconds']:>14.2f}"
            )
        print(f"sparse over dense TopK: {speeds['topk'] / speeds['topk (dense)']:.1f}x")
    if not args.no_model:
        for dtype in ("float32", "bfloat16"):
            print(f"\nharvesting SmolLM2-135M in {dtype}, 16 x 128 tokens:")
            for layer, harvest, bare in harvest_rates([5, 15, 29], dtype):
                print(
                    f"  blocks.{layer}.hook_resid_post: {harvest:,.0f} tokens/s; "
                    f"bare forward to that block {bare:,.0f}; overhead {100 * (bare / harvest - 1):+.1f}%"
                )


if __name__ == "__main__":
    main()
