"""No tracked file cites a document users do not have: the project's internal specification and
design notes (and the directory they live in) are not part of the repository, so a reference to
them is a dead end for a reader. Cite the paper (arXiv 2412.07171), the paper a recipe comes
from, or a page under docs/ instead."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# assembled from parts so that this file does not match itself
_SPEC, _DESIGN, _SHARED = "SP" + "EC", "DES" + "IGN", "sha" + "red/"
PRIVATE_REFERENCES = re.compile(
    rf"\b{_SPEC}\.md\b|\b{_DESIGN}\.md\b|\b{_SPEC}\s*(?:§|section|sections)\b|\b{_DESIGN}\s*(?:§|section)|{_SHARED}"
)


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = [name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        names = [
            str(path.relative_to(REPO))
            for path in REPO.rglob("*")
            if path.is_file() and not {".git", ".venv"} & set(path.relative_to(REPO).parts)
        ]
    return [REPO / name for name in names if (REPO / name).is_file()]


def test_no_tracked_file_cites_a_document_users_do_not_have():
    found = []
    files = tracked_files()
    assert len(files) > 50, f"only {len(files)} files found under {REPO}: the scan would prove nothing"
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (plots, compressed data)
        for number, line in enumerate(text.splitlines(), 1):
            if PRIVATE_REFERENCES.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert not found, "references to documents users do not have (cite the paper or a docs/ page):\n" + "\n".join(found)


def test_the_pattern_catches_each_form():
    for text in (f"see {_SPEC}.md", f"({_SPEC} section 3)", f"{_SPEC} §4", f"{_DESIGN}.md", f"/work/{_SHARED}x"):
        assert PRIVATE_REFERENCES.search(text), text
    assert not PRIVATE_REFERENCES.search("SPECIAL_TOKENS = 2")
