"""Haystack text and needle key/value generators for the retrieval tasks.

Prose haystack ("essay" in RULER). RULER uses Paul Graham's essays, which are copyrighted and
not shipped. The default here ships with the package, so it is the same on every machine:
`data/prose_haystack.txt.xz`, about 936k characters (210k tokens of SmolLM2's 49k vocabulary,
more with Llama-2's 32k: it does not repeat below 128k tokens) of public-domain English: the
proceedings of the Library of Congress Workshop on Electronic Texts (1992), Alice's Adventures
in Wonderland and Paradise Lost, taken from the Canterbury corpus (see
`scripts/make_haystack_prose.py` and `data/README.md` for provenance and licence).
`--haystack-file` replaces it with any UTF-8 text file, or with RULER's own
`PaulGrahamEssays.json` as is (a JSON object whose "text" field holds the essays), which then
gives RULER's haystack. `haystack_info` reports the source and the SHA-256 of its text.

Noise haystack: RULER's five-sentence repeat. Keys: "adjective-noun" words drawn as RULER
draws them, uniformly from every pair of the `wonderwords` adjective and noun lists (RULER
builds the sorted set of the ~6.2M joined strings; drawing a pair is the same distribution
except for the handful of strings two pairs spell alike through hyphenated words), or uuids.
Values: 7-digit numbers or uuids.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
import os
import random
import re
import uuid
from importlib import resources

NOISE_PARAGRAPH = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEFAULT_HAYSTACK = "prose_haystack.txt.xz"  # in megatron_harpe/eval/tasks/data


@functools.lru_cache(maxsize=1)
def wonderwords_lists() -> dict[str, tuple[str, ...]]:
    """RULER's word lists: the `wonderwords` package's nouns, adjectives and verbs, each sorted
    and without repeats (read from the package's own files, as RULER does)."""
    try:
        from wonderwords import assets
    except ImportError as error:
        raise ValueError(
            "the RULER tasks draw their words from the wonderwords package: pip install wonderwords"
        ) from error
    lists = {}
    for kind in ("noun", "adjective", "verb"):
        text = resources.files(assets).joinpath(f"{kind}list.txt").read_text(encoding="utf-8")
        lists[kind] = tuple(sorted({line.strip() for line in text.splitlines() if line.strip()}))
    return lists


_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Mrs.", "Dr.", "St.", "No.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'“(])")


def split_sentences(text: str) -> list[str]:
    """Split prose at sentence boundaries (". X", "! X", "? X"), keeping common abbreviations
    such as "e.g." inside their sentence. Whitespace inside a sentence collapses to one space."""
    text = " ".join(text.split())
    sentences: list[str] = []
    pending = ""
    for piece in _SENTENCE_END.split(text):
        pending = f"{pending} {piece}" if pending else piece
        if not pending.endswith(_ABBREVIATIONS):
            sentences.append(pending)
            pending = ""
    if pending:
        sentences.append(pending)
    return [sentence for sentence in sentences if sentence]


def _read_haystack_text(path: str | None) -> str:
    if path is None:
        data = resources.files("megatron_harpe.eval.tasks").joinpath("data", DEFAULT_HAYSTACK).read_bytes()
        return lzma.decompress(data).decode("utf-8")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read haystack file {path!r}: {error}") from error
    if path.endswith(".json"):  # RULER's essay file: {"text": "..."}
        try:
            text = json.loads(text)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"haystack file {path!r} is not RULER's essay format (a JSON object with "
                "a 'text' field): pass that, or a plain UTF-8 text file"
            ) from error
    return text


@functools.lru_cache(maxsize=4)
def load_prose_sentences(path: str | None = None) -> tuple[str, ...]:
    """Sentences of the prose haystack: the shipped default (see module docstring), a UTF-8
    text file, or RULER's `PaulGrahamEssays.json` at `path`."""
    sentences = split_sentences(_read_haystack_text(path))
    if len(sentences) < 20:
        raise ValueError(
            f"haystack file {path!r} has only {len(sentences)} sentences: "
            "give a longer text (at least a few pages of prose)"
        )
    return tuple(sentences)


@functools.lru_cache(maxsize=4)
def haystack_info(path: str | None = None) -> dict[str, object]:
    """Where the prose haystack comes from and the SHA-256 of its text (the decompressed text
    for the default), for results.json: the same hash means the same haystack."""
    text = _read_haystack_text(path)
    return {
        "source": f"megatron_harpe/eval/tasks/data/{DEFAULT_HAYSTACK} (public domain)"
        if path is None
        else os.path.abspath(path),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "characters": len(text),
        "sentences": len(load_prose_sentences(path)),
    }


def cycled(sentences: tuple[str, ...] | list[str], count: int) -> list[str]:
    """The first `count` sentences of the text read over and over."""
    if not sentences:
        raise ValueError("empty haystack")
    repeats, remainder = divmod(count, len(sentences))
    return list(sentences) * repeats + list(sentences[:remainder])


class NeedleVocabulary:
    """Draws needle keys and values without repetition inside one sample.

    Uniqueness matters: a repeated key would make the question ambiguous and a repeated value
    would let a model score by copying the wrong needle.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _fresh(self, draw) -> str:
        for _ in range(1000):
            candidate = draw()
            if candidate not in self.used:
                self.used.add(candidate)
                return candidate
        raise ValueError("needle vocabulary exhausted: too many needles for this haystack length")

    def word(self) -> str:
        lists = wonderwords_lists()
        adjectives, nouns = lists["adjective"], lists["noun"]

        def draw() -> str:
            adjective, noun = divmod(self.rng.randrange(len(adjectives) * len(nouns)), len(nouns))
            return f"{adjectives[adjective]}-{nouns[noun]}"

        return self._fresh(draw)

    def number(self, digits: int = 7) -> str:
        return self._fresh(lambda: str(self.rng.randint(10 ** (digits - 1), 10**digits - 1)))

    def uuid(self) -> str:
        return self._fresh(lambda: str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))

    def draw(self, kind: str) -> str:
        if kind == "words":
            return self.word()
        if kind == "numbers":
            return self.number()
        if kind == "uuids":
            return self.uuid()
        raise ValueError(f"unknown needle kind {kind!r}: use words, numbers or uuids")
