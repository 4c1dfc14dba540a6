"""Rebuild the default prose haystack, megatron_harpe/eval/tasks/data/prose_haystack.txt.xz.

    pip download --no-deps --no-binary :all: brotli==1.2.1 && tar xzf brotli-1.2.1.tar.gz
    python scripts/make_haystack_prose.py brotli-1.2.1/tests/testdata

The sources are three public-domain texts of the Canterbury corpus, which the brotli source
distribution on PyPI carries as test data: `lcet10.txt` (proceedings of the Library of Congress
Workshop on Electronic Texts, 1992, a US government work released by Project Gutenberg),
`alice29.txt` (Lewis Carroll, Alice's Adventures in Wonderland, 1865) and `plrabn12.txt` (John
Milton, Paradise Lost, 1667; only the poem, from "Book I" on, one verse paragraph a line).
The Project Gutenberg header/trailer and preface, tables of contents, addresses and other
non-prose blocks are dropped; each kept paragraph becomes one line (whitespace collapsed,
Carroll's `quotes' written with plain apostrophes, list bullets removed). The result is written
xz-compressed; the haystack's hash is taken over the decompressed text, so it does not depend on
the compressor.
"""

from __future__ import annotations

import lzma
import os
import re
import sys

from megatron_harpe import files

SOURCES = ("lcet10.txt", "alice29.txt", "plrabn12.txt")  # the essay-like proceedings first
OUTPUT = os.path.join(os.path.dirname(__file__), "..", "megatron_harpe", "eval", "data", "prose_haystack.txt.xz")
_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'\"!?()\-]")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated blocks) that read as running prose."""
    kept = []
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        paragraph = " ".join(block.replace("`", "'").split()).removeprefix("* ")
        if len(paragraph) < 80 or "Project Gutenberg" in paragraph or "Etext" in paragraph:
            continue
        if paragraph[-1] not in ".!?'\")":
            continue
        if len(_PROSE_CHARS.findall(paragraph)) / len(paragraph) < 0.97:
            continue
        kept.append(paragraph)
    return kept


def verse_paragraphs(text: str) -> list[str]:
    """Paradise Lost: the poem from "Book I" on, split where a line is indented (a new verse
    paragraph) or a book starts; book headings and the closing mark dropped."""
    poem = text.replace("\r", "")[text.index("\nBook I ") :]
    paragraphs, current = [], []
    for line in poem.split("\n"):
        if re.fullmatch(r"\s*(Book [IVX]+|\[The End\])?\s*", line) or line.startswith("  "):
            if current:
                paragraphs.append(" ".join(" ".join(current).split()))
            current = []
        if line.strip() and not re.fullmatch(r"\s*(Book [IVX]+|\[The End\])\s*", line):
            current.append(line)
    if current:
        paragraphs.append(" ".join(" ".join(current).split()))
    return paragraphs


def main(source_dir: str) -> None:
    paragraphs: list[str] = []
    for name in SOURCES:
        with open(os.path.join(source_dir, name), encoding="latin-1") as handle:
            text = handle.read()
        paragraphs += verse_paragraphs(text) if name == "plrabn12.txt" else prose_paragraphs(text)
    text = "\n".join(paragraphs) + "\n"
    with files.atomic_path(OUTPUT) as temporary:
        with lzma.open(temporary, "wt", encoding="utf-8", preset=9) as handle:
            handle.write(text)
    print(f"{len(paragraphs)} paragraphs, {len(text)} characters -> {OUTPUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
