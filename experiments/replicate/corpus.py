"""Synthetic long-context corpora of the CPU replication, written as jsonl and tokenized into
Megatron .bin/.idx through `tools/prepare_data.py` (the entry point users run at scale).

    python experiments/replicate/corpus.py --output runs/replicate_data --base-length 128 \\
        --target-length 1024 --base-tokens 3000000 --extension-tokens 600000

Documents follow the grammar of `megatron_harpe.eval.tasks.synthetic_kv` (filler cycle, `set KEY to
D D D .` needles, `get KEY ans D D D .` queries). Every document is exactly as many tokens as
the sequence it is meant to fill (BOS + words + EOS), so packed training windows of that
length hold one whole document. The extension corpus mixes in short documents (a share of its
tokens at 1/8..1/2 of the target length): short-context retrieval keeps being trained while the
context grows, and the multi-stage schedule's shorter windows still see whole short documents.

Next to each tokenized corpus goes a loss-mask dataset (`<name>_answer_mask`, read by the
trainer through `data.loss_mask_prefixes`) marking the answer digits of every query, so the
loss falls on retrieval only: the random needle keys and values and the filler gaps carry
no learnable signal and would only add noise to the gradient.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_harpe import files  # noqa: E402
from megatron_harpe.data.indexed import DatasetWriter, dataset_exists, read_documents  # noqa: E402
from megatron_harpe.eval.tasks.synthetic_kv import answer_mask, training_document, write_tokenizer  # noqa: E402

SPECIAL_TOKENS_PER_DOCUMENT = 2  # BOS and EOS added by prepare_data.py


def document_lengths(total_tokens: int, full_length: int, short_share: float, rng: random.Random) -> list[int]:
    """Token lengths of the documents of one corpus: `short_share` of the tokens in documents of
    full_length / 8, / 4 or / 2 (whole multiples of full_length in total, so packing stays
    aligned), the rest at full_length."""
    if full_length < 16 or total_tokens < full_length:
        raise ValueError(f"need full_length >= 16 and total_tokens >= full_length, got {full_length}, {total_tokens}")
    windows = total_tokens // full_length
    short_windows = round(windows * short_share)
    lengths: list[int] = []
    for _ in range(short_windows):  # one full-length window cut into equal short documents
        divisor = rng.choice((8, 4, 2)) if full_length >= 128 else 2
        lengths.extend([full_length // divisor] * divisor)
    lengths.extend([full_length] * (windows - short_windows))
    rng.shuffle(lengths)
    return lengths


def write_jsonl(path: Path, lengths: list[int], seed: int, grammar: dict | None = None) -> Path:
    """One {"text": ...} per document, written to a temporary name and renamed; `grammar`
    (mean_gap, query_share) goes to `training_document`."""
    rng = random.Random(seed)
    with files.atomic_open(path) as handle:
        for length in lengths:
            handle.write(
                json.dumps({"text": training_document(length - SPECIAL_TOKENS_PER_DOCUMENT, rng, **(grammar or {}))})
                + "\n"
            )
    return path


def tokenize_command(jsonl: Path, tokenizer: Path, prefix: Path) -> list[str]:
    """The prepare_data.py call that turns one jsonl into a Megatron dataset (BOS + EOS per document)."""
    return [
        sys.executable,
        str(REPO / "tools" / "prepare_data.py"),
        "tokenize",
        "--inputs",
        str(jsonl),
        "--tokenizer",
        str(tokenizer),
        "--output",
        str(prefix),
        "--bos",
        "--eos",
        "--workers",
        "0",
        "--overwrite",
    ]


def write_corpus(
    output: Path,
    name: str,
    total_tokens: int,
    full_length: int,
    short_share: float,
    seed: int,
    tokenizer: Path,
    grammar: dict | None = None,
) -> tuple[Path, list[str]]:
    """Write the jsonl of one corpus (unless its dataset exists); returns (dataset prefix, the
    prepare_data.py command that tokenizes it)."""
    prefix = output / f"{name}_text_document"
    jsonl = output / f"{name}.jsonl"
    if not (prefix.with_suffix(".bin").exists() and prefix.with_suffix(".idx").exists()):
        lengths = document_lengths(total_tokens, full_length, short_share, random.Random(seed))
        write_jsonl(jsonl, lengths, seed, grammar)
    return prefix, tokenize_command(jsonl, tokenizer, prefix)


def write_heldout(output: Path, documents: int, length: int, seed: int) -> Path:
    """Held-out documents for base-length perplexity: the training grammar, another seed, each
    `length` tokens once evaluate.py prepends BOS (length - 1 words); never trained on."""
    path = output / f"heldout_{length}.jsonl"
    if not path.exists():
        rng = random.Random(seed)
        with files.atomic_open(path) as handle:
            for _ in range(documents):
                handle.write(json.dumps({"text": training_document(length - 1, rng)}) + "\n")
    return path


def answer_mask_prefix(prefix: Path) -> Path:
    return prefix.with_name(prefix.name.replace("_text_document", "") + "_answer_mask")


def write_answer_mask(prefix: Path) -> Path:
    """The loss-mask dataset of a tokenized corpus (answer digits 1, every other token 0),
    written atomically by the framework's DatasetWriter; kept if it already exists."""
    mask_prefix = answer_mask_prefix(prefix)
    if not dataset_exists(mask_prefix):
        with DatasetWriter(mask_prefix, vocab_size=2) as writer:
            for document in read_documents(prefix):
                writer.add_document(answer_mask(document))
    return mask_prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--base-length", type=int, default=128)
    parser.add_argument("--target-length", type=int, default=1024)
    parser.add_argument("--base-tokens", type=int, default=3_000_000)
    parser.add_argument("--extension-tokens", type=int, default=600_000)
    parser.add_argument("--short-share", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = write_tokenizer(args.output / "tokenizer.json")
    for name, tokens, length, share, seed in (
        ("base", args.base_tokens, args.base_length, 0.0, args.seed),
        ("extension", args.extension_tokens, args.target_length, args.short_share, args.seed + 1),
    ):
        prefix, command = write_corpus(args.output, name, tokens, length, share, seed, tokenizer)
        subprocess.run(command, check=True, cwd=REPO)
        write_answer_mask(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
