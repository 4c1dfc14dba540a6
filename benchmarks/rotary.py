"""HARPE's cost over plain RoPE, and the rotary memory one rank holds, measured side by side.

    python benchmarks/rotary.py                 # 4 layers, hidden 512, 8 heads, seq 4096
    python benchmarks/rotary.py --seq 1024 --repeats 3

Prints (1) forward+backward time of the same small model with `harpe` (8 distinct bases) and
with `abf` (one base: megatron's [s, 1, 1, d] table), interleaved run by run so machine noise
hits both alike (the order alternates per repeat), and their ratio for the fastest and the median
runs, in wall and in CPU time (goal: <= 1.05); (2) the bytes of rotary tables one rank
builds for Llama2-7B at 131072 tokens under TP=8, CP=4 against the naive full table
(goal: exactly 1/32); (3) the rotation alone, cached path and megatron's own apply.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from megatron_harpe.cli import quiet_third_party

quiet_third_party()  # before megatron-core's import: its warnings are not this benchmark's output

from megatron_harpe import parallel  # noqa: E402
from megatron_harpe.config import ModelConfig  # noqa: E402
from megatron_harpe.model import build_model  # noqa: E402
from megatron_harpe.position.config import PositionConfig  # noqa: E402
from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding  # noqa: E402


def time_step(model, tokens, positions) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of one forward+backward."""
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu_start


def compare_speed(args) -> None:
    model_cfg = ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1376, vocab_size=4096)
    encodings = {
        "harpe": PositionConfig(type="harpe", strategy="uniform", base_min=1e4, base_max=5e5),
        "abf": PositionConfig(type="abf", base=5e5),
    }
    models = {}
    for name, position in encodings.items():
        parallel.seed_everything(0)
        models[name] = build_model(model_cfg, position.resolve(model_cfg, args.seq))
    tokens = torch.randint(0, model_cfg.vocab_size, (1, args.seq))
    positions = torch.arange(args.seq)[None]
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up (and table caching) outside the measurement
        time_step(model, tokens, positions)
    load = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for name, model in models.items() if repeat % 2 == 0 else reversed(models.items()):
            wall, cpu_seconds = time_step(model, tokens, positions)
            times[name].append(wall)
            cpu[name].append(cpu_seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"forward+backward, 4 layers x hidden 512 x 8 heads, seq {args.seq}, {args.repeats} interleaved runs "
        f"(load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end):"
    )
    for name, value in median.items():
        print(f"  {name:6s} median {value:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    fastest = {name: min(values) for name, values in times.items()}
    print(
        f"  harpe / abf time ratio: median {median['harpe'] / median['abf']:.3f}, "
        f"fastest run {fastest['harpe'] / fastest['abf']:.3f}  (goal <= 1.05; on a busy machine trust the fastest)"
    )
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        f"  harpe / abf CPU-time ratio: median {cpu_median['harpe'] / cpu_median['abf']:.3f}, "
        f"fastest run {min(cpu['harpe']) / min(cpu['abf']):.3f}"
    )


def compare_apply(args) -> None:
    """The rotation alone (one [seq, 1, 8, 64] query, forward+backward, best of 20 in CPU time):
    per-head tables against one shared row, through the cached path and megatron's own apply."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_harpe.position import rotary

    config = TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=8, apply_rope_fusion=False)
    bases = [1e4 * (head + 1) for head in range(8)]
    tables = {
        "harpe": HeadwiseRotaryEmbedding(PositionConfig(type="harpe", bases=bases), bases, bases, 64)(args.seq)[0],
        "abf": HeadwiseRotaryEmbedding(PositionConfig(type="abf", base=5e5), [5e5] * 8, [5e5] * 8, 64)(args.seq)[0],
    }
    applies = {
        "cached": lambda t, table: rotary.apply_rotary_pos_emb(t, table, config),
        "megatron": lambda t, table: rope_utils.apply_rotary_pos_emb(t, table, config=config, cp_group=object()),
    }
    query = torch.randn(args.seq, 1, 8, 64, requires_grad=True)
    best = {(apply, name): float("inf") for apply in applies for name in tables}
    for _ in range(20):
        for apply, name in best:
            start = time.process_time()
            applies[apply](query, tables[name]).sum().backward()
            best[(apply, name)] = min(best[(apply, name)], time.process_time() - start)
    print(f"rotation of one query [{args.seq}, 1, 8, 64], forward+backward, best of 20 (CPU ms):")
    for apply in applies:
        print(
            f"  {apply:8s} harpe {best[(apply, 'harpe')] * 1e3:6.2f}  abf {best[(apply, 'abf')] * 1e3:6.2f}  "
            f"ratio {best[(apply, 'harpe')] / best[(apply, 'abf')]:.2f}"
        )


def compare_memory() -> None:
    llama = ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008)
    position = PositionConfig(type="harpe", strategy="paper").resolve(llama)
    seq, tp, cp = 131072, 8, 4
    naive = seq * llama.num_attention_heads * llama.head_dim * 4
    rotary = HeadwiseRotaryEmbedding(
        position,
        position.query_head_bases(llama),
        position.key_head_bases(llama),
        llama.head_dim,
        tp_rank=0,
        tp_size=tp,
        cp_rank=0,
        cp_size=cp,
    )
    query_table, key_table = rotary(seq)
    tables = [query_table] if key_table is query_table else [query_table, key_table]
    held = sum(table.numel() * 4 for table in tables)
    cos_sin = sum(table.rotary_cos_sin.nbytes() for table in tables)
    print(f"Llama2-7B rotary tables at {seq} tokens, TP={tp}, CP={cp}:")
    print(f"  naive full fp32 table: {naive / 2**30:.3f} GiB")
    print(f"  held by one rank:      {held / 2**20:.1f} MiB = 1/{naive / held:.0f} of naive (goal 1/{tp * cp})")
    print(
        f"  + their cached cos/sin: {cos_sin / 2**20:.1f} MiB (fp32, half width, distinct rows; shared by all layers, "
        "where megatron's apply made a cos/sin pair per layer)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parallel.initialize(1, 1)
    compare_memory()
    compare_apply(args)
    compare_speed(args)
    parallel.shutdown()


if __name__ == "__main__":
    main()
