"""Throughput of SAE training steps and of activation harvesting, as ratios to bounds measured on this machine.

    python benchmarks/throughput.py [--d_in 576] [--d_sae 4608] [--batch 2048] [--large] [--curve] [--no-model]

Bounds, from one fp32 (batch x d_in x d_sae) matmul timed here into a preallocated output:
- dense bound = 5 such matmuls (encoder forward, decoder forward, two for the decoder backward, one for the
  encoder weight gradient): what any dense SAE step must do;
- own bound = the matmuls the architecture cannot avoid: 5 for a dense step, 7 for gated (its auxiliary loss
  decodes the gate again and back-propagates through it), 1 for the sparse TopK family (the encoder forward:
  with k << d_sae, the decoder and both weight gradients can be sparse);
- own bound + Adam = that plus one optimiser step over all weights (timed alone in the same process), which
  every step pays and which does not scale with the matmul speed: ratios to it compare across machines.
Each case runs twice, in float32 and under `train.autocast` (bfloat16 matmuls, float32 weights), against bounds
from a float32 and a bfloat16 matmul respectively. Each case runs in its own process, so its peak resident
memory is its own. `--curve` times the TopK step for d_sae 16k-64k at d_in 576 and 2304 (memory and time
should grow with d_sae through the encoder matmul and the weights only). Harvesting, in float32 and with the
model in bfloat16, is compared with the bare model forward stopped at the same block. Figures are from one run:
compare ratios, not absolute numbers.
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

CASES = {  # name: (architecture, options, dense SAE step?, matmuls the step cannot avoid)
    "standard": ("standard", {}, True, 5),
    "gated": ("gated", {}, True, 7),
    "jumprelu": ("jumprelu", {}, True, 5),
    "topk (dense)": ("topk", {"k": 32}, True, 5),
    "topk": ("topk", {"k": 32}, False, 1),
    "batchtopk": ("batchtopk", {"k": 32}, False, 1),
    "matryoshka": ("matryoshka", {"k": 32}, False, 1),
}


def timed(fn, seconds: float = 4.0, device: str = "cpu", warmup: int = 2, min_calls: int = 3) -> float:
    """Mean seconds per call over at least `seconds` and `min_calls` calls, after `warmup` calls (on a GPU, its
    queue drained before each clock reading)."""

    def call() -> None:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < min_calls:
        call()
        calls += 1
    return (time.perf_counter() - start) / calls


def bound_matmul(batch: int, d_in: int, d_sae: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The bounds' (batch x d_in x d_sae) matmul, into a preallocated output, as a function to time."""
    a, b = torch.randn(batch, d_in, dtype=dtype, device=device), torch.randn(d_in, d_sae, dtype=dtype, device=device)
    out = torch.empty(batch, d_sae, dtype=dtype, device=device)
    return lambda: torch.mm(a, b, out=out)


def matmul_seconds(batch: int, d_in: int, d_sae: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    return timed(bound_matmul(batch, d_in, d_sae, dtype, device), device=device)


def run_case(
    name: str, batch: int, d_in: int, d_sae: int, autocast: bool = False, budget: float = 4.0, device: str = "cpu"
) -> dict:
    """Train-step time, peak resident memory (of the process: run it in a fresh one), the Adam step's time and
    the bound's matmul time of one case."""
    import saelab
    from saelab.training import TrainConfig, Trainer

    architecture, options, dense, _ = CASES[name]
    if architecture == "matryoshka":
        options = {**options, "matryoshka_widths": [d_sae // 8, d_sae // 2, d_sae]}
    sae = saelab.create_sae(architecture, d_in=d_in, d_sae=d_sae, device=device, **options)
    if dense and architecture == "topk":
        sae.sparse_training = False
    config = TrainConfig(total_tokens=10**12, batch_size=batch, progress_bar=False, autocast=autocast)
    trainer = Trainer(sae, config)
    trainer.prepared = True
    x = torch.randn(batch, d_in, device=device) * 3

    def step() -> None:
        trainer.train_step(x)

    matmul = bound_matmul(batch, d_in, d_sae, torch.bfloat16 if autocast else torch.float32, device)
    for warmup in (step, step, matmul, matmul):
        warmup()
    # The machine's speed drifts by ~10% within a minute: the step and its bound's matmul take turns in short
    # rounds, and each keeps its median round, so that a ratio compares the two at the same speed.
    rounds = [(timed(step, budget / 5, device, 0, 1), timed(matmul, budget / 10, device, 0, 1)) for _ in range(5)]
    seconds, gemm = (sorted(times)[2] for times in zip(*rounds, strict=True))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    adam = timed(trainer.units[0].optimizer.step, budget / 2, device)  # the last step's gradients are still there
    return {"seconds": seconds, "peak_mib": peak_mib, "gemm": gemm, "adam": adam}


def harvest_rates(
    layers: list[int], dtype: str = "float32", contexts: int = 16, context_size: int = 128, device: str = "cpu"
) -> list[tuple[int, float, float]]:
    """(layer, harvest tokens/s, bare forward tokens/s) on the default model."""
    from saelab.activations.harvest import Harvester
    from saelab.models import load_model

    model = load_model(dtype=dtype, device=device)
    tokens = torch.randint(3, 40000, (contexts, context_size), device=device)
    tokens[:, 0] = model.tokenizer.bos_token_id
    results = []
    for layer in layers:
        harvester = Harvester(model, [f"blocks.{layer}.hook_resid_post"], [model.tokenizer.bos_token_id])
        harvest = timed(partial(harvester, tokens), device=device)
        base, all_blocks = model.model.model, model.blocks
        base.layers = all_blocks[: layer + 1]  # the same model cut after the block: no hooks, no copies
        try:
            with torch.no_grad():
                bare = timed(partial(base, input_ids=tokens, use_cache=False), device=device)
        finally:
            base.layers = all_blocks
        results.append((layer, tokens.numel() / harvest, tokens.numel() / bare))
    return results


def case_in_subprocess(name: str, batch: int, d_in: int, d_sae: int, autocast: bool, budget: float) -> dict:
    """`run_case` in a fresh process (its own peak memory, no allocator state from earlier cases)."""
    command = [sys.executable, __file__, "--case", name, "--batch", str(batch), "--d_in", str(d_in)]
    command += ["--d_sae", str(d_sae), "--budget", str(budget)] + ["--autocast"] * autocast
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_table(batch: int, d_in: int, d_sae: int) -> None:
    gemm, gemm16 = matmul_seconds(batch, d_in, d_sae), matmul_seconds(batch, d_in, d_sae, torch.bfloat16)
    print(
        f"\nbatch {batch}, d_in {d_in}, d_sae {d_sae}: one matmul {gemm * 1e3:.1f} ms float32 "
        f"({2 * batch * d_in * d_sae / gemm / 1e9:.0f} GFLOP/s), {gemm16 * 1e3:.1f} ms bfloat16 "
        "(each case re-measures its own)"
    )
    print(
        f"{'SAE step':<14}{'tokens/s':>9}{'ms/step':>9}{'peak MiB':>9}{'Adam ms':>8}{'/ dense':>8}{'matmuls':>8}"
        f"{'/ own':>7}{'/ own+Adam':>11}{'autocast tok/s':>15}{'speed-up':>9}{'/ bf16 own':>11}"
    )
    speeds = {}
    for name, (_, _, _, matmuls) in CASES.items():
        fp32, bf16 = (case_in_subprocess(name, batch, d_in, d_sae, autocast, 4.0) for autocast in (False, True))
        speeds[name] = batch / fp32["seconds"]
        own = matmuls * fp32["gemm"]
        print(
            f"{name:<14}{batch / fp32['seconds']:>9.0f}{fp32['seconds'] * 1e3:>9.1f}{fp32['peak_mib']:>9.0f}"
            f"{fp32['adam'] * 1e3:>8.1f}{5 * fp32['gemm'] / fp32['seconds']:>8.2f}{matmuls:>8}"
            f"{own / fp32['seconds']:>7.2f}{(own + fp32['adam']) / fp32['seconds']:>11.2f}"
            f"{batch / bf16['seconds']:>15.0f}{fp32['seconds'] / bf16['seconds']:>8.1f}x"
            f"{matmuls * bf16['gemm'] / bf16['seconds']:>11.2f}"
        )
    print(f"sparse over dense TopK: {speeds['topk'] / speeds['topk (dense)']:.1f}x")


def width_curve(batch: int) -> None:
    """The TopK step (float32) as the dictionary grows: time, memory and the ratio to its one-matmul bound."""
    print(f"\nTopK k 32, batch {batch}, float32, as d_sae grows:")
    header = f"{'d_in':>6}{'d_sae':>8}{'ms/step':>9}{'tokens/s':>9}{'peak MiB':>9}{'matmul ms':>10}{'Adam ms':>8}"
    print(header + f"{'/ own':>7}")
    for d_in in (576, 2304):
        for d_sae in (16384, 32768, 65536):
            r = case_in_subprocess("topk", batch, d_in, d_sae, False, 2.0)
            print(
                f"{d_in:>6}{d_sae:>8}{r['seconds'] * 1e3:>9.0f}{batch / r['seconds']:>9.0f}{r['peak_mib']:>9.0f}"
                f"{r['gemm'] * 1e3:>10.1f}{r['adam'] * 1e3:>8.1f}{r['gemm'] / r['seconds']:>7.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_in", type=int, default=576, help="SAE input width (SmolLM2-135M's is 576)")
    parser.add_argument("--d_sae", type=int, default=4608, help="number of latents")
    parser.add_argument("--batch", type=int, default=2048, help="tokens per training step")
    parser.add_argument("--large", action="store_true", help="also d_in 2304, d_sae 16384 (a 2B model's width)")
    parser.add_argument("--curve", action="store_true", help="also the TopK step for d_sae 16k-64k, d_in 576 and 2304")
    parser.add_argument("--no-model", action="store_true", help="skip harvesting (which needs the default model)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in a subprocess
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)  # internal, with --case
    parser.add_argument("--budget", type=float, default=4.0, help=argparse.SUPPRESS)  # internal, with --case
    args = parser.parse_args()
    from saelab.training.memory import keep_freed_memory

    keep_freed_memory()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.d_in, args.d_sae, args.autocast, args.budget)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for d_in, d_sae in [(args.d_in, args.d_sae)] + ([(2304, 16384)] if args.large else []):
        step_table(args.batch, d_in, d_sae)
    if args.curve:
        width_curve(args.batch)
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
