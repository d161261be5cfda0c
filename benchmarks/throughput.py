"""Throughput of SAE training steps and of activation harvesting, as ratios to this machine's matmul peak.

    python benchmarks/throughput.py [--d_in 576] [--d_sae 4608] [--batch 1024] [--no-model]

A dense SAE step needs five (batch x d_in x d_sae) matmuls, a sparse TopK step one; the bound printed for each
is that many matmuls at the measured peak. Figures are from one run: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import saelab
from saelab.training import TrainConfig, Trainer


def timed(fn, seconds: float = 3.0) -> float:
    """Mean seconds per call, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def matmul_seconds(batch: int, d_in: int, d_sae: int) -> float:
    a, b = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    return timed(lambda: a @ b)


def step_seconds(architecture: str, batch: int, d_in: int, d_sae: int, **options) -> float:
    sae = saelab.create_sae(architecture, d_in=d_in, d_sae=d_sae, **options)
    trainer = Trainer(sae, TrainConfig(total_tokens=10**12, batch_size=batch, progress_bar=False))
    trainer.prepared = True
    x = torch.randn(batch, d_in) * 3
    return timed(lambda: trainer.train_step(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_in", type=int, default=576)
    parser.add_argument("--d_sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--no-model", action="store_true", help="skip the harvesting benchmark (needs the default model)")
    args = parser.parse_args()
    b, d, n = args.batch, args.d_in, args.d_sae
    gemm = matmul_seconds(b, d, n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one {b}x{d}x{n} fp32 matmul: "
          f"{gemm * 1e3:.1f} ms = {2 * b * d * n / gemm / 1e9:.0f} GFLOP/s (the peak used below)")
    print(f"{'SAE step':<28}{'tokens/s':>10}{'ms/step':>9}{'bound':>8}{'ratio':>7}")
    cases = [
        ("topk k=32 (sparse kernels)", "topk", {"k": 32}, 1),
        ("topk k=32 (dense)", "topk", {"k": 32, "_dense": True}, 5),
        ("standard (ReLU + L1)", "standard", {}, 5),
        ("jumprelu", "jumprelu", {}, 5),
    ]
    for label, arch, options, matmuls in cases:
        dense = options.pop("_dense", False)
        if dense:
            saelab.saes.topk.TopKSAE.sparse_training = False
        seconds = step_seconds(arch, b, d, n, **options)
        saelab.saes.topk.TopKSAE.sparse_training = True
        bound = matmuls * gemm
        print(f"{label:<28}{b / seconds:>10.0f}{seconds * 1e3:>9.1f}{matmuls:>6}mm{bound / seconds:>7.2f}")
    if not args.no_model:
        from saelab.models import load_model

        model = load_model()
        tokens = torch.randint(3, 40000, (16, 128))
        for layer in (5, 15, 29):
            seconds = timed(lambda: model.run_with_cache(tokens, [f"blocks.{layer}.hook_resid_post"]))
            print(f"harvest SmolLM2-135M blocks.{layer}.hook_resid_post: {tokens.numel() / seconds:.0f} tokens/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
