"""Parallel parsing and tokenization of jsonl line chunks, in input order.

The work unit is a `LineChunk` (a few hundred raw lines of one file). A worker process loads
the tokenizer once, parses every line, encodes all texts of the chunk in one batched call and
returns a `ChunkResult` holding numpy arrays (cheap to send back), never Python lists of ids:

    options = EncodeOptions(tokenizer_path="tokenizer.model", fields=FieldSpec(), add_bos=True, add_eos=True)
    for result in encode_chunks(read_line_chunks(files), options, workers=2):
        writer.add_documents(result.ids, result.doc_lengths)

This module imports neither torch nor megatron, so forked workers start instantly.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from megatron_harpe.data.jsonl import Document, FieldSpec, LineChunk, Problem, parse_line
from megatron_harpe.data.tokenizer import Tokenizer, load_tokenizer

LLAMA_CHARS_PER_TOKEN = 3.68
"""The characters-per-token estimate of Fu et al. 2024 for the Llama2 tokenizer."""


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    fields: FieldSpec = FieldSpec()
    tokenizer_path: str | None = None
    """None: no tokenization (lengths are then character counts only)."""
    add_bos: bool = True
    add_eos: bool = True
    vocab_limit: int | None = None
    """Largest valid id + 1 (the model's vocabulary); None: the tokenizer's vocabulary size."""
    keep_ids: bool = True
    """Return the token ids; False returns only lengths (length measurement for upsampling)."""
    keep_raw_lines: bool = False
    """Return the raw input line of every valid document (to write selected documents back)."""


@dataclasses.dataclass
class ChunkResult:
    """The valid documents of one chunk, in input order, and the problems found in it."""

    path: str
    line_numbers: np.ndarray
    sources: list[str | None]
    chars: np.ndarray
    text_tokens: np.ndarray | None
    """Tokens per document without BOS/EOS; None when not tokenized."""
    ids: np.ndarray | None
    """All documents' ids (with BOS/EOS) concatenated; split them with `doc_lengths`."""
    doc_lengths: np.ndarray | None
    raw_lines: list[bytes] | None
    problems: list[Problem]

    @property
    def num_documents(self) -> int:
        return len(self.line_numbers)


_worker_options: EncodeOptions | None = None
_worker_tokenizer: Tokenizer | None = None
_worker_threads = -1


def _init_worker(options: EncodeOptions, threads: int = -1) -> None:
    global _worker_options, _worker_tokenizer, _worker_threads
    _worker_options = options
    _worker_tokenizer = load_tokenizer(options.tokenizer_path) if options.tokenizer_path else None
    _worker_threads = threads


def _encode_chunk(chunk: LineChunk) -> ChunkResult:
    options, tokenizer = _worker_options, _worker_tokenizer
    assert options is not None, "worker not initialized"
    documents: list[Document] = []
    raw_lines: list[bytes] = []
    problems: list[Problem] = []
    for offset, raw in enumerate(chunk.lines):
        parsed = parse_line(raw, options.fields, chunk.path, chunk.first_line_number + offset)
        if isinstance(parsed, Problem):
            problems.append(parsed)
        elif parsed is not None:
            documents.append(parsed)
            if options.keep_raw_lines:
                raw_lines.append(raw)
    text_tokens = ids = doc_lengths = None
    if tokenizer is not None:
        flat, text_tokens = tokenizer.encode_flat([doc.text for doc in documents], _worker_threads)
        limit = options.vocab_limit or tokenizer.vocab_size
        if flat.size and int(flat.max()) >= limit:
            valid = _drop_out_of_vocabulary(flat, text_tokens, limit, documents, chunk.path, tokenizer.path, problems)
            flat = flat[np.repeat(valid, text_tokens)]
            documents = [doc for doc, ok in zip(documents, valid.tolist()) if ok]
            raw_lines = (
                [raw for raw, ok in zip(raw_lines, valid.tolist()) if ok] if options.keep_raw_lines else raw_lines
            )
            text_tokens = text_tokens[valid]
        if options.keep_ids:
            ids, doc_lengths = _add_specials(flat, text_tokens, tokenizer, options, limit)
    return ChunkResult(
        path=chunk.path,
        line_numbers=np.array([doc.line_number for doc in documents], dtype=np.int64),
        sources=[doc.source for doc in documents],
        chars=np.array([len(doc.text) for doc in documents], dtype=np.int64),
        text_tokens=text_tokens,
        ids=ids,
        doc_lengths=doc_lengths,
        raw_lines=raw_lines if options.keep_raw_lines else None,
        problems=problems,
    )


def _drop_out_of_vocabulary(
    flat: np.ndarray,
    text_tokens: np.ndarray,
    limit: int,
    documents: list[Document],
    path: str,
    tokenizer_path: str,
    problems: list[Problem],
) -> np.ndarray:
    """Report every document holding an id >= `limit`; return the mask of the others."""
    ends = np.cumsum(text_tokens)
    valid = np.ones(len(documents), dtype=bool)
    for index, (doc, end, count) in enumerate(zip(documents, ends.tolist(), text_tokens.tolist())):
        largest = int(flat[end - count : end].max()) if count else 0
        if largest >= limit:
            valid[index] = False
            problems.append(
                Problem(
                    "token_out_of_vocabulary",
                    path,
                    doc.line_number,
                    f"token id {largest} >= vocabulary size {limit} (tokenizer {tokenizer_path}); "
                    "use the model's tokenizer or raise --vocab-size",
                )
            )
    return valid


def _add_specials(
    flat: np.ndarray, text_tokens: np.ndarray, tokenizer: Tokenizer, options: EncodeOptions, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids with BOS/EOS around each, concatenated, and their lengths. Ids travel as
    uint16 when the vocabulary allows (megatron-core's on-disk dtype then), else int32."""
    prefix = [tokenizer.bos_id] if options.add_bos else []
    suffix = [tokenizer.eos_id] if options.add_eos else []
    assert None not in prefix + suffix, "encode_chunks checks BOS/EOS exist before starting workers"
    largest_special = max(prefix + suffix, default=0)
    dtype = np.uint16 if max(limit, largest_special + 1) <= np.iinfo(np.uint16).max + 1 else np.int32
    lengths = text_tokens + len(prefix) + len(suffix)
    ids = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    is_text = np.ones(ids.size, dtype=bool)
    if prefix:
        ids[ends - lengths] = prefix[0]
        is_text[ends - lengths] = False
    if suffix:
        ids[ends - 1] = suffix[0]
        is_text[ends - 1] = False
    ids[is_text] = flat
    return ids, lengths


Item = TypeVar("Item")
Result = TypeVar("Result")


def ordered_parallel_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple,
    max_in_flight: int | None = None,
) -> Iterator[Result]:
    """`map(function, items)` over `workers` processes, results in input order, with at most
    `max_in_flight` items queued (Pool.imap would read the whole input ahead into memory).
    `workers <= 0` runs in this process. Closing the iterator early terminates the workers."""
    if workers <= 0:
        initializer(*initargs)
        for item in items:
            yield function(item)
        return
    max_in_flight = max_in_flight or 4 * workers
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def encode_chunks(chunks: Iterable[LineChunk], options: EncodeOptions, workers: int) -> Iterator[ChunkResult]:
    """Parse (and tokenize, if `options.tokenizer_path`) chunks in parallel, in input order."""
    if options.tokenizer_path:
        probe = load_tokenizer(options.tokenizer_path)  # fail here, not in every worker
        if options.keep_ids:
            for flag, token_id, name in (
                (options.add_bos, probe.bos_id, "BOS"),
                (options.add_eos, probe.eos_id, "EOS"),
            ):
                if flag and token_id is None:
                    raise ValueError(
                        f"tokenizer {probe.path} has no {name} token: disable it (--no-{name.lower()}) "
                        "or use a tokenizer that defines it"
                    )
    # one sentencepiece thread per worker process; all cores when encoding in this process
    return ordered_parallel_map(_encode_chunk, chunks, workers, _init_worker, (options, 1 if workers > 0 else -1))
