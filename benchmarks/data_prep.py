"""Tokenize + write throughput: megatron_harpe's batched pipeline against the straightforward
one-document-at-a-time reference (Megatron-LM's preprocessing: `Pool.imap` over lines, each
worker parses and tokenizes one document, the main process calls `add_item` + `end_document`),
both with the same number of worker processes, side by side in one run.

    python benchmarks/data_prep.py                                  # demo corpus x3, demo tokenizer
    python benchmarks/data_prep.py --workers 2 --copies 5 --repeats 3
    python benchmarks/data_prep.py --tokenizer llama2/tokenizer.model --input my.jsonl

Prints tokens per wall-clock second and per CPU second (all processes) of each, and their
ratios (medians over repeats, runs interleaved); CPU seconds are the steadier figure on a
shared machine. Checks that both wrote byte-identical .bin/.idx files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece
import tokenizers
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_harpe.data.demo_corpus import prepare_demo_data
from megatron_harpe.data.indexed import token_dtype
from megatron_harpe.data.pipeline import tokenize_corpus
from megatron_harpe.data.tokenizer import load_tokenizer


class _ReferenceEncoder:
    """Megatron-LM style: one tokenizer per worker, called on one json line at a time, the
    tokenizer library used directly (sentencepiece's encode_as_ids / tokenizers' encode)."""

    encode_text = None

    def __init__(self, tokenizer_path: str, bos_id: int, eos_id: int) -> None:
        self.tokenizer_path, self.bos_id, self.eos_id = tokenizer_path, bos_id, eos_id

    def initializer(self) -> None:
        if self.tokenizer_path.endswith(".model"):
            processor = sentencepiece.SentencePieceProcessor(model_file=self.tokenizer_path)
            _ReferenceEncoder.encode_text = processor.encode_as_ids
        else:
            hf = tokenizers.Tokenizer.from_file(self.tokenizer_path)
            _ReferenceEncoder.encode_text = lambda text: hf.encode(text, add_special_tokens=False).ids

    def encode(self, json_line: str) -> tuple[list[int], int]:
        text = json.loads(json_line)["text"]
        ids = [self.bos_id] + _ReferenceEncoder.encode_text(text) + [self.eos_id]
        return ids, len(json_line)


def reference_tokenize(input_path: Path, prefix: str, tokenizer_path: str, workers: int) -> int:
    tokenizer = load_tokenizer(tokenizer_path)
    encoder = _ReferenceEncoder(tokenizer.path, tokenizer.bos_id, tokenizer.eos_id)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(tokenizer.vocab_size))
    tokens = 0
    with open(input_path, encoding="utf-8") as lines, multiprocessing.get_context("fork").Pool(workers, encoder.initializer) as pool:
        for ids, _ in pool.imap(encoder.encode, lines, 32):
            builder.add_item(torch.IntTensor(ids))
            builder.end_document()
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pools)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ours_tokenize(input_path: Path, prefix: str, tokenizer_path: str, workers: int) -> int:
    summary = tokenize_corpus([input_path], prefix, tokenizer_path, workers=workers, write_report=False)
    return summary["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default=None, help="jsonl with a 'text' field (default: the demo corpus)")
    parser.add_argument("--tokenizer", default=None, help="default: the demo sentencepiece model")
    parser.add_argument("--workdir", default="work/demo", help="where the demo corpus/tokenizer live or are built")
    parser.add_argument("--copies", type=int, default=3, help="repeat the input this many times")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.input is None or args.tokenizer is None:
        demo = prepare_demo_data(args.workdir)
    input_path = Path(args.input) if args.input else demo.corpus
    tokenizer_path = args.tokenizer or str(demo.tokenizer)
    scratch = Path(tempfile.mkdtemp(prefix="data_prep_bench_"))
    try:
        corpus = scratch / "corpus.jsonl"
        with open(corpus, "wb") as out:
            for _ in range(args.copies):
                out.write(input_path.read_bytes())
        size_mb = corpus.stat().st_size / 1e6
        print(f"input {size_mb:.1f} MB ({args.copies} x {input_path}), tokenizer {tokenizer_path}, {args.workers} workers")
        timings: dict[str, list[float]] = {"reference": [], "megatron_harpe": []}
        cpu: dict[str, list[float]] = {"reference": [], "megatron_harpe": []}
        tokens = {}
        for repeat in range(args.repeats):
            for name, function in (("reference", reference_tokenize), ("megatron_harpe", ours_tokenize)):
                prefix = str(scratch / f"{name}-{repeat}")
                started, cpu_started = time.perf_counter(), _cpu_seconds()
                tokens[name] = function(corpus, prefix, tokenizer_path, args.workers)
                timings[name].append(time.perf_counter() - started)
                cpu[name].append(_cpu_seconds() - cpu_started)
        for suffix in (".bin", ".idx"):
            same = (scratch / f"reference-0{suffix}").read_bytes() == (scratch / f"megatron_harpe-0{suffix}").read_bytes()
            print(f"identical {suffix}: {same}")
        assert tokens["reference"] == tokens["megatron_harpe"]
        rates = {name: tokens[name] / statistics.median(seconds) for name, seconds in timings.items()}
        cpu_rates = {name: tokens[name] / statistics.median(seconds) for name, seconds in cpu.items()}
        for name, seconds in timings.items():
            print(f"{name:>15}: {rates[name] / 1e6:6.3f} M tokens/s wall, {cpu_rates[name] / 1e6:6.3f} M tokens/CPU-s  "
                  f"(wall runs: {', '.join(f'{s:.2f}s' for s in seconds)}; CPU: {', '.join(f'{s:.2f}s' for s in cpu[name])})")
        print(f"speedup megatron_harpe / reference ({tokens['reference']:,} tokens): "
              f"{rates['megatron_harpe'] / rates['reference']:.2f}x wall, "
              f"{cpu_rates['megatron_harpe'] / cpu_rates['reference']:.2f}x CPU")
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
