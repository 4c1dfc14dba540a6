"""Greedy generation time of the megatron backend (KV cache) against the HF backend on the same
model, with identical outputs required.

    python tools/convert_checkpoint.py hf-to-megatron --input DIR --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --output smol_ckpt
    python tools/convert_checkpoint.py megatron-to-hf --input smol_ckpt --output smol_hf
    python benchmarks/generation_speed.py --megatron smol_ckpt --hf smol_hf --length 2048 --new-tokens 32

The prompt is prose from the default haystack cut to `length - new_tokens` tokens (BOS first when
the tokenizer wants one), so prompt plus answer fill `length`. Each backend generates `--repeats`
times, alternating, in one process (fp32, CPU); the best time of each is reported, so a busy
machine distorts the ratio less. `--recompute` also times the megatron backend without its
cache (one full forward per new token).
"""  # noqa: E501 - each example stays on one line in --help

from __future__ import annotations

import argparse
import time

import torch

from megatron_harpe.eval.backends import load_backend
from megatron_harpe.eval.backends.base import encode_prompt
from megatron_harpe.eval.tasks.haystack import load_prose_sentences


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    text = " ".join(load_prose_sentences())
    ids = encode_prompt(tokenizer, text)
    if len(ids) < tokens:
        raise ValueError(f"the haystack has only {len(ids)} tokens, fewer than {tokens}")
    return ids[:tokens]


def timed(backend, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    output = backend.generate(ids, new_tokens)
    return time.perf_counter() - start, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron", required=True, help="megatron_harpe checkpoint")
    parser.add_argument("--hf", required=True, help="Hugging Face directory of the same model")
    parser.add_argument("--length", type=int, default=2048, help="prompt + new tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated")
    parser.add_argument("--repeats", type=int, default=2, help="runs per backend (best time reported)")
    parser.add_argument("--recompute", action="store_true", help="also time the megatron backend without its cache")
    parser.add_argument("--trust-remote-code", action="store_true", help="HF backend: a HARPE export")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backends = {
        "megatron": load_backend(args.megatron),
        "hf": load_backend(args.hf, trust_remote_code=args.trust_remote_code),
    }
    ids = prompt_ids(backends["hf"].tokenizer, args.length - args.new_tokens)
    times: dict[str, list[float]] = {name: [] for name in backends}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, backend in backends.items():
            seconds, outputs[name] = timed(backend, ids, args.new_tokens)
            times[name].append(seconds)
    if args.recompute:
        backends["megatron"].kv_cache = False
        seconds, outputs["megatron_recompute"] = timed(backends["megatron"], ids, args.new_tokens)
        times["megatron_recompute"] = [seconds]
    identical = len({tuple(output) for output in outputs.values()}) == 1
    print(f"prompt {len(ids)} tokens + {args.new_tokens} new ({len(outputs['hf'])} generated before EOS/limit)")
    for name, values in times.items():
        print(f"{name:20s} best {min(values):7.2f} s   runs {', '.join(f'{v:.2f}' for v in values)}")
    print(f"megatron / hf time: {min(times['megatron']) / min(times['hf']):.2f}x; outputs identical: {identical}")
    if not identical:
        for name, output in outputs.items():
            print(f"  {name}: {output}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
