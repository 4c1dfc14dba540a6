"""One tokenizer interface over sentencepiece models and Hugging Face `tokenizer.json` files.

The data pipeline, the training loader (EOD id) and the evaluation tools all go through this:

    from megatron_harpe.data.tokenizer import load_tokenizer, train_sentencepiece
    tok = load_tokenizer("llama2/tokenizer.model")      # or tokenizer.json, or an HF model dir
    ids = tok.encode("Hello world")                      # no BOS/EOS added
    assert tok.decode(ids) == "Hello world"

    # a small deterministic sentencepiece model, e.g. for the offline demo corpus
    model_path = train_sentencepiece(texts, "work/demo_sp", vocab_size=4000)

A `Tokenizer` pickles as its path (and is re-loaded on unpickling), so it can be handed to
multiprocessing workers without shipping native objects across processes.

Long texts and sentencepiece: its BPE/unigram encoders cost more per token on long inputs (a
heap / lattice over the whole text), so long texts are cut at spaces no vocabulary piece can
span and the pieces encoded separately. The ids are identical to encoding the whole text (the
dropped space comes back as the piece's dummy prefix); the cut is used only when the model's
own settings make that exact (`_safe_cut_context`: identity normalization, dummy prefix, BPE),
which holds for Llama2's tokenizer.

Data preparation goes further (`encode_flat`): it cuts at every such space and keeps the ids of
each segment (mostly a word with its leading space) in a bounded cache, so only segments not
seen before reach sentencepiece; natural text and code repeat most of their segments, and the
ids are again identical to encoding whole texts. When no vocabulary piece holds "▁" after its
first character (models from `train_sentencepiece`; not Llama2, which has "▁▁" pieces), every
space is such a cut and segments come from `str.split(" ")`, several times cheaper than the
regex the general case needs. BPE models with another normalizer (nmt_nfkc, collapsed
whitespace) get the same cache on their normalized text: sentencepiece's own `Normalize`, then
cuts before every "▁", the words encoded by a copy of the model without normalization.
Unigram models are always encoded whole.
"""

from __future__ import annotations

import array
import gc
import io
import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece

SENTENCEPIECE_FILE_SUFFIX = ".model"
HF_TOKENIZER_FILE = "tokenizer.json"

# Special tokens guessed for a bare tokenizer.json without a tokenizer_config.json next to it.
_HF_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_HF_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")
_HF_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")

SEGMENT_CHARS = 1024
"""Texts longer than twice this are encoded in pieces of at least this many characters."""
_SPACE_SYMBOL = "\u2581"  # sentencepiece's visible space
SEGMENT_CACHE_ENTRIES = 500_000
"""Segments whose ids `encode_flat` keeps per tokenizer (up to about 60 MB); full -> emptied."""
CACHED_SEGMENT_CHARS = 48
"""Longer segments are encoded but not kept."""
WORDS_PER_CALL = 8
"""New words are encoded this many to a string (joined by spaces), not one by one (8: about 8%
less CPU than one by one on Python sources; longer strings cost sentencepiece more per id)."""


class Tokenizer:
    """A loaded tokenizer: either a sentencepiece `.model` or a Hugging Face `tokenizer.json`.

    `encode` never adds BOS/EOS; the caller decides (see `bos_id`, `eos_id`). `decode` drops
    special tokens (BOS/EOS/PAD), so `decode(encode(text))` round-trips the text itself.
    """

    path: str
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._load()

    def _load(self) -> None:
        if self.path.endswith(SENTENCEPIECE_FILE_SUFFIX):
            self._load_sentencepiece()
        else:
            self._load_huggingface()

    def _load_sentencepiece(self) -> None:
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(self.path)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"cannot read sentencepiece model {self.path}: {error}") from error
        self.kind = "sentencepiece"
        self._sp = processor
        self._hf = None
        self._find_exact_cuts(processor, _model_proto(Path(self.path).read_bytes()))
        self._segment_cache: dict[str, bytes] = {}  # segment -> its ids as int32 bytes
        self.vocab_size = processor.GetPieceSize()
        self.bos_id = _none_if_negative(processor.bos_id())
        self.eos_id = _none_if_negative(processor.eos_id())
        self.pad_id = _none_if_negative(processor.pad_id())

    def _find_exact_cuts(self, processor: sentencepiece.SentencePieceProcessor, model: Any) -> None:
        """Where this model's texts can be cut without changing their ids (see `encode_flat`)."""
        self._unsafe_before_space = _safe_cut_context(model) if model is not None else None
        self._segment_pattern = _safe_space_pattern(self._unsafe_before_space)
        # Llama2-like ("▁▁" pieces, but none ending in another character + "▁"): every single
        # space between two words is a cut, so texts without runs of spaces split with str.split
        self._cut_at_single_spaces = self._unsafe_before_space == frozenset({" ", _SPACE_SYMBOL})
        # no piece holds an inner "▁" (train_sentencepiece's models): every space is a cut
        every = self._cut_at_single_spaces and _spaces_only_start_pieces(model)
        self._empty_word_ids = _lone_space_ids(processor) if every else None
        self._cut_at_every_space = self._empty_word_ids is not None
        self._segment_encoder = processor  # encodes each cached segment, with the dummy prefix
        self._normalize = None
        if self._unsafe_before_space is None and _normalized_text_cuts_at_every_space(model):
            # e.g. nmt_nfkc: normalize whole texts as sentencepiece does, then cut the normalized
            # text before every "▁" and encode its words with the same pieces, no normalization
            encoder = _without_normalization(model)
            self._empty_word_ids = _lone_space_ids(encoder)
            if self._empty_word_ids is not None:
                self._normalize, self._segment_encoder = processor.Normalize, encoder
                self._cut_at_every_space = self._cut_at_single_spaces = True
        self._word_start = None  # for each id: does its piece start with "▁"
        encoder = self._segment_encoder
        space_id = encoder.PieceToId(_SPACE_SYMBOL)
        if self._cut_at_single_spaces and not (
            encoder.IsUnknown(space_id) or encoder.IsControl(space_id) or encoder.IsByte(space_id)
        ):
            self._word_start = np.array([entry.piece.startswith(_SPACE_SYMBOL) for entry in model.pieces], dtype=bool)

    def _load_huggingface(self) -> None:
        import tokenizers

        try:
            hf_tokenizer = tokenizers.Tokenizer.from_file(self.path)
        except Exception as error:  # tokenizers raises its own Exception subclass
            raise ValueError(f"cannot read Hugging Face tokenizer {self.path}: {error}") from error
        self.kind = "huggingface"
        self._sp = None
        self._hf = hf_tokenizer
        self._unsafe_before_space = None
        self._segment_pattern = None
        self._cut_at_every_space = self._cut_at_single_spaces = False
        self._empty_word_ids = self._word_start = self._normalize = self._segment_encoder = None
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        configured = _special_tokens_from_config(Path(self.path).parent)
        self.bos_id = self._hf_special_id(configured.get("bos_token"), _HF_BOS_CANDIDATES)
        self.eos_id = self._hf_special_id(configured.get("eos_token"), _HF_EOS_CANDIDATES)
        self.pad_id = self._hf_special_id(configured.get("pad_token"), _HF_PAD_CANDIDATES)

    def _hf_special_id(self, configured: str | None, candidates: tuple[str, ...]) -> int | None:
        assert self._hf is not None
        for token in ((configured,) if configured else ()) + candidates:
            token_id = self._hf.token_to_id(token)
            if token_id is not None:
                return token_id
            if configured:  # an explicit config that names an unknown token means "none"
                return None
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        if self._sp is not None:
            return self.encode_batch([text])[0]
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts in one native call (faster than a Python loop)."""
        if self._sp is None:
            return [encoding.ids for encoding in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        if self._unsafe_before_space is None:
            return self._sp.Encode(list(texts), out_type=int)
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            parts = _cut_at_safe_spaces(text, self._unsafe_before_space)
            pieces.extend(parts)
            counts.append(len(parts))
        encoded = self._sp.Encode(pieces, out_type=int)
        if len(encoded) == len(texts):
            return encoded
        result, position = [], 0
        for count in counts:
            result.append(
                encoded[position]
                if count == 1
                else list(itertools.chain.from_iterable(encoded[position : position + count]))
            )
            position += count
        return result

    def encode_flat(self, texts: list[str], num_threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all `texts` concatenated (int32) and the number of ids of each text: what
        `encode_batch` gives, without a Python list per text. Sentencepiece models that can be
        cut exactly go through the segment cache; `num_threads` bounds sentencepiece's threads
        (1 inside worker processes, so workers do not compete for cores)."""
        if self._segment_pattern is None and self._normalize is None:
            if self._sp is None:
                encoded = self.encode_batch(texts)
            else:
                encoded = self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)
            counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(counts.sum()))
            return flat, counts
        if self._normalize is not None:  # "▁a▁▁b" -> "a", "", "b", as below
            segments_per_text = [self._normalized_words(text) for text in texts]
        elif self._cut_at_every_space:  # "a  b" -> "a", "", "b": each is "▁" + itself in place
            segments_per_text = [text.split(" ") if text else [] for text in texts]
        elif self._cut_at_single_spaces:
            split = self._segment_pattern.split
            segments_per_text = [
                text.split(" ") if _single_spaces_between_words(text) else split(text) for text in texts
            ]
        else:
            segments_per_text = [self._segment_pattern.split(text) for text in texts]
        collecting = gc.isenabled()
        gc.disable()  # no cycles are made here; collections would only walk the new id lists
        try:
            dropped = self._cache_new_segments(segments_per_text, num_threads)
            lookup = self._segment_cache.__getitem__
            per_text = [b"".join(map(lookup, segments)) for segments in segments_per_text]
            for segment in dropped:
                del self._segment_cache[segment]
        finally:
            if collecting:
                gc.enable()
        counts = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text)) // 4
        return np.frombuffer(b"".join(per_text), dtype=np.int32), counts

    def _normalized_words(self, text: str) -> list[str]:
        normalized = self._normalize(text)
        if normalized and not normalized.startswith(_SPACE_SYMBOL):
            raise AssertionError(f"sentencepiece normalized a text of {self.path} without its dummy prefix")
        return normalized.split(_SPACE_SYMBOL)[1:]

    def _cache_new_segments(self, segments_per_text: list[list[str]], num_threads: int) -> list[str]:
        """Put the int32 ids (as bytes) of every segment not in the cache into it (each encoded
        alone, with the dummy prefix, all in one batch); return the new segments too long to
        keep once they have been used (long segments rarely recur: the room is for words)."""
        cache = self._segment_cache
        distinct = set(itertools.chain.from_iterable(segments_per_text))
        unseen = distinct.difference(cache)
        if not unseen:
            return []
        if len(cache) + len(unseen) > SEGMENT_CACHE_ENTRIES:
            cache.clear()
            unseen = distinct
        if self._empty_word_ids is not None and "" in unseen:  # between two spaces: one "▁"
            unseen.discard("")
            cache[""] = self._empty_word_ids
        new = list(unseen)
        ids = self._encode_words_joined(new, num_threads) if self._word_start is not None else None
        if ids is None:
            encoded = self._segment_encoder.Encode(new, out_type=int, num_threads=num_threads)
            ids = map(bytes, map(array.array, itertools.repeat("i"), encoded))
        cache.update(zip(new, ids))
        return [segment for segment in new if len(segment) > CACHED_SEGMENT_CHARS]

    def _encode_words_joined(self, words: list[str], num_threads: int) -> list[bytes] | None:
        """The int32 ids (as bytes) of each space-free word, from encoding them joined by spaces
        a few at a time: cheaper than one sentencepiece call and one id list per word.
        Exact for `_cut_at_single_spaces` models: the joined text is cut at each of its single
        spaces, and each word's ids begin with the only id whose piece starts with "▁". None if
        a word is empty or holds a space or a literal "▁" (it would start a piece too), or if
        the starts do not add up."""
        together = "".join(words)
        if _SPACE_SYMBOL in together or " " in together or "" in words:
            return None
        groups = [" ".join(words[start : start + WORDS_PER_CALL]) for start in range(0, len(words), WORDS_PER_CALL)]
        encoded = self._segment_encoder.Encode(groups, out_type=int, num_threads=num_threads)
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32)
        starts = np.flatnonzero(self._word_start[flat])
        if starts.size != len(words) or (starts.size and starts[0] != 0):
            return None
        bounds = (np.append(starts, flat.size) * 4).tolist()
        buffer = flat.tobytes()
        return list(map(buffer.__getitem__, map(slice, bounds[:-1], bounds[1:])))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS/EOS/PAD are dropped."""
        ids = [int(token_id) for token_id in ids]
        if self._sp is not None:
            return self._sp.DecodeIds(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._load()

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.path!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def _none_if_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _model_proto(model_bytes: bytes) -> Any:
    """The parsed sentencepiece ModelProto, or None without protobuf (texts are then encoded whole)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return None
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_bytes)
    return model


def _safe_cut_context(model: Any) -> frozenset[str] | None:
    """Characters after which a space must not be cut, or None if this sentencepiece model
    cannot be cut exactly at all.

    Cutting `...c x...` into `...c` and `x...` is exact when: normalization is the identity
    and adds a dummy prefix (the dropped space returns as the second piece's leading space)
    without collapsing whitespace, whitespace is a prefix (not a suffix) of pieces, the model
    is BPE and no vocabulary piece holds `c` followed by a space: then no merge crosses the
    cut (a merge needs the joined string in the vocabulary), merges on either side never
    meet, and both halves are encoded as they would be in place. Unigram models are never
    cut: their Viterbi ties (e.g. "*" "**" against "**" "*") can break differently once the
    scores before the cut are gone.
    """
    from sentencepiece import sentencepiece_model_pb2

    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    exact = (
        normalizer.name == "identity"
        and not normalizer.precompiled_charsmap
        and normalizer.escape_whitespaces
        and normalizer.add_dummy_prefix
        and not normalizer.remove_extra_whitespaces
        and not trainer.treat_whitespace_as_suffix
        and trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    )
    if not exact:
        return None
    unsafe = {" ", _SPACE_SYMBOL}
    for entry in model.pieces:
        piece = entry.piece
        for index in range(1, len(piece)):
            if piece[index] == _SPACE_SYMBOL and piece[index - 1] != _SPACE_SYMBOL:
                unsafe.add(piece[index - 1])
    return frozenset(unsafe)


def _spaces_only_start_pieces(model: Any) -> bool:
    """Whether no piece holds "▁" after its first character: then a cut before every space is
    exact, also inside runs of spaces (unlike Llama2's vocabulary, which has "▁▁" pieces)."""
    return all(_SPACE_SYMBOL not in entry.piece[1:] for entry in model.pieces)


def _normalized_text_cuts_at_every_space(model: Any) -> bool:
    """Whether a BPE model's normalized text (whitespace escaped to "▁", a dummy prefix, then
    whatever its normalizer does) can be cut before every "▁": no piece holds an inner "▁"."""
    if model is None:
        return False
    from sentencepiece import sentencepiece_model_pb2

    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    return (
        normalizer.escape_whitespaces
        and normalizer.add_dummy_prefix
        and not trainer.treat_whitespace_as_suffix
        and trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        and _spaces_only_start_pieces(model)
    )


def _without_normalization(model: Any) -> sentencepiece.SentencePieceProcessor:
    """The same model with the identity normalizer (dummy prefix kept, whitespace kept as is):
    encodes text that was already normalized exactly as the original encodes it."""
    from sentencepiece import sentencepiece_model_pb2

    copy = sentencepiece_model_pb2.ModelProto()
    copy.CopyFrom(model)
    copy.normalizer_spec.name = "identity"
    copy.normalizer_spec.precompiled_charsmap = b""
    copy.normalizer_spec.remove_extra_whitespaces = False
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(copy.SerializeToString())
    return processor


def _single_spaces_between_words(text: str) -> bool:
    """Whether every space of `text` stands alone between two other characters and it holds
    no literal "▁": then `str.split(" ")` cuts it as `_safe_space_pattern` would."""
    return "  " not in text and _SPACE_SYMBOL not in text and not text.startswith(" ") and not text.endswith(" ")


def _lone_space_ids(processor: sentencepiece.SentencePieceProcessor) -> bytes | None:
    """The int32 ids of one "▁" symbol: half of what " " gives (two "▁" with the dummy
    prefix, never merged when no piece spans them); None if the halves differ."""
    doubled = processor.Encode(" ", out_type=int)
    half = len(doubled) // 2
    if not doubled or len(doubled) % 2 or doubled[:half] != doubled[half:]:
        return None
    return array.array("i", doubled[:half]).tobytes()


def _safe_space_pattern(unsafe_before: frozenset[str] | None) -> re.Pattern | None:
    """A regex matching exactly the spaces `_cut_at_safe_spaces` may cut at (any segment
    length): a single space after a safe character and before a non-space character."""
    if unsafe_before is None:
        return None
    unsafe = "".join(re.escape(character) for character in sorted(unsafe_before))
    # the literal space first lets the regex engine scan for it quickly
    return re.compile(f" (?<=[^{unsafe}] )(?=[^ ])")


def _cut_at_safe_spaces(text: str, unsafe_before: frozenset[str]) -> list[str]:
    """`text` cut at single spaces (dropped) after safe characters, pieces >= SEGMENT_CHARS."""
    if len(text) <= 2 * SEGMENT_CHARS:
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * SEGMENT_CHARS:
        cut = text.find(" ", start + SEGMENT_CHARS)
        while cut != -1 and (text[cut - 1] in unsafe_before or cut + 1 >= len(text) or text[cut + 1] == " "):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def _special_tokens_from_config(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from an HF `tokenizer_config.json` next to tokenizer.json."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    tokens: dict[str, str] = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def resolve_tokenizer_path(path: str | Path) -> Path:
    """The tokenizer file `path` designates: a `.model`, a `tokenizer.json`, or a directory
    holding one of them (tokenizer.json preferred, as in HF model directories)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / HF_TOKENIZER_FILE, path / "tokenizer.model"):
            if candidate.is_file():
                return candidate
        models = sorted(path.glob("*" + SENTENCEPIECE_FILE_SUFFIX))
        if len(models) == 1:
            return models[0]
        raise ValueError(
            f"no tokenizer found in directory {path}: expected tokenizer.json, tokenizer.model "
            "or exactly one *.model sentencepiece file"
        )
    if not path.is_file():
        raise ValueError(
            f"tokenizer {path} does not exist: pass a sentencepiece .model file, a Hugging Face "
            "tokenizer.json, or a directory holding one"
        )
    if path.suffix not in (SENTENCEPIECE_FILE_SUFFIX, ".json"):
        raise ValueError(f"tokenizer {path} is neither a sentencepiece .model nor a tokenizer .json file")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece `.model`, a `tokenizer.json`, or a directory holding either."""
    return Tokenizer(resolve_tokenizer_path(path))


def _lines_for_training(texts: Iterable[str], max_line_chars: int) -> Iterator[str]:
    """Sentencepiece trains on lines; split documents at newlines and cut very long lines."""
    for text in texts:
        for line in text.split("\n"):
            line = line.rstrip()
            for start in range(0, len(line), max_line_chars):
                piece = line[start : start + max_line_chars]
                if piece.strip():
                    yield piece


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_training_lines: int = 200_000,
    overwrite: bool = True,
) -> Path:
    """Train a Llama-style sentencepiece model on `texts` and return the `.model` path.

    Llama2 conventions: unk=0, bos=1 (`<s>`), eos=2 (`</s>`), no pad id, byte fallback (any
    text round-trips), digits split, whitespace kept as is (identity normalization). Training
    is single-threaded over unshuffled lines, so the same texts give the same model bytes.
    `output_prefix.model` appears only once training succeeded (`overwrite=False`: and only if
    no other run wrote it meanwhile); its temporary file never outlives a failed run.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 259 ids")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = Path(str(output_prefix) + SENTENCEPIECE_FILE_SUFFIX)
    # Written through model_writer: with model_prefix, sentencepiece stores that (temporary)
    # path inside the model and two identical trainings would differ in their bytes.
    model_bytes = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.Train(
            sentence_iterator=_lines_for_training(texts, max_line_chars=4000),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=max_training_lines,
            shuffle_input_sentence=False,
            max_sentence_length=16384,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(f"sentencepiece training failed for {output_prefix}: {error}") from error
    from megatron_harpe.data.jsonl import atomic_output

    # removes a killed run's temporary first, and this run's own if writing fails (a full disk)
    with atomic_output(model_path, overwrite=overwrite) as temporary_path:
        temporary_path.write_bytes(model_bytes.getvalue())
    return model_path
