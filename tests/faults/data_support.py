"""Helpers of the data fault tests: small corpora from the demo data, a tokenizer of other content
with the same vocabulary, and a dataset copy whose files a test may change."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml


def sample_corpus(demo_data, path: Path, lines: int = 40, start: int = 0) -> Path:
    """`lines` documents of the demo corpus (from line `start`) as a jsonl file."""
    path.write_text("".join(demo_data.corpus.read_text().splitlines(keepends=True)[start : start + lines]))
    return path


def other_tokenizer(source: Path, target: Path) -> Path:
    """A copy of the sentencepiece model `source` with two frequent pieces swapped: another
    tokenizer with the same vocabulary size (the same text gets other ids)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(source.read_bytes())
    first, second = model.pieces[259], model.pieces[262]  # '▁t' and '▁a' in the demo model: merges, not bytes
    first.piece, second.piece = second.piece, first.piece
    target.write_bytes(model.SerializeToString())
    return target


def copy_dataset(prefix: str, target_dir: Path, name: str = "copy") -> str:
    """`prefix`'s .bin/.idx/.summary.json under `target_dir`; returns the new prefix."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".summary.json"):
        if Path(prefix + suffix).exists():
            shutil.copy2(prefix + suffix, target_dir / f"{name}{suffix}")
    return str(target_dir / name)


def tiny_training_config(path: Path, prefix: str, tokenizer: str, **sections) -> Path:
    """A 2-layer config over `prefix` written to `path` (for --dry-run and short runs)."""
    tree = {
        "model": dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=4096,
            max_position_embeddings=64,
        ),
        "position": {"type": "harpe", "bases": [300.0, 30000.0]},
        "data": {"prefixes": [prefix], "tokenizer": tokenizer, "seq_length": 64},
        "train": {"micro_batch_size": 1, "global_batch_size": 2, "train_tokens": 2 * 2 * 64, "lr": 3e-3},
        "logging": {"log_interval": 1},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path
