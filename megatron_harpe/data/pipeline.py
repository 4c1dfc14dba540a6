"""The stages of data preparation as functions: upsample, tokenize (+ shards and merge), both
fused (`prepare`), and a length report. `tools/prepare_data.py` is a thin CLI over these.

    summary = upsample_corpus(["raw/"], "work/upsampled.jsonl.zst", UpsampleConfig(total_tokens=10**9),
                              tokenizer="tokenizer.model")
    summary = tokenize_corpus(["work/upsampled.jsonl.zst"], "work/train", tokenizer="tokenizer.model")
    summary = prepare(["raw/"], "work/train", UpsampleConfig(total_tokens=10**9), tokenizer="tokenizer.model")

Every stage writes `<output>.summary.json` and `<output>.report.png` next to its output (tokens
per source, share of tokens in long documents, skipped lines by kind) and returns the summary.
Outputs appear under their final names only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_harpe import cli
from megatron_harpe.data import report as reporting
from megatron_harpe.data.encoding import LLAMA_CHARS_PER_TOKEN, ChunkResult, EncodeOptions, encode_chunks
from megatron_harpe.data.identity import (
    describe_tokenizer,
    file_sha256,
    read_summary,
    same_tokenizer,
    tokenizer_identity,
)
from megatron_harpe.data.indexed import DatasetWriter, check_output_prefix, dataset_exists, merge_datasets, token_dtype
from megatron_harpe.data.jsonl import (
    FieldSpec,
    LineChunk,
    ProblemLog,
    atomic_output,
    expand_inputs,
    open_compressed_writer,
    read_line_chunks,
)
from megatron_harpe.data.output_lock import output_lock
from megatron_harpe.data.tokenizer import load_tokenizer
from megatron_harpe.data.upsample import LengthUpsampler, UpsampleConfig

LENGTH_MEASURES = ("tokens", "chars")
_OUTPUT_SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".json")


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))


def report_prefix(output: str | Path) -> str:
    """`work/up.jsonl.zst` -> `work/up`; a dataset prefix stays as is."""
    name = str(output)
    for suffix in _OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _finish_report(
    summary: dict[str, Any], stages: dict[str, dict], output: str | Path, title: str, threshold: int
) -> dict[str, Any]:
    prefix = report_prefix(output)
    summary["summary_json"] = f"{prefix}.summary.json"
    summary["report_png"] = reporting.plot_report(stages, f"{prefix}.report.png", title, threshold).as_posix()
    reporting.write_json(summary, summary["summary_json"])
    print(reporting.format_table(stages))
    return summary


def _lengths(result: ChunkResult, measure: str) -> np.ndarray:
    if measure == "tokens":
        assert result.text_tokens is not None
        return result.text_tokens.astype(np.float64)
    return result.chars / LLAMA_CHARS_PER_TOKEN


def _chunks(files: list[Path], description: str, progress: bool) -> Iterator[LineChunk]:
    """The line chunks of `files`, with a progress bar (rate, ETA) over their bytes on disk when
    `progress` (megatron_harpe.cli.show_progress: a terminal, rank 0, no --no-progress)."""
    total = sum(os.path.getsize(path) for path in files)
    with cli.progress_bar(total, description, enabled=progress, unit="B", unit_scale=True) as bar:
        yield from read_line_chunks(files, on_bytes=bar.update)


def _check_measure(measure: str, tokenizer: str | None) -> None:
    if measure not in LENGTH_MEASURES:
        raise ValueError(f"length measure {measure!r} is unknown: choose tokens or chars")
    if measure == "tokens" and tokenizer is None:
        raise ValueError("measuring lengths in tokens needs --tokenizer (or pass --length-estimate chars)")


def _selected(
    results: Iterator[ChunkResult],
    sampler: LengthUpsampler,
    measure: str,
    problems: ProblemLog,
    before: reporting.LengthStats,
    after: reporting.LengthStats,
) -> Iterator[tuple[ChunkResult, np.ndarray]]:
    """Apply the sampler to every document; yield each chunk with its boolean keep mask."""
    for result in results:
        for problem in result.problems:
            problems.add(problem)
        problems.add_documents(result.path, result.num_documents)
        lengths = _lengths(result, measure)
        keep = np.zeros(result.num_documents, dtype=bool)
        for index, (source, length) in enumerate(zip(result.sources, lengths.tolist())):
            before.add(source, length)
            if sampler.offer(source, length):
                keep[index] = True
                after.add(source, length)
            if sampler.finished:
                break
        yield result, keep
        if sampler.finished:
            return


def upsample_corpus(
    inputs: list[str | Path],
    output: str | Path,
    config: UpsampleConfig,
    *,
    tokenizer: str | None = None,
    length_measure: str = "tokens",
    fields: FieldSpec = FieldSpec(),
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Select documents by the length-upsampling rule and write their original jsonl lines to
    `output` (compressed by suffix: .gz, .zst)."""
    _check_measure(length_measure, tokenizer)
    with output_lock(output, "output"):
        sampler = LengthUpsampler(config)
        files = expand_inputs(inputs)
        options = EncodeOptions(
            fields=fields,
            tokenizer_path=tokenizer if length_measure == "tokens" else None,
            keep_ids=False,
            keep_raw_lines=True,
        )
        problems = ProblemLog(strict=strict)
        before, after = reporting.LengthStats(config.length_threshold), reporting.LengthStats(config.length_threshold)
        started = time.perf_counter()
        kept = 0
        output = Path(output)
        with atomic_output(output, overwrite=overwrite) as temporary:
            with open_compressed_writer(temporary, output.name) as stream:
                results = encode_chunks(
                    _chunks(files, "upsample", progress), options, workers if workers is not None else default_workers()
                )
                with contextlib.closing(results):
                    for result, keep in _selected(results, sampler, length_measure, problems, before, after):
                        assert result.raw_lines is not None
                        for raw, take in zip(result.raw_lines, keep.tolist()):
                            if take:
                                stream.write(raw if raw.endswith(b"\n") else raw + b"\n")
                                kept += 1
            problems.check_files()
            if kept == 0:
                raise ValueError(
                    f"no document kept for {output} ({problems.total} lines skipped as bad input): check "
                    "--text-key / --source-key, the mode and the input files (nothing was written)"
                )
        summary = {
            "stage": "upsample",
            "inputs": [str(path) for path in files],
            "output": str(output),
            "upsample": dataclasses.asdict(config),
            "length_measure": length_measure,
            "tokenizer": tokenizer,
            "documents_kept": kept,
            "budgets": sampler.budget_report(),
            "finished_by_budget": sampler.finished,
            "seconds": round(time.perf_counter() - started, 3),
            "problems": problems.summary(),
            "before": before.to_dict(),
            "after": after.to_dict(),
        }
        stages = {"before upsampling": summary["before"], "after upsampling": summary["after"]}
        return _finish_report(
            summary, stages, output, f"upsample ({config.mode}, lengths in {length_measure})", config.length_threshold
        )


def _write_documents(
    results: Iterator[ChunkResult], writer: DatasetWriter, problems: ProblemLog, stats: reporting.LengthStats
) -> None:
    with contextlib.closing(results):
        for result in results:
            for problem in result.problems:
                problems.add(problem)
            problems.add_documents(result.path, result.num_documents)
            if result.num_documents:
                assert result.ids is not None and result.doc_lengths is not None and result.text_tokens is not None
                writer.add_documents(result.ids, result.doc_lengths)
                stats.add_many(result.sources, result.text_tokens)


def _refuse_empty(writer: DatasetWriter, problems: ProblemLog) -> None:
    """An empty dataset only fails later, in training: stop here (nothing is written)."""
    if writer.documents == 0:
        raise ValueError(
            f"no documents to write to {writer.prefix} ({problems.total} lines skipped as bad input; "
            f"first: {problems.examples[:1]}): check --text-key / --source-key and the input files"
        )


def _shard_settings(path: Path, options: EncodeOptions) -> dict[str, Any]:
    """What a shard was made from, by content: the input file (size, time) and the tokenizer's
    hash (a tokenizer retrained to the same path is another tokenizer)."""
    status = path.stat()
    return {
        "input": str(path.resolve()),
        "input_bytes": status.st_size,
        "input_mtime_ns": status.st_mtime_ns,
        "options": json.loads(json.dumps(dataclasses.asdict(options))),
        "tokenizer_sha256": file_sha256(options.tokenizer_path) if options.tokenizer_path else None,
    }


def _tokenize_shards(
    files: list[Path],
    shard_dir: Path,
    options: EncodeOptions,
    vocab_size: int,
    workers: int,
    problems: ProblemLog,
    stats: reporting.LengthStats,
    overwrite: bool,
    progress: bool = False,
) -> list[str]:
    """One shard dataset per input file, each with a `.shard.json` sidecar (settings, counts).
    A shard whose sidecar matches the current settings is reused, so a rerun resumes at the
    first unfinished file; one made with other settings is an error unless `overwrite`, which
    rewrites it and removes shards beyond the current inputs."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for stale in sorted(shard_dir.glob("shard-*.*")):
            index = stale.name.split(".")[0].removeprefix("shard-")
            if index.isdigit() and int(index) >= len(files):
                stale.unlink()
    prefixes = []
    for index, path in enumerate(files):
        prefix = shard_dir / f"shard-{index:05d}"
        sidecar = Path(f"{prefix}.shard.json")
        settings = _shard_settings(path, options)
        recorded = json.loads(sidecar.read_text()) if dataset_exists(prefix) and sidecar.is_file() else None
        if recorded is not None and recorded.get("settings") != settings and not overwrite:
            raise ValueError(
                f"shard {prefix} was written from other input or settings (input file, tokenizer content, "
                f"options): delete {shard_dir} or pass --overwrite"
            )
        if recorded is not None and recorded.get("settings") == settings:
            problems.merge(_problem_log_from(recorded["problems"]))
            stats.merge_state(recorded["lengths"])
        else:
            shard_problems = ProblemLog(strict=problems.strict, stream=problems.stream)
            shard_stats = reporting.LengthStats(stats.long_threshold)
            if sidecar.exists():
                sidecar.unlink()
            with DatasetWriter(prefix, vocab_size, overwrite=True) as writer:
                chunks = _chunks([path], f"shard {index + 1}/{len(files)}", progress)
                _write_documents(encode_chunks(chunks, options, workers), writer, shard_problems, shard_stats)
            reporting.write_json(
                {"settings": settings, "problems": shard_problems.counts, "lengths": shard_stats.state()}, sidecar
            )
            problems.merge(shard_problems)
            stats.merge_state(shard_stats.state())
        prefixes.append(str(prefix))
    return prefixes


def _problem_log_from(counts: dict[str, int]) -> ProblemLog:
    log = ProblemLog()
    log.counts.update(counts)
    return log


def tokenize_corpus(
    inputs: list[str | Path],
    output_prefix: str | Path,
    tokenizer: str,
    *,
    fields: FieldSpec = FieldSpec(source_field=None),
    add_bos: bool = True,
    add_eos: bool = True,
    vocab_size: int | None = None,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    shard_dir: str | Path | None = None,
    long_threshold: int = 4096,
    write_report: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize jsonl documents into the Megatron dataset `output_prefix.bin/.idx`, one
    document per line in input order, BOS/EOS per document as asked. With `shard_dir`, each
    input file becomes its own shard dataset first (reused on a rerun), then shards are merged.
    `write_report=False` skips the summary files (the summary is still returned); `progress`
    draws a bar with an ETA over the input bytes."""
    with output_lock(output_prefix, "dataset"):
        check_output_prefix(output_prefix, overwrite)
        files = expand_inputs(inputs)
        loaded = load_tokenizer(tokenizer)
        limit = vocab_size or loaded.vocab_size
        if limit < loaded.vocab_size:
            print(
                f"note: ids >= --vocab-size {limit} (tokenizer has {loaded.vocab_size}) "
                "are reported as out of vocabulary"
            )
        options = EncodeOptions(
            fields=fields, tokenizer_path=loaded.path, add_bos=add_bos, add_eos=add_eos, vocab_limit=limit
        )
        workers = workers if workers is not None else default_workers()
        problems = ProblemLog(strict=strict)
        stats = reporting.LengthStats(long_threshold)
        started = time.perf_counter()
        with DatasetWriter(output_prefix, limit, overwrite=overwrite) as writer:
            if shard_dir is not None:
                with output_lock(shard_dir, "shard directory", lock_path=Path(shard_dir) / "shards.lock"):
                    for shard in _tokenize_shards(
                        files, Path(shard_dir), options, limit, workers, problems, stats, overwrite, progress
                    ):
                        writer.add_dataset(shard)
            else:
                _write_documents(
                    encode_chunks(_chunks(files, "tokenize", progress), options, workers), writer, problems, stats
                )
            problems.check_files()
            _refuse_empty(writer, problems)
        seconds = time.perf_counter() - started
        summary = {
            "stage": "tokenize",
            "inputs": [str(path) for path in files],
            "output_prefix": str(output_prefix),
            "tokenizer": loaded.path,
            "tokenizer_identity": tokenizer_identity(loaded),
            "vocab_size": limit,
            "max_token_id": writer.max_token_id,
            "dtype": np.dtype(token_dtype(limit)).name,
            "add_bos": add_bos,
            "add_eos": add_eos,
            "documents": writer.documents,
            "tokens": writer.tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(writer.tokens / seconds) if seconds > 0 else None,
            "workers": workers,
            "problems": problems.summary(),
            "lengths": stats.to_dict(),
        }
        if not write_report:
            return summary
        return _finish_report(
            summary, {"written": summary["lengths"]}, output_prefix, "tokenized dataset", long_threshold
        )


def merge_corpus(inputs: list[str | Path], output_prefix: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Concatenate datasets into `output_prefix` (merge_datasets) and record in its summary the
    tokenizer that made them all; datasets made by different tokenizers are refused."""
    with output_lock(output_prefix, "dataset"):
        check_output_prefix(output_prefix, overwrite)
        identities = {}
        for prefix in inputs:
            recorded = (read_summary(prefix) or {}).get("tokenizer_identity")
            if isinstance(recorded, dict):
                identities[str(prefix)] = recorded
        (first, identity), *others = identities.items() or [(None, None)]
        for prefix, other in others:
            if not same_tokenizer(identity, other):
                raise ValueError(
                    f"{first} was tokenized with {describe_tokenizer(identity)} but {prefix} with "
                    f"{describe_tokenizer(other)}: merge datasets of one tokenizer only"
                )
        documents, tokens, max_token_id = merge_datasets(inputs, output_prefix, overwrite=overwrite)
        summary = {
            "stage": "merge",
            "inputs": [str(prefix) for prefix in inputs],
            "output_prefix": str(output_prefix),
            "documents": documents,
            "tokens": tokens,
            "max_token_id": max_token_id,
        }
        if identity is not None and len(identities) == len(inputs):
            summary["tokenizer"], summary["tokenizer_identity"] = identity.get("path"), identity
        reporting.write_json(summary, f"{output_prefix}.summary.json")
        return summary


def prepare(
    inputs: list[str | Path],
    output_prefix: str | Path,
    config: UpsampleConfig,
    tokenizer: str,
    *,
    fields: FieldSpec = FieldSpec(),
    length_measure: str = "tokens",
    add_bos: bool = True,
    add_eos: bool = True,
    vocab_size: int | None = None,
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Upsample and tokenize in one pass: every document is tokenized once, the rule decides on
    its length, and kept documents go straight into `output_prefix.bin/.idx`."""
    _check_measure(length_measure, tokenizer)
    with output_lock(output_prefix, "dataset"):
        check_output_prefix(output_prefix, overwrite)
        sampler = LengthUpsampler(config)
        files = expand_inputs(inputs)
        loaded = load_tokenizer(tokenizer)
        limit = vocab_size or loaded.vocab_size
        options = EncodeOptions(
            fields=fields, tokenizer_path=loaded.path, add_bos=add_bos, add_eos=add_eos, vocab_limit=limit
        )
        problems = ProblemLog(strict=strict)
        before, after = reporting.LengthStats(config.length_threshold), reporting.LengthStats(config.length_threshold)
        started = time.perf_counter()
        workers = workers if workers is not None else default_workers()
        with DatasetWriter(output_prefix, limit, overwrite=overwrite) as writer:
            results = encode_chunks(_chunks(files, "prepare", progress), options, workers)
            with contextlib.closing(results):
                for result, keep in _selected(results, sampler, length_measure, problems, before, after):
                    if keep.any():
                        assert result.ids is not None and result.doc_lengths is not None
                        document_of_token = np.repeat(np.arange(result.num_documents), result.doc_lengths)
                        writer.add_documents(result.ids[keep[document_of_token]], result.doc_lengths[keep])
            problems.check_files()
            _refuse_empty(writer, problems)
        summary = {
            "stage": "prepare",
            "inputs": [str(path) for path in files],
            "output_prefix": str(output_prefix),
            "upsample": dataclasses.asdict(config),
            "length_measure": length_measure,
            "tokenizer": loaded.path,
            "tokenizer_identity": tokenizer_identity(loaded),
            "vocab_size": limit,
            "max_token_id": writer.max_token_id,
            "add_bos": add_bos,
            "add_eos": add_eos,
            "documents": writer.documents,
            "tokens": writer.tokens,
            "budgets": sampler.budget_report(),
            "finished_by_budget": sampler.finished,
            "seconds": round(time.perf_counter() - started, 3),
            "workers": workers,
            "problems": problems.summary(),
            "before": before.to_dict(),
            "after": after.to_dict(),
        }
        stages = {"before upsampling": summary["before"], "after upsampling": summary["after"]}
        return _finish_report(
            summary,
            stages,
            output_prefix,
            f"prepare ({config.mode}, lengths in {length_measure})",
            config.length_threshold,
        )


def corpus_report(
    inputs: list[str | Path],
    output_prefix: str | Path,
    *,
    compare: list[str | Path] | None = None,
    tokenizer: str | None = None,
    length_measure: str = "tokens",
    fields: FieldSpec = FieldSpec(),
    long_threshold: int = 4096,
    workers: int | None = None,
    overwrite: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Length statistics per source of a corpus (and optionally a second one, e.g. its
    upsampled version) as `output_prefix.summary.json` and `.report.png`."""
    _check_measure(length_measure, tokenizer)
    for existing in (f"{report_prefix(output_prefix)}.summary.json", f"{report_prefix(output_prefix)}.report.png"):
        cli.refuse_existing(existing, overwrite, "report")
    options = EncodeOptions(
        fields=fields, tokenizer_path=tokenizer if length_measure == "tokens" else None, keep_ids=False
    )
    stages: dict[str, dict] = {}
    problem_summaries = {}
    for label, corpus in (("input", inputs), ("compare", compare)):
        if not corpus:
            continue
        stats, problems = reporting.LengthStats(long_threshold), ProblemLog()
        results = encode_chunks(
            _chunks(expand_inputs(corpus), f"report ({label})", progress),
            options,
            workers if workers is not None else default_workers(),
        )
        with contextlib.closing(results):
            for result in results:
                for problem in result.problems:
                    problems.add(problem)
                stats.add_many(result.sources, _lengths(result, length_measure))
        stages[label] = stats.to_dict()
        problem_summaries[label] = problems.summary()
    summary = {
        "stage": "report",
        "inputs": [str(p) for p in inputs],
        "compare": [str(p) for p in compare or []],
        "length_measure": length_measure,
        "tokenizer": tokenizer,
        "long_threshold": long_threshold,
        "problems": problem_summaries,
        "stages": stages,
    }
    return _finish_report(summary, stages, output_prefix, f"corpus lengths (in {length_measure})", long_threshold)
