"""Tokenize + pack round trips: what is written to .bin/.idx decodes back to the input text,
whatever the input format, the workers, the shards; megatron-core's GPTDataset reads it.

    pytest tests/unit/test_data_tokenize.py
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import zstandard

from megatron_harpe.data.indexed import read_documents
from megatron_harpe.data.jsonl import FieldSpec
from megatron_harpe.data.pipeline import prepare, tokenize_corpus, upsample_corpus
from megatron_harpe.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_harpe.data.upsample import UpsampleConfig

SOURCES = ("Reference", "Manual", "Github")


def records() -> list[dict]:
    """Real text (the language reference) with nested source labels, SlimPajama style."""
    texts = [topics[key] for key in sorted(topics)]
    return [{"text": text, "meta": {"redpajama_set_name": SOURCES[i % 3]}} for i, text in enumerate(texts)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return str(
        train_sentencepiece([row["text"] for row in records()], tmp_path_factory.mktemp("tok") / "sp", vocab_size=800)
    )


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory) -> list[Path]:
    """The same records over a plain, a gzip and a zstd file."""
    rows = records()
    directory = tmp_path_factory.mktemp("corpus")
    return [
        write_jsonl(directory / "a.jsonl", rows[:30]),
        write_jsonl(directory / "b.jsonl.gz", rows[30:55]),
        write_jsonl(directory / "c.jsonl.zst", rows[55:]),
    ]


def test_round_trip_over_compressed_split_input(tmp_path, tokenizer_path, split_corpus):
    summary = tokenize_corpus(split_corpus, tmp_path / "out", tokenizer_path, workers=2)
    tokenizer = load_tokenizer(tokenizer_path)
    documents = read_documents(tmp_path / "out")
    rows = records()
    assert len(documents) == len(rows) == summary["documents"]
    for document, row in zip(documents, rows):
        assert document[0] == tokenizer.bos_id and document[-1] == tokenizer.eos_id
        assert tokenizer.decode(document[1:-1].tolist()) == row["text"]
    assert summary["tokens"] == sum(len(document) for document in documents)
    assert Path(summary["summary_json"]).is_file() and Path(summary["report_png"]).stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp-*"))


def test_bos_eos_flags_and_uint16_tokens(tmp_path, tokenizer_path, split_corpus):
    tokenize_corpus(
        split_corpus[:1], tmp_path / "bare", tokenizer_path, add_bos=False, add_eos=False, workers=0, write_report=False
    )
    tokenize_corpus(
        split_corpus[:1], tmp_path / "eos", tokenizer_path, add_bos=False, add_eos=True, workers=0, write_report=False
    )
    tokenizer = load_tokenizer(tokenizer_path)
    bare, eos = read_documents(tmp_path / "bare"), read_documents(tmp_path / "eos")
    for plain, with_eos, row in zip(bare, eos, records()):
        assert plain.tolist() == tokenizer.encode(row["text"])
        assert with_eos.tolist() == plain.tolist() + [tokenizer.eos_id]
    assert (tmp_path / "bare.bin").stat().st_size == 2 * sum(len(doc) for doc in bare)  # uint16 below 65500 ids


def test_workers_and_shards_give_identical_datasets(tmp_path, tokenizer_path, split_corpus):
    quiet = {"write_report": False}
    tokenize_corpus(split_corpus, tmp_path / "inline", tokenizer_path, workers=0, **quiet)
    tokenize_corpus(split_corpus, tmp_path / "pool", tokenizer_path, workers=2, **quiet)
    first = tokenize_corpus(
        split_corpus, tmp_path / "sharded", tokenizer_path, workers=2, shard_dir=tmp_path / "shards", **quiet
    )
    expected = (tmp_path / "inline.bin").read_bytes()
    assert (tmp_path / "pool.bin").read_bytes() == expected
    assert (tmp_path / "sharded.bin").read_bytes() == expected
    assert (tmp_path / "sharded.idx").read_bytes() == (tmp_path / "inline.idx").read_bytes()
    assert len(list((tmp_path / "shards").glob("shard-*.bin"))) == 3
    # a rerun reuses finished shards (a redone shard would be a new file, renamed into place)
    inodes = {path.name: path.stat().st_ino for path in (tmp_path / "shards").glob("shard-*")}
    again = tokenize_corpus(
        split_corpus,
        tmp_path / "sharded",
        tokenizer_path,
        workers=0,
        shard_dir=tmp_path / "shards",
        overwrite=True,
        **quiet,
    )
    assert {path.name: path.stat().st_ino for path in (tmp_path / "shards").glob("shard-*")} == inodes
    assert again["lengths"] == first["lengths"] and (tmp_path / "sharded.bin").read_bytes() == expected
    with pytest.raises(ValueError, match="other input or settings"):
        tokenize_corpus(
            split_corpus,
            tmp_path / "other",
            tokenizer_path,
            add_eos=False,
            workers=0,
            shard_dir=tmp_path / "shards",
            **quiet,
        )


def test_gpt_dataset_reads_the_packed_documents(tmp_path, tokenizer_path, split_corpus):
    from megatron_harpe.data.loader import build_gpt_dataset

    tokenize_corpus(split_corpus, tmp_path / "out", tokenizer_path, workers=0, write_report=False)
    tokenizer = load_tokenizer(tokenizer_path)
    stream = np.concatenate(read_documents(tmp_path / "out"))
    dataset = build_gpt_dataset(
        [str(tmp_path / "out")],
        None,
        seq_length=256,
        num_samples=50,
        seed=3,
        tokenizer=tokenizer,
        reset_position_ids=True,
        eod_mask_loss=True,
    )
    assert len(dataset) >= 50
    for index in range(10):
        sample = dataset[index]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == labels.shape == (256,)
        assert (tokens[1:] == labels[:-1]).all()
        # every sample is a contiguous window of the packed document stream
        starts = np.flatnonzero(stream[: len(stream) - 256] == tokens[0])
        assert any((stream[s : s + 256] == tokens).all() for s in starts)
        for eod in np.flatnonzero(tokens == tokenizer.eos_id):
            assert sample["loss_mask"][eod] == 0
            if eod + 1 < 256:
                assert sample["position_ids"][eod + 1] == 0


def test_prepare_equals_upsample_then_tokenize(tmp_path, tokenizer_path, split_corpus):
    fields = FieldSpec(source_field="meta.redpajama_set_name")
    config = UpsampleConfig(
        mode="per_source",
        total_tokens=60_000,
        shares={"Reference": 2, "Manual": 1, "Github": 1},
        length_threshold=2000,
        seed=5,
    )
    upsampled = upsample_corpus(
        split_corpus, tmp_path / "up.jsonl.zst", config, tokenizer=tokenizer_path, fields=fields, workers=2
    )
    tokenize_corpus([tmp_path / "up.jsonl.zst"], tmp_path / "two_pass", tokenizer_path, workers=0, write_report=False)
    fused = prepare(split_corpus, tmp_path / "one_pass", config, tokenizer_path, fields=fields, workers=2)
    assert (tmp_path / "one_pass.bin").read_bytes() == (tmp_path / "two_pass.bin").read_bytes()
    assert fused["after"] == upsampled["after"] and fused["before"] == upsampled["before"]
    kept = fused["after"]["(all)"]["documents"]
    assert 0 < kept < len(records()) and upsampled["documents_kept"] == kept
    assert fused["after"]["(all)"]["long_share"] > fused["before"]["(all)"]["long_share"]


def test_character_estimate_needs_no_tokenizer(tmp_path, split_corpus):
    config = UpsampleConfig(mode="global", length_threshold=4096, seed=1)
    summary = upsample_corpus(
        split_corpus,
        tmp_path / "up.jsonl",
        config,
        length_measure="chars",
        fields=FieldSpec(source_field=None),
        workers=0,
    )
    lines = (tmp_path / "up.jsonl").read_text().splitlines()
    long_rows = [row for row in records() if len(row["text"]) / 3.68 >= 4096]
    assert len(lines) == summary["documents_kept"] >= len(long_rows)
    assert all(json.dumps(row, ensure_ascii=False) in lines for row in long_rows)
    with pytest.raises(ValueError, match="needs --tokenizer"):
        upsample_corpus(split_corpus, tmp_path / "x.jsonl", config, length_measure="tokens")


def test_reading_stops_once_every_budget_is_met(tmp_path, tokenizer_path):
    corpus = write_jsonl(tmp_path / "big.jsonl", records() * 40)
    config = UpsampleConfig(
        mode="per_source",
        total_tokens=60_000,
        shares={"Reference": 2, "Manual": 1, "Github": 1},
        length_threshold=2000,
        seed=5,
    )
    summary = prepare(
        [corpus],
        tmp_path / "out",
        config,
        tokenizer_path,
        fields=FieldSpec(source_field="meta.redpajama_set_name"),
        workers=2,
    )
    assert summary["finished_by_budget"] and all(budget["met"] for budget in summary["budgets"].values())
    assert summary["before"]["(all)"]["documents"] < len(records()) * 4  # the pool was stopped early
    assert summary["documents"] == len(read_documents(tmp_path / "out"))


def test_written_ids_equal_sentencepiece_on_each_whole_document(tmp_path, tokenizer_path):
    """Token identity with Megatron-LM's preprocess_data (one sentencepiece call per document),
    through the word cache, in this process and in workers, on prose, code and awkward text."""
    import inspect

    import sentencepiece

    texts = (
        [row["text"] for row in records()]
        + [inspect.getsource(json.decoder), inspect.getsource(np.lib.npyio)]
        + [
            "a  b   c    d ",
            "  leading",
            "tabs\tand\nnew lines\n\n    indented",
            "\ufb01 \uff26\uff35\uff2c\uff2c \u2460 e\u0301",
            "digits 1234567890",
            "emoji \U0001f600 \u4e2d\u6587",
            "literal \u2581 \u2581\u2581 x\u2581y",
            "\u3000 \u00a0 \x01",
        ]
    )
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in texts])
    processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer_path)
    expected = [processor.EncodeAsIds(text) + [processor.eos_id()] for text in texts]
    for workers in (0, 2):
        prefix = tmp_path / f"out-{workers}"
        tokenize_corpus([corpus], prefix, tokenizer_path, add_bos=False, workers=workers, write_report=False)
        assert [document.tolist() for document in read_documents(prefix)] == expected
