"""Bad input: each kind is reported with file and line, counted in the summary, turned into an
error by strict mode, and never leaves a half-written .bin/.idx (or jsonl) behind.

    pytest tests/unit/test_data_bad_input.py
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from megatron_harpe.data.indexed import read_documents
from megatron_harpe.data.jsonl import FieldSpec
from megatron_harpe.data.pipeline import tokenize_corpus, upsample_corpus
from megatron_harpe.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_harpe.data.upsample import UpsampleConfig

GOOD_TEXTS = [topics[key] for key in sorted(topics)][:12]


def good_line(index: int) -> bytes:
    return json.dumps({"text": GOOD_TEXTS[index % len(GOOD_TEXTS)], "source": "Book"}).encode() + b"\n"


BAD_LINES = {
    "malformed_json": b'{"text": "unterminated\n',
    "missing_field": b'{"body": "no text field", "source": "Book"}\n',
    "empty_document": b'{"text": "  \\n\\t ", "source": "Book"}\n',
    "invalid_utf8": b'{"text": "caf\xe9 latin-1 bytes", "source": "Book"}\n',
}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return str(train_sentencepiece(GOOD_TEXTS, tmp_path_factory.mktemp("tok") / "sp", vocab_size=700))


def corpus_with_bad_lines(path: Path) -> tuple[Path, dict[str, int]]:
    """Good lines with one bad line of each kind; returns the bad kinds' line numbers."""
    lines, where = [], {}
    for index, (kind, raw) in enumerate(BAD_LINES.items()):
        lines += [good_line(2 * index), good_line(2 * index + 1)]
        lines.append(raw)
        where[kind] = len(lines)
    lines += [b'{"text": "lone surrogate \\ud800 escape", "source": "Book"}\n', b"\n", b"[1, 2]\n", b'{"text": 5}\n']
    lines.append(good_line(11))
    path.write_bytes(b"".join(lines))
    return path, where


def no_outputs_left(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.suffix in (".bin", ".idx") or ".tmp-" in p.name]


def test_bad_lines_are_skipped_reported_and_counted(tmp_path, tokenizer_path, capsys):
    corpus, where = corpus_with_bad_lines(tmp_path / "bad.jsonl")
    summary = tokenize_corpus([corpus], tmp_path / "out", tokenizer_path, workers=2)
    counts = summary["problems"]["skipped_by_kind"]
    assert counts == {
        "malformed_json": 2,
        "missing_field": 2,
        "empty_document": 1,
        "invalid_utf8": 2,
        "token_out_of_vocabulary": 0,
    }
    assert summary["problems"]["skipped_total"] == 7
    printed = capsys.readouterr().err
    for kind, line_number in where.items():
        assert f"{corpus}:{line_number}: {kind}" in printed
        assert any(example.startswith(f"{corpus}:{line_number}: {kind}") for example in summary["problems"]["examples"])
    tokenizer = load_tokenizer(tokenizer_path)
    decoded = [tokenizer.decode(doc.tolist()) for doc in read_documents(tmp_path / "out")]
    assert decoded == [json.loads(good_line(i))["text"] for i in list(range(8)) + [11]]
    assert json.loads(Path(summary["summary_json"]).read_text())["problems"]["skipped_total"] == 7


def test_missing_source_field_is_reported_where_sources_are_needed(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(
        good_line(0)
        + good_line(1)
        + good_line(2)
        + b'{"text": "no source here at all"}\n'
        + b'{"text": "nested", "meta": {}}\n'
    )
    config = UpsampleConfig(mode="per_source", total_tokens=10**6, length_threshold=0)
    summary = upsample_corpus(
        [corpus],
        tmp_path / "up.jsonl",
        config,
        length_measure="chars",
        fields=FieldSpec(source_field="source"),
        workers=0,
    )
    assert summary["problems"]["skipped_by_kind"]["missing_field"] == 2
    assert f"{corpus}:4: missing_field: no source field 'source'" in summary["problems"]["examples"][0]
    assert summary["documents_kept"] == 3
    # modes that ignore sources keep such documents (tools/prepare_data.py asks for it by mode)
    kept = upsample_corpus(
        [corpus],
        tmp_path / "none.jsonl",
        UpsampleConfig(mode="none"),
        length_measure="chars",
        fields=FieldSpec(source_field="source", source_optional=True),
        workers=0,
    )
    assert kept["documents_kept"] == 5 and kept["problems"]["skipped_total"] == 0


def test_strict_mode_names_file_and_line_and_leaves_nothing_behind(tmp_path, tokenizer_path):
    corpus = tmp_path / "late_error.jsonl"
    # the bad line sits after several chunks, so data was already written when it is found
    corpus.write_bytes(b"".join(good_line(i) for i in range(1500)) + BAD_LINES["invalid_utf8"] + good_line(0))
    with pytest.raises(ValueError, match=rf"{corpus}:1501: invalid_utf8: .*--strict"):
        tokenize_corpus([corpus], tmp_path / "out", tokenizer_path, workers=2, strict=True)
    assert no_outputs_left(tmp_path)
    with pytest.raises(ValueError, match=rf"{corpus}:1501: invalid_utf8"):
        upsample_corpus(
            [corpus],
            tmp_path / "up.jsonl.gz",
            UpsampleConfig(mode="none"),
            length_measure="chars",
            workers=2,
            strict=True,
        )
    assert not list(tmp_path.glob("up.jsonl*"))


def test_token_ids_beyond_the_vocabulary_are_reported(tmp_path, tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    texts = ["a b c", "(x)", "Identifiers and keywords", "1 2 3", "abc def"]
    limit = 300  # byte pieces and single characters fit, most merged pieces do not
    expected_bad = [i for i, text in enumerate(texts) if max(tokenizer.encode(text)) >= limit]
    assert 0 < len(expected_bad) < len(texts)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    summary = tokenize_corpus(
        [corpus], tmp_path / "out", tokenizer_path, vocab_size=limit, add_bos=False, add_eos=False, workers=0
    )
    assert summary["problems"]["skipped_by_kind"]["token_out_of_vocabulary"] == len(expected_bad)
    assert f"{corpus}:{expected_bad[0] + 1}: token_out_of_vocabulary" in summary["problems"]["examples"][0]
    written = [tokenizer.decode(doc.tolist()) for doc in read_documents(tmp_path / "out")]
    assert written == [text for i, text in enumerate(texts) if i not in expected_bad]
    with pytest.raises(ValueError, match="token_out_of_vocabulary"):
        tokenize_corpus([corpus], tmp_path / "strict", tokenizer_path, vocab_size=limit, strict=True, workers=0)
    assert not list(tmp_path.glob("strict*"))


def test_existing_output_is_refused_unless_overwrite(tmp_path, tokenizer_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(good_line(0) + good_line(1))
    tokenize_corpus([corpus], tmp_path / "out", tokenizer_path, workers=0, write_report=False)
    before = (tmp_path / "out.bin").read_bytes()
    corpus.write_bytes(good_line(2))
    with pytest.raises(ValueError, match=r"already holds a dataset: pass --overwrite"):
        tokenize_corpus([corpus], tmp_path / "out", tokenizer_path, workers=0, write_report=False)
    assert (tmp_path / "out.bin").read_bytes() == before
    tokenize_corpus([corpus], tmp_path / "out", tokenizer_path, workers=0, overwrite=True, write_report=False)
    assert len(read_documents(tmp_path / "out")) == 1
    (tmp_path / "up.jsonl").write_text("keep me")
    with pytest.raises(ValueError, match="already exists: pass --overwrite"):
        upsample_corpus([corpus], tmp_path / "up.jsonl", UpsampleConfig(mode="none"), length_measure="chars", workers=0)
    assert (tmp_path / "up.jsonl").read_text() == "keep me"


def test_truncated_compressed_input_and_missing_inputs(tmp_path, tokenizer_path):
    data = gzip.compress(b"".join(good_line(i) for i in range(40)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        tokenize_corpus([tmp_path / "cut.jsonl.gz"], tmp_path / "out", tokenizer_path, workers=0)
    assert no_outputs_left(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_corpus([tmp_path / "nowhere.jsonl"], tmp_path / "out", tokenizer_path)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        tokenize_corpus([tmp_path / "empty_dir"], tmp_path / "out", tokenizer_path)
    (tmp_path / "only_bad.jsonl").write_bytes(BAD_LINES["missing_field"] * 3)
    with pytest.raises(
        ValueError, match=r"only_bad.jsonl: 3 of 3 lines could not be used \(missing_field 3.*--text-key"
    ):
        tokenize_corpus([tmp_path / "only_bad.jsonl"], tmp_path / "out", tokenizer_path, workers=0)
    assert no_outputs_left(tmp_path)


def test_tokenizer_without_bos_or_eos_needs_them_turned_off(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(GOOD_TEXTS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    bare.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(good_line(0))
    with pytest.raises(ValueError, match=r"has no BOS token: disable it \(--no-bos\)"):
        tokenize_corpus([corpus], tmp_path / "out", str(tmp_path), workers=0)
    summary = tokenize_corpus(
        [corpus], tmp_path / "out", str(tmp_path), add_bos=False, add_eos=False, workers=0, write_report=False
    )
    assert summary["documents"] == 1
