"""Tokenizer wrapper: sentencepiece and HF tokenizer.json round trips, special ids, pickling,
deterministic sentencepiece training, clear errors.

    pytest tests/unit/test_data_tokenizer.py
"""

from __future__ import annotations

import array
import inspect
import io
import json
import pickle
import random
import re
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import sentencepiece

from megatron_harpe.data import tokenizer as tokenizer_module
from megatron_harpe.data.tokenizer import load_tokenizer, train_sentencepiece

TRAINING_TEXTS = [topics[key] for key in sorted(topics)][:40]
AWKWARD_TEXTS = [
    "Hello  world\n\n    indented\tline = 12345",
    " leading and trailing spaces ",
    "émoji 😀, 中文, Ελληνικά, and a rare glyph 𝔘",
    "x",
    "line one\r\nline two\n",
]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    return train_sentencepiece(TRAINING_TEXTS, tmp_path_factory.mktemp("sp") / "demo", vocab_size=600)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|begin|>", "<|end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXTS, trainer)
    directory = tmp_path_factory.mktemp("hf")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}})
    )
    return directory


def test_sentencepiece_round_trip_and_llama_special_ids(sentencepiece_model):
    tokenizer = load_tokenizer(sentencepiece_model)
    assert (tokenizer.kind, tokenizer.vocab_size) == ("sentencepiece", 600)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, None)
    for text in AWKWARD_TEXTS + TRAINING_TEXTS[:5]:
        ids = tokenizer.encode(text)
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
        assert max(ids) < tokenizer.vocab_size
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(AWKWARD_TEXTS) == [tokenizer.encode(text) for text in AWKWARD_TEXTS]
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("abc"), tokenizer.eos_id]) == "abc"


def test_sentencepiece_training_is_deterministic(sentencepiece_model, tmp_path):
    again = train_sentencepiece(TRAINING_TEXTS, tmp_path / "again", vocab_size=600)
    assert again.read_bytes() == sentencepiece_model.read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))
    other = train_sentencepiece(TRAINING_TEXTS[:20], tmp_path / "other", vocab_size=600)
    assert other.read_bytes() != sentencepiece_model.read_bytes()


def test_hf_tokenizer_json_round_trip_and_configured_special_ids(hf_tokenizer_dir):
    tokenizer = load_tokenizer(hf_tokenizer_dir)  # a directory, as in HF model folders
    assert tokenizer.kind == "huggingface" and tokenizer.path.endswith("tokenizer.json")
    assert tokenizer.vocab_size == 500
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    for text in AWKWARD_TEXTS:
        ids = tokenizer.encode(text)
        assert 0 not in ids and 1 not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(AWKWARD_TEXTS) == [tokenizer.encode(text) for text in AWKWARD_TEXTS]


def test_pickled_tokenizer_reloads_by_path(sentencepiece_model, hf_tokenizer_dir):
    for path in (sentencepiece_model, hf_tokenizer_dir / "tokenizer.json"):
        tokenizer = load_tokenizer(path)
        payload = pickle.dumps(tokenizer)
        assert len(payload) < 500  # the path, not the model
        clone = pickle.loads(payload)
        assert clone.encode(AWKWARD_TEXTS[2]) == tokenizer.encode(AWKWARD_TEXTS[2])
        assert (clone.vocab_size, clone.bos_id, clone.eos_id) == (
            tokenizer.vocab_size,
            tokenizer.bos_id,
            tokenizer.eos_id,
        )


def test_bad_tokenizer_paths_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="no tokenizer found in directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot read sentencepiece model"):
        load_tokenizer(tmp_path / "broken.model")
    (tmp_path / "vocab.txt").write_text("a b c")
    with pytest.raises(ValueError, match="neither a sentencepiece"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(["abc"], tmp_path / "tiny", vocab_size=100)


def _train_raw(tmp_path: Path, name: str, **options) -> Path:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(TRAINING_TEXTS),
        model_writer=model,
        vocab_size=500,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    path = tmp_path / f"{name}.model"
    path.write_bytes(model.getvalue())
    return path


CUT_EDGE_CASES = [
    "a  b   c    d " * 40,  # runs of spaces, trailing space
    "   leading spaces then words " * 30,
    "literal \u2581 marks \u2581\u2581 and x\u2581y " * 30,
    "tabs\tand\nnew lines\n    indented code = 1\n" * 30,
    "nospacesatall" * 200,
    "end with a space ",
    "x " * 500,
]


def _cuttable_tokenizer(tmp_path: Path, kind: str):
    """A model whose settings allow exact cuts at spaces (identity normalization, ...)."""
    options = {
        "model_type": "unigram" if kind == "unigram" else "bpe",
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "byte_fallback": True,
    }
    if kind.startswith("llama_like"):
        options.update(allow_whitespace_only_pieces=True, split_digits=True)
    if kind == "llama_like_whitespace_pieces":
        options.update(user_defined_symbols=["x\u2581y"])
    return load_tokenizer(_train_raw(tmp_path, kind, **options))


@pytest.mark.parametrize("kind", ["bpe", "llama_like", "llama_like_whitespace_pieces"])
def test_long_texts_cut_at_safe_spaces_encode_exactly_like_whole_texts(kind, tmp_path, monkeypatch):
    tokenizer = _cuttable_tokenizer(tmp_path, kind)
    assert tokenizer._unsafe_before_space is not None
    if kind == "llama_like_whitespace_pieces":
        assert "x" in tokenizer._unsafe_before_space  # a piece spans "x y": never cut there
    texts = TRAINING_TEXTS + CUT_EDGE_CASES
    whole = tokenizer._sp.Encode(texts, out_type=int)
    for segment_chars in (1024, 16, 1):
        monkeypatch.setattr(tokenizer_module, "SEGMENT_CHARS", segment_chars)
        assert tokenizer.encode_batch(texts) == whole
        assert [tokenizer.encode(text) for text in CUT_EDGE_CASES] == whole[len(TRAINING_TEXTS) :]
    assert len(tokenizer_module._cut_at_safe_spaces(TRAINING_TEXTS[0] * 3, tokenizer._unsafe_before_space)) > 1


def test_models_whose_normalizer_could_move_a_cut_are_never_cut(tmp_path):
    nfkc = load_tokenizer(_train_raw(tmp_path, "nfkc", model_type="bpe"))  # default nmt_nfkc normalizer
    collapsing = load_tokenizer(_train_raw(tmp_path, "collapse", model_type="bpe", normalization_rule_name="identity"))
    assert nfkc._unsafe_before_space is None and collapsing._unsafe_before_space is None  # remove_extra_whitespaces
    text = CUT_EDGE_CASES[0]
    assert nfkc.encode(text) == nfkc._sp.EncodeAsIds(text)


def test_unigram_models_are_never_cut(tmp_path):
    """Unigram Viterbi ties break by the score carried from before a cut: "x = 1 '***'" cut at
    its last space gives "'", "**", "*" alone but "'", "*", "**" in place (for this model)."""
    unigram = _cuttable_tokenizer(tmp_path, "unigram")
    assert unigram._unsafe_before_space is None and unigram._segment_pattern is None
    assert not unigram._cut_at_every_space
    texts = [f"{prefix} '{'*' * stars}'" for prefix in ("a", "x = 1", "**") for stars in range(1, 12)] + TRAINING_TEXTS
    flat, counts = unigram.encode_flat(texts)
    assert (flat.tolist(), counts.tolist()) == _flat_reference(unigram._sp.Encode(texts, out_type=int))
    cut_alone = unigram._sp.EncodeAsIds("x = 1") + unigram._sp.EncodeAsIds("'***'")
    assert cut_alone != unigram._sp.EncodeAsIds("x = 1 '***'")  # why cutting is refused


def _flat_reference(encoded: list[list[int]]) -> tuple[list[int], list[int]]:
    return [token for ids in encoded for token in ids], [len(ids) for ids in encoded]


@pytest.mark.parametrize("kind", ["bpe", "llama_like", "llama_like_whitespace_pieces"])
def test_segment_cache_encodes_exactly_like_whole_texts(kind, tmp_path, monkeypatch):
    tokenizer = _cuttable_tokenizer(tmp_path, kind)
    texts = TRAINING_TEXTS + CUT_EDGE_CASES + AWKWARD_TEXTS + ["", " ", "x y", "x  y", "a b"]
    expected_flat, expected_counts = _flat_reference(tokenizer._sp.Encode(texts, out_type=int))
    monkeypatch.setattr(tokenizer_module, "SEGMENT_CACHE_ENTRIES", 50)  # forces the cache to be emptied
    for batch in (texts, texts[::-1], texts):  # cold, then partly warm, then warm in another order
        flat, counts = tokenizer.encode_flat(batch, num_threads=1)
        reference_flat, reference_counts = _flat_reference(tokenizer._sp.Encode(batch, out_type=int))
        assert flat.dtype == np.int32 and flat.tolist() == reference_flat and counts.tolist() == reference_counts
        distinct = {segment for text in batch for segment in tokenizer._segment_pattern.split(text)}
        assert len(tokenizer._segment_cache) <= max(50, len(distinct))  # bounded: emptied, then one batch's new ones
    flat, counts = tokenizer.encode_flat(texts)
    assert (flat.tolist(), counts.tolist()) == (expected_flat, expected_counts)
    tokenizer._segment_cache.clear()
    for text in texts[::3] + texts:  # small batches: the cache is emptied while it holds part of a batch
        flat, counts = tokenizer.encode_flat([text, "x y z"])
        assert flat.tolist() == tokenizer._sp.EncodeAsIds(text) + tokenizer._sp.EncodeAsIds("x y z")
    assert len(tokenizer._segment_pattern.split(TRAINING_TEXTS[0])) > 10  # segments are words, not whole texts
    empty_flat, empty_counts = tokenizer.encode_flat([])
    assert empty_flat.size == 0 and empty_counts.size == 0


def test_encode_flat_without_the_cache_matches_encode_batch(tmp_path, hf_tokenizer_dir):
    unigram = load_tokenizer(
        _train_raw(tmp_path, "nfkc_unigram", model_type="unigram")
    )  # cannot be cut: no segment cache
    for tokenizer in (unigram, load_tokenizer(hf_tokenizer_dir)):
        assert tokenizer._segment_pattern is None and tokenizer._normalize is None
        flat, counts = tokenizer.encode_flat(AWKWARD_TEXTS + CUT_EDGE_CASES)
        assert (flat.tolist(), counts.tolist()) == _flat_reference(
            tokenizer.encode_batch(AWKWARD_TEXTS + CUT_EDGE_CASES)
        )


ADVERSARIAL_TEXTS = [
    "a  b   c    d",
    "  leading spaces",
    "trailing spaces  ",
    " ",
    "  ",
    "\t",
    "tab\tseparated\twords\t",
    "new\nlines\n\n    indented\n",
    "crlf\r\nline \r\n",
    "\ufb01ne ligature \uff26\uff35\uff2c\uff2c width \u2460\u2461",
    "e\u0301 combining, A\u030a",
    "digits 1234567890 3.14159 1e-10 0x1F",
    "emoji \U0001f600\U0001f44d\U0001f3fd and \U0001d518",
    "\u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
    "literal \u2581 mark \u2581\u2581 x\u2581y \u2581",
    "ideographic\u3000space",
    "nbsp\u00a0space",
    "zero\u200bwidth",
    "\x00nul \x01ctrl \x7f",
    "\u2581",
    " \u2581 ",
    "x",
    "",
    "    def f(x):\n        return x  # comment\n",
]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Short texts over an alphabet of separators, letters, digits, marks and unknown characters."""
    alphabet = [
        " ",
        " ",
        " ",
        "\t",
        "\n",
        "a",
        "b",
        "e",
        "th",
        "\u2581",
        "1",
        "7",
        "\U0001f600",
        "\u00e9",
        "\ufb01",
        "\u3000",
        "*",
    ]
    generator = random.Random(seed)
    return ["".join(generator.choice(alphabet) for _ in range(generator.randint(0, 40))) for _ in range(count)]


def test_word_cache_is_used_only_when_every_space_is_an_exact_cut(sentencepiece_model, tmp_path):
    ours = load_tokenizer(sentencepiece_model)  # train_sentencepiece: identity, BPE, no "▁▁" pieces
    assert ours._cut_at_every_space
    pieces = [ours._sp.IdToPiece(index) for index in range(ours.vocab_size)]
    assert all("\u2581" not in piece[1:] for piece in pieces)
    assert ours._cut_at_single_spaces and ours._word_start is not None
    llama_like = _cuttable_tokenizer(tmp_path, "llama_like")  # has "▁▁" pieces: runs of spaces are not cut
    assert llama_like._sp.PieceToId("\u2581\u2581") != llama_like._sp.unk_id()
    assert (
        not llama_like._cut_at_every_space and llama_like._cut_at_single_spaces and llama_like._word_start is not None
    )
    symbol = _cuttable_tokenizer(tmp_path, "llama_like_whitespace_pieces")  # a piece "x▁y": no cut after "x"
    assert symbol._segment_pattern is not None and not symbol._cut_at_single_spaces and symbol._word_start is None
    nfkc = load_tokenizer(_train_raw(tmp_path, "nfkc", model_type="bpe"))  # normalized first, then cut at every "▁"
    assert nfkc._unsafe_before_space is None and nfkc._normalize is not None and nfkc._cut_at_every_space
    suffix = load_tokenizer(_train_raw(tmp_path, "suffix", model_type="bpe", treat_whitespace_as_suffix=True))
    assert suffix._normalize is None and not suffix._cut_at_every_space and suffix._segment_pattern is None


def test_word_cache_encodes_adversarial_and_random_text_exactly(sentencepiece_model, tmp_path, monkeypatch):
    """The fast path (one cached lookup per space-separated word) against sentencepiece on whole
    texts: runs of spaces, tabs, newlines, text NFKC changes (kept by identity models, normalized
    first for nmt_nfkc ones), leading/trailing whitespace, digits, byte fallback or unknown
    characters, literal "▁", empty texts."""
    tokenizers = [
        load_tokenizer(sentencepiece_model),
        _cuttable_tokenizer(tmp_path, "llama_like"),
        _cuttable_tokenizer(tmp_path, "llama_like_whitespace_pieces"),
        load_tokenizer(_train_raw(tmp_path, "nfkc_bytes", model_type="bpe", byte_fallback=True)),
        load_tokenizer(_train_raw(tmp_path, "nfkc_unknown", model_type="bpe")),
    ]
    assert tokenizers[3]._normalize is not None and tokenizers[4]._normalize is not None
    prose = [re.sub(" +", " ", text).strip(" ").replace("\u2581", "") for text in TRAINING_TEXTS]
    assert all(map(tokenizer_module._single_spaces_between_words, prose))  # str.split for Llama-like models too
    texts = ADVERSARIAL_TEXTS + _random_texts(1500) + CUT_EDGE_CASES + TRAINING_TEXTS + prose
    for tokenizer in tokenizers:
        expected = tokenizer._sp.Encode(texts, out_type=int)
        byte_fallback = any(map(tokenizer._sp.IsByte, range(tokenizer.vocab_size)))
        unknown = tokenizer._sp.IsByte if byte_fallback else tokenizer._sp.IsUnknown
        assert any(unknown(token) for ids in expected for token in ids)  # byte fallback or <unk> is exercised
        for text, ids in zip(ADVERSARIAL_TEXTS, expected):  # one text at a time, cold and warm
            for _ in range(2):
                flat, counts = tokenizer.encode_flat([text])
                assert flat.tolist() == ids and counts.tolist() == [len(ids)], repr(text)
        monkeypatch.setattr(tokenizer_module, "SEGMENT_CACHE_ENTRIES", 200)  # emptied again and again
        for start in range(0, len(texts), 97):
            flat, counts = tokenizer.encode_flat(texts[start : start + 97], num_threads=1)
            assert (flat.tolist(), counts.tolist()) == _flat_reference(expected[start : start + 97])
        monkeypatch.undo()


def test_word_cache_matches_on_python_sources(sentencepiece_model):
    """Code, as in the data-preparation benchmark: indentation, blank lines, long lines."""
    texts = [inspect.getsource(module) for module in (json.decoder, json.encoder, pytest, io, pickle)]
    tokenizer = load_tokenizer(sentencepiece_model)
    for _ in range(2):  # cold, then warm
        flat, counts = tokenizer.encode_flat(texts)
        assert (flat.tolist(), counts.tolist()) == _flat_reference(tokenizer._sp.Encode(texts, out_type=int))


def test_new_words_encoded_joined_equal_words_encoded_one_by_one(sentencepiece_model):
    tokenizer = load_tokenizer(sentencepiece_model)
    assert tokenizer._word_start is not None
    texts = ADVERSARIAL_TEXTS + _random_texts(500, seed=1) + TRAINING_TEXTS
    words = sorted({word for text in texts for word in text.split(" ") if word and "\u2581" not in word})
    one_by_one = [array.array("i", ids).tobytes() for ids in tokenizer._sp.Encode(words, out_type=int)]
    assert tokenizer._encode_words_joined(words, num_threads=1) == one_by_one
    assert (
        tokenizer._encode_words_joined(words + ["x\u2581y"], num_threads=1) is None
    )  # a literal "▁" starts a piece too
