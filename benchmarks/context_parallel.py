"""Peak memory per rank and step time with context parallelism 2 against 1, side by side.

    python benchmarks/context_parallel.py                  # seq 8192, 4 layers, hidden 256
    python benchmarks/context_parallel.py --seq 4096 --steps 2

Each layout runs in fresh processes (gloo, one thread each). Peak memory is the growth of the
process's peak resident set (`ru_maxrss`) over its value once the model is built, i.e. what
training steps add: activations, gradients, optimizer states, gathered keys/values. Prints both
layouts and the ratios (goal: CP=2 memory per rank <= 0.6 x CP=1).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from megatron_harpe.cli import quiet_third_party

quiet_third_party()  # before megatron-core's import: its warnings are not this benchmark's output

from megatron_harpe import parallel  # noqa: E402
from megatron_harpe.config import ModelConfig  # noqa: E402
from megatron_harpe.model import build_model  # noqa: E402
from megatron_harpe.position.config import PositionConfig  # noqa: E402
from megatron_harpe.position.rotary import context_parallel_positions  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def benchmark_model(context: int, seq: int):
    """(parallel context, model config, model, AdamW) of the benchmark's HARPE model on fresh ranks."""
    ctx = parallel.initialize(1, context)
    parallel.seed_everything(0)
    model_cfg = ModelConfig(
        num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=688, vocab_size=8192
    )
    position = PositionConfig(type="harpe", strategy="uniform", base_min=1e4, base_max=5e5).resolve(model_cfg, seq)
    model = build_model(model_cfg, position)
    return ctx, model_cfg, model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def measure(context: int, seq: int, steps: int) -> dict:
    ctx, model_cfg, model, optimizer = benchmark_model(context, seq)
    tokens = torch.randint(0, model_cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    local = context_parallel_positions(seq, ctx.cp_rank, context).long()
    inputs, labels = tokens[:, :-1][:, local], tokens[:, 1:][:, local]
    baseline = peak_rss_mib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(inputs, local[None], None, labels=labels).sum() / seq
        loss.backward()
        for param in model.parameters():  # CP ranks hold the same weights: sum partial gradients
            torch.distributed.all_reduce(param.grad, group=ctx.cp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak_rss_mib() - baseline, "step_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for context in (1, 2):
        per_rank = parallel.run_on_ranks(measure, context, context, args.seq, args.steps)
        results[context] = {
            "peak_mib": max(r["peak_mib"] for r in per_rank),
            "step_s": max(r["step_s"] for r in per_rank),
        }
    print(f"4 layers x hidden 256 x 8 heads (4 k/v groups), sequence {args.seq}, best of {args.steps} steps:")
    for context, result in results.items():
        print(
            f"  CP={context}: peak memory added per rank {result['peak_mib']:8.1f} MiB, step {result['step_s']:.2f} s"
        )
    print(f"  CP=2 / CP=1 memory per rank: {results[2]['peak_mib'] / results[1]['peak_mib']:.2f}  (goal <= 0.6)")
    print(f"  CP=2 / CP=1 step time:       {results[2]['step_s'] / results[1]['step_s']:.2f}")


if __name__ == "__main__":
    main()
