"""Sliding-window perplexity of long documents at growing context lengths, as the HARPE
paper (arXiv 2412.07171) reports it.

    from megatron_harpe.eval.perplexity import load_documents, perplexity_by_length
    documents = load_documents("data/proofpile_test.jsonl", backend.tokenizer, max_documents=20)
    perplexity_by_length(backend, documents, lengths=[4096, 8192], stride=256)

Protocol (the one of the YaRN / LongLoRA evaluations the paper compares with): at context
length L, every document with at least L tokens is cut to its first `max(L, document_tokens)`
tokens and scored with windows of L tokens that move by `stride` (capped at L - 1, so no token
is left without context); each token after the first is scored once,
by the first window that reaches it, so after the first window every token sees at least
L - stride tokens of context. With the default document_tokens = L this is one window of L
tokens per document. Perplexity = exp(total negative log likelihood / scored tokens), pooled
over documents. Documents shorter than L are skipped and the count says how many were used.

Sources: a `.jsonl` (or `.jsonl.zst`) with one document per line under `text_key`, a `.txt`
file (one document), or a Megatron indexed dataset prefix (`PREFIX.bin` + `PREFIX.idx`, read
with megatron-core; its tokens must come from the model's tokenizer).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Iterator

from tqdm import tqdm

from megatron_harpe.eval.backends.base import ModelBackend, Tokenizer, encode_prompt

DEFAULT_STRIDE = 256


def sliding_window_nll(backend: ModelBackend, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """(sum of -log p over scored tokens, number of scored tokens) for one document."""
    if window < 2:
        raise ValueError(f"window {window} is too small: it must hold at least two tokens")
    if not 1 <= stride < window:
        raise ValueError(
            f"stride {stride} must be at least 1 and smaller than the window ({window}): "
            "otherwise the first token of each later window would have no context and "
            "never be scored"
        )
    total, scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        new_tokens = end - previous_end
        logprobs = backend.token_logprobs(ids[begin:end])
        taken = logprobs[-min(new_tokens, len(logprobs)) :]
        total -= float(taken.double().sum())
        scored += len(taken)
        previous_end = end
        if end == len(ids):
            break
    assert scored == len(ids) - 1, "every token after the first is scored exactly once"
    return total, scored


def _read_jsonl_texts(path: str, text_key: str) -> Iterator[str]:
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
    else:
        stream = open(path, encoding="utf-8")
    with stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_key not in record:
                raise ValueError(
                    f"{path}:{line_number} has no {text_key!r} field: choose the text field with the tool's "
                    f"text-key option with one of {sorted(record)}"
                )
            yield record[text_key]


def _megatron_prefix(path: str) -> str | None:
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"):
        return prefix
    return None


def _read_megatron_documents(prefix: str, vocab_size: int) -> Iterator[list[int]]:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    boundaries = dataset.document_indices
    for document in range(len(boundaries) - 1):
        pieces = [dataset[i] for i in range(int(boundaries[document]), int(boundaries[document + 1]))]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise ValueError(
                f"{prefix} holds token id {int(tokens.max())} but the model's vocabulary has "
                f"{vocab_size} entries: tokenize the data with the model's tokenizer"
            )
        yield tokens.tolist()


def load_documents(
    path: str,
    tokenizer: Tokenizer,
    text_key: str = "text",
    max_documents: int | None = None,
    min_tokens: int = 0,
) -> list[list[int]]:
    """Token ids of up to `max_documents` documents with at least `min_tokens` tokens, in file
    order. Text is tokenized like a prompt (BOS first when the model expects it)."""
    prefix = _megatron_prefix(path)
    if prefix is not None:
        source: Iterator[list[int]] = _read_megatron_documents(prefix, tokenizer.vocab_size)
    elif path.endswith((".jsonl", ".jsonl.zst")):
        source = (encode_prompt(tokenizer, text) for text in _read_jsonl_texts(path, text_key))
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            source = iter([encode_prompt(tokenizer, handle.read())])
    else:
        raise ValueError(
            f"cannot read documents from {path!r}: give a .jsonl, .jsonl.zst or .txt "
            "file, or a Megatron dataset prefix with .bin and .idx files"
        )
    documents: list[list[int]] = []
    for ids in source:
        if len(ids) >= min_tokens:
            documents.append(ids)
            if max_documents is not None and len(documents) >= max_documents:
                break
    if not documents:
        raise ValueError(
            f"{path!r} has no document with at least {min_tokens} tokens: use longer documents or shorter --lengths"
        )
    return documents


def perplexity_by_length(
    backend: ModelBackend,
    documents: list[list[int]],
    lengths: list[int],
    stride: int = DEFAULT_STRIDE,
    document_tokens: int | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """{length: {"ppl", "nll", "tokens", "documents", "stride", "document_tokens"}}; "ppl" is
    None when no document reaches that length."""
    results: dict[int, dict] = {}
    for length in lengths:
        scope = max(length, document_tokens or length)
        effective_stride = min(stride, length - 1)
        eligible = [ids for ids in documents if len(ids) >= length]
        total, scored = 0.0, 0
        for ids in tqdm(eligible, desc=f"ppl @ {length}", disable=not progress, leave=False):
            nll, count = sliding_window_nll(backend, ids[:scope], window=length, stride=effective_stride)
            total += nll
            scored += count
        results[length] = {
            "ppl": math.exp(total / scored) if scored else None,
            "nll": total / scored if scored else None,
            "tokens": scored,
            "documents": len(eligible),
            "stride": effective_stride,
            "document_tokens": scope,
        }
    return results
