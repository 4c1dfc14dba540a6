"""Haystack text and needle key/value generators for the retrieval tasks.

Prose haystack ("essays" in RULER). RULER uses Paul Graham's essays, which are copyrighted and
not shipped. The default here is real English prose that every CPython installation carries:
the paragraphs of the Python Language Reference in the standard library's
`pydoc_data/topics.py` (Copyright Python Software Foundation, distributed under the PSF License
Agreement; nothing is copied into this repository, the text is read from the running Python).
Code listings and grammar rules are dropped, leaving about 27k words (roughly 40k Llama-2
tokens) of sentences; longer haystacks cycle through them again.
Any UTF-8 text file can replace it (`load_prose_sentences(path)`, `--haystack-file`), e.g. the
essays if you hold a copy.

Noise haystack: RULER's five-sentence repeat. Keys: "adjective-noun" words (RULER draws them
from the wonderwords lists; the lists below are our own) or uuids. Values: 7-digit numbers
or uuids.
"""

from __future__ import annotations

import functools
import random
import re
import uuid

NOISE_PARAGRAPH = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

ADJECTIVES = """
able acid aged airy amber ample angry apt arid ashen astral avid awake azure bald bare basic
bitter bland blank bleak blind blond blue blunt bold bony brave brief bright brisk broad brown
bumpy busy calm candid chilly civic clean clear clever close cloudy coarse cold cosmic cozy
crisp cubic curly damp dapper dark deep dense dizzy dry dull dusty eager early earthy easy
elder empty equal even exact faint fair false fancy fast fierce firm flat fluffy fond frail
free fresh frosty full fuzzy giant glad glossy golden good grand gray great green grim gusty
happy hardy harsh hasty heavy hidden hollow honest humble icy idle jolly keen kind large late
lazy lean level light lively lone long loud lucky lunar magic major merry mild minor misty
modest moist narrow neat new nimble noble noisy odd olive open orange pale plain plump polite
proud purple quick quiet rapid rare raw ready regal rich rigid ripe rocky rosy rough round
royal rusty sacred salty sandy scarlet secret sharp shiny short shy silent silky silver simple
sleek slim slow small smooth snowy soft solar solid sour spare spicy stable steep sticky still
stormy strong sunny super sweet swift tall tame tender thick thin tidy tiny tough tranquil
true usual vast velvet vivid warm wary weary wet white whole wide wild windy wise witty young
""".split()

NOUNS = """
acorn agent alley anchor angle apple apron arch arrow atlas attic badge bagel banjo barn
basket beacon beard bench berry bicycle blanket bolt bonnet border bottle boulder bracelet
branch breeze brick bridge bucket bugle bunker butter button cabin cactus camera canal candle
canoe canyon carpet castle cellar chalk chapel cherry chimney cider circus clock cloud clover
cobra comet copper corner cottage crater crayon cricket crown cushion dagger desert diamond
dolphin donkey dragon drum eagle easel elbow ember engine falcon feather fence ferry fiddle
flag flute forest fossil fountain fox garden garlic geyser glacier glove goblet granite gravel
guitar hammer harbor harp helmet hinge honey horizon island ivory jacket jungle kettle kite
ladder lagoon lantern lemon lily lizard magnet mango maple marble meadow mirror mitten monkey
mosaic muffin needle nest oasis oyster paddle palace parrot pebble pencil pepper piano pillow
pine planet plaza pocket pony potato puzzle quarry quilt rabbit radish raven ribbon river
rocket saddle salmon satchel scarf shadow shell shovel signal sketch sled slipper spoon
squirrel stable statue storm summit sundial swan teapot temple thimble thistle throne tiger
timber tower trumpet tulip tunnel turtle umbrella valley velvet violin volcano wagon walnut
whistle willow window wizard yacht zebra
""".split()

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


def _is_prose_paragraph(paragraph: str) -> bool:
    if len(paragraph) < 60 or not paragraph.endswith("."):
        return False
    letters = sum(char.isalpha() or char in " ,." for char in paragraph)
    return letters / len(paragraph) >= 0.9


@functools.lru_cache(maxsize=4)
def load_prose_sentences(path: str | None = None) -> tuple[str, ...]:
    """Sentences of the prose haystack: a UTF-8 text file at `path`, or by default the prose
    paragraphs of the Python Language Reference shipped with CPython (see module docstring)."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise ValueError(f"cannot read haystack file {path!r}: {error}") from error
        sentences = split_sentences(text)
        if len(sentences) < 20:
            raise ValueError(f"haystack file {path!r} has only {len(sentences)} sentences: "
                             "give a longer text (at least a few pages of prose)")
        return tuple(sentences)
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise ValueError("this Python lacks pydoc_data (the default haystack prose): pass a "
                         "text file with --haystack-file") from error
    paragraphs: list[str] = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            stripped = block.strip()
            if stripped.startswith("* "):
                stripped = stripped[2:]
            elif block.startswith(" "):  # indented: code listing or grammar rule
                continue
            paragraph = " ".join(stripped.split())
            if _is_prose_paragraph(paragraph):
                paragraphs.append(paragraph)
    return tuple(split_sentences(" ".join(paragraphs)))


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
        return self._fresh(lambda: f"{self.rng.choice(ADJECTIVES)}-{self.rng.choice(NOUNS)}")

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
