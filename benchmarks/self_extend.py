"""Self-Extend against plain attention at evaluation time: forward time and peak memory, side by side.

    python benchmarks/self_extend.py                          # lengths 2k..16k, window 1024, group 32
    python benchmarks/self_extend.py --lengths 4096,8192 --repeats 3

A random Llama (4 layers, hidden 512, 8 query / 4 k/v heads, head dim 64) runs one forward of its
decoder (no lm head, no KV cache) per repeat through the Hugging Face backend's model, with and
without `--self-extend`. Each measurement runs in a fresh process; peak memory is the growth of
the process's peak resident set (`ru_maxrss`) over its value once the model is built, i.e. what
the forward adds. Plain attention is torch SDPA (CPU flash kernel); Self-Extend is the blocked
kernel of megatron_harpe/eval/self_extend/core.py (two score sets per query block, merged, one softmax).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(length: int, window: int | None, group: int, repeats: int, queue) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_harpe.eval.self_extend.core import SelfExtendSettings
    from megatron_harpe.eval.self_extend.hf import install_self_extend

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=131072, attn_implementation="sdpa",
    )).eval()  # fmt: skip
    if window is not None:
        install_self_extend(model, SelfExtendSettings(window=window, group=group))
    ids = torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(1))
    baseline = peak_rss_mib()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model.get_decoder()(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - started)
    queue.put({"seconds": min(times), "peak_mib": peak_rss_mib() - baseline})


def run(length: int, window: int | None, group: int, repeats: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    process = context.Process(target=measure, args=(length, window, group, repeats, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"measurement at {length} tokens failed (exit code {process.exitcode})")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="forwards per measurement; the fastest counts")
    args = parser.parse_args()
    print(f"Self-Extend window={args.window} group={args.group} vs plain SDPA, one decoder forward, 1 thread")
    print(
        f"{'tokens':>7} | {'plain s':>8} | {'S-E s':>8} | {'time x':>6} | "
        f"{'plain MiB':>9} | {'S-E MiB':>8} | {'mem x':>6}"
    )
    for length in (int(value) for value in args.lengths.split(",")):
        plain = run(length, None, args.group, args.repeats)
        extended = run(length, args.window, args.group, args.repeats)
        print(
            f"{length:>7} | {plain['seconds']:>8.2f} | {extended['seconds']:>8.2f} | "
            f"{extended['seconds'] / plain['seconds']:>6.2f} | {plain['peak_mib']:>9.0f} | "
            f"{extended['peak_mib']:>8.0f} | {extended['peak_mib'] / max(plain['peak_mib'], 1.0):>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
