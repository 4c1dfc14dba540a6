"""Tokenize + write throughput: `tools/prepare_data.py tokenize` (megatron_harpe's pipeline)
against Megatron-LM's `tools/preprocess_data.py`, at equal worker counts, side by side in one run.

    python benchmarks/data_prep.py                                   # 32 MB of Python sources, demo tokenizer
    python benchmarks/data_prep.py --workers 1 2 --repeats 3 --megabytes 32
    python benchmarks/data_prep.py --input my.jsonl --tokenizer llama2/tokenizer.model

Megatron-LM's script is not a pip package, so its loop is reimplemented here as that script runs
it with a sentencepiece model and `--append-eod` (core_v0.16.1): `Pool(workers).imap(encode,
lines, 32)`, each call `json.loads` + `encode_as_ids(text) + [eod]`, the main process calling
megatron-core's `IndexedDatasetBuilder.add_document` per document, then `finalize`. (Megatron-LM
calls sentencepiece through megatron-core's tokenizer wrapper; calling it directly here only
flatters the reference.) Ours runs `tokenize_corpus` with EOS and no BOS, which writes the same
files: every run's `.bin/.idx` must equal the reference's byte for byte.

The default corpus is one document per `.py` file of this Python installation (stdlib, then
site-packages, sorted) up to `--megabytes`: real text, no repeated copies (repeats would make
any cache look better than it is). Runs are interleaved (reference, ours, per worker count, per
repeat) so both see the same machine load; the ratio of wall tokens/s is printed for the fastest
and the median run at each worker count, with the scaling from the first worker count, and the
CPU seconds of all processes of each run (the steadier figure on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import sentencepiece

from megatron_harpe.cli import quiet_third_party

quiet_third_party()  # before megatron-core's import: its fallback warnings are not this benchmark's output

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

from megatron_harpe.data.demo_corpus import prepare_demo_data  # noqa: E402
from megatron_harpe.data.pipeline import tokenize_corpus  # noqa: E402

_SKIPPED_DIRECTORIES = {"test", "tests", "__pycache__", "idlelib", "tkinter", "turtledemo", "lib2to3"}


def build_source_corpus(output: Path, megabytes: float) -> Path:
    """`{"text": <file>}` per .py file of the stdlib and site-packages (sorted), until `megabytes`."""
    budget, written = megabytes * 1e6, 0
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    with open(output, "w", encoding="utf-8") as out:
        for root in roots:
            for directory, subdirectories, files in sorted(os.walk(root)):
                subdirectories[:] = sorted(
                    d for d in subdirectories if d not in _SKIPPED_DIRECTORIES and d != "site-packages"
                )
                for name in sorted(files):
                    if not name.endswith(".py"):
                        continue
                    try:
                        text = (Path(directory) / name).read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        continue
                    if not text.strip():
                        continue
                    line = json.dumps({"text": text}) + "\n"
                    out.write(line)
                    written += len(line)
                    if written >= budget:
                        return output
    return output


class MegatronLMEncoder:
    """Megatron-LM `tools/preprocess_data.py`'s `Encoder`: one tokenizer per worker (a class
    attribute set by the pool initializer), one json line per call."""

    processor: sentencepiece.SentencePieceProcessor | None = None

    def __init__(self, tokenizer_path: str) -> None:
        self.tokenizer_path = tokenizer_path

    def initializer(self) -> None:
        MegatronLMEncoder.processor = sentencepiece.SentencePieceProcessor(model_file=self.tokenizer_path)

    def encode(self, json_line: str) -> tuple[list[int], list[int], int]:
        text = json.loads(json_line)["text"]
        ids = MegatronLMEncoder.processor.encode_as_ids(text)
        ids.append(MegatronLMEncoder.processor.eos_id())  # --append-eod
        return ids, [len(ids)], len(json_line)


def megatron_lm_preprocess(input_path: Path, prefix: str, tokenizer_path: str, workers: int) -> int:
    """Megatron-LM's `Partition.process_json_file` loop with one partition and one json key."""
    encoder = MegatronLMEncoder(tokenizer_path)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path).get_piece_size()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    tokens = 0
    with open(input_path, encoding="utf-8") as lines:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=encoder.initializer)
        for ids, lengths, _ in pool.imap(encoder.encode, lines, 32):
            builder.add_document(ids, lengths)
            tokens += len(ids)
        pool.close()
        pool.join()
    builder.finalize(prefix + ".idx")
    return tokens


def megatron_harpe_tokenize(input_path: Path, prefix: str, tokenizer_path: str, workers: int) -> int:
    summary = tokenize_corpus(
        [input_path], prefix, tokenizer_path, add_bos=False, add_eos=True, workers=workers, write_report=False
    )
    return summary["tokens"]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pools)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


IMPLEMENTATIONS = {"Megatron-LM preprocess_data": megatron_lm_preprocess, "megatron_harpe": megatron_harpe_tokenize}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", default=None, help="jsonl with a 'text' field (default: Python sources, see --megabytes)"
    )
    parser.add_argument("--megabytes", type=float, default=32.0, help="size of the default corpus")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the demo tokenizer)")
    parser.add_argument("--workdir", default="work/demo", help="where the demo tokenizer lives or is built")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=sorted({1, 2, os.cpu_count() or 1}),
        help="worker counts to compare at (default: 1, 2 and all cores)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer_path = args.tokenizer or str(prepare_demo_data(args.workdir).tokenizer)
    scratch = Path(tempfile.mkdtemp(prefix="data_prep_bench_"))
    try:
        corpus = Path(args.input) if args.input else build_source_corpus(scratch / "corpus.jsonl", args.megabytes)
        print(
            f"input {corpus.stat().st_size / 1e6:.1f} MB ({corpus}), tokenizer {tokenizer_path}, "
            f"workers {args.workers}, "
            f"{args.repeats} interleaved repeats, load average {os.getloadavg()[0]:.2f} at start"
        )
        seconds: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        tokens = 0
        for repeat in range(args.repeats):
            for workers in args.workers:
                for name, function in IMPLEMENTATIONS.items():
                    prefix = str(scratch / f"{name.split()[0]}-{workers}-{repeat}")
                    started, cpu_started = time.perf_counter(), _cpu_seconds()
                    count = function(corpus, prefix, tokenizer_path, workers)
                    seconds.setdefault((name, workers), []).append(time.perf_counter() - started)
                    cpu.setdefault((name, workers), []).append(_cpu_seconds() - cpu_started)
                    reference = str(scratch / f"Megatron-LM-{workers}-{repeat}")
                    for suffix in (".bin", ".idx"):
                        same = Path(prefix + suffix).read_bytes() == Path(reference + suffix).read_bytes()
                        assert same, f"{name} wrote a different {suffix} than Megatron-LM's loop ({workers} workers)"
                    assert tokens in (0, count)
                    tokens = count
                    if name != "Megatron-LM preprocess_data":
                        for suffix in (".bin", ".idx"):
                            os.remove(reference + suffix)
                            os.remove(prefix + suffix)
        print(
            f"output identical to Megatron-LM's loop in every run ({tokens:,} tokens); "
            f"load average now {os.getloadavg()[0]:.2f}"
        )
        first = args.workers[0]
        for workers in args.workers:
            rates = {}
            for name in IMPLEMENTATIONS:
                runs = seconds[(name, workers)]
                rates[name] = (tokens / min(runs), tokens / statistics.median(runs))
                scaling = min(seconds[(name, first)]) / min(runs)
                print(
                    f"{workers} workers {name:>28}: {rates[name][0] / 1e6:6.3f} M tokens/s fastest, "
                    f"{rates[name][1] / 1e6:6.3f} median (runs {', '.join(f'{s:.2f}s' for s in runs)}; "
                    f"x{scaling:.2f} of {first} worker(s)); CPU s (all processes) "
                    f"{', '.join(f'{s:.2f}' for s in cpu[(name, workers)])}"
                )
            ours, theirs = rates["megatron_harpe"], rates["Megatron-LM preprocess_data"]
            print(
                f"{workers} workers: megatron_harpe / Megatron-LM wall tokens/s = {ours[0] / theirs[0]:.2f}x fastest, "
                f"{ours[1] / theirs[1]:.2f}x median"
            )
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
