"""Faults: input files the data tools must not turn into a silent, empty or partial output
(issue 27 cases 7 and 8).

    python -m pytest tests/faults/test_input_files.py -q

Before: `upsample --mode global` (or `none`) skipped every document without a `source` field,
which those modes do not use, and wrote an empty file with exit code 0; one UTF-16 file among
good files had 20,001 of its 20,051 lines skipped (20 of them named) and the run exited 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import error_lines, run
from data_support import sample_corpus


def _without_sources(demo_data, path: Path, lines: int = 60) -> Path:
    records = [json.loads(line) for line in demo_data.corpus.read_text().splitlines()[:lines]]
    path.write_text("".join(json.dumps({"text": record["text"]}) + "\n" for record in records))
    return path


@pytest.mark.parametrize("mode", ["global", "none"])
def test_modes_that_ignore_sources_do_not_ask_for_them(demo_data, tmp_path: Path, mode: str) -> None:
    corpus = _without_sources(demo_data, tmp_path / "plain.jsonl")
    output = tmp_path / "up.jsonl"
    completed = run(
        "tools/prepare_data.py",
        "upsample",
        "--mode",
        mode,
        "--inputs",
        str(corpus),
        "--output",
        str(output),
        "--length-estimate",
        "chars",
        "--short-keep-probability",
        "1",
        "--workers",
        "0",
    )
    assert completed.returncode == 0, completed.stderr
    assert len(output.read_text().splitlines()) == 60
    assert "skipped" not in completed.stderr


def test_a_source_mode_still_asks_and_an_empty_result_is_an_error(demo_data, tmp_path: Path) -> None:
    corpus = _without_sources(demo_data, tmp_path / "plain.jsonl")
    output = tmp_path / "up.jsonl"
    completed = run(
        "tools/prepare_data.py",
        "upsample",
        "--mode",
        "per_source",
        "--total-tokens",
        "1e6",
        "--inputs",
        str(corpus),
        "--output",
        str(output),
        "--length-estimate",
        "chars",
        "--workers",
        "0",
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert f"{corpus}: 60 of 60 lines could not be used (missing_field 60" in line and "--source-key" in line
    assert not output.exists()


def test_a_utf16_file_among_good_files_fails_the_command_naming_it(demo_data, tmp_path: Path) -> None:
    good = sample_corpus(demo_data, tmp_path / "good.jsonl", 40)
    wide = tmp_path / "wide.jsonl"
    wide.write_bytes(sample_corpus(demo_data, tmp_path / "source.jsonl", 30, start=100).read_text().encode("utf-16"))
    prefix = tmp_path / "out" / "train"
    completed = run(
        "tools/prepare_data.py",
        "tokenize",
        "--inputs",
        str(good),
        str(wide),
        "--tokenizer",
        str(demo_data.tokenizer),
        "--output",
        str(prefix),
        "--workers",
        "0",
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert line.startswith(f"error: {wide}: ") and "lines could not be used" in line
    assert "it looks like UTF-16" in line and "nothing was written" in line
    assert "Traceback" not in completed.stderr
    assert not list((tmp_path / "out").glob("train*"))


def test_a_few_bad_lines_are_still_skipped_and_counted(demo_data, tmp_path: Path) -> None:
    corpus = sample_corpus(demo_data, tmp_path / "mostly_good.jsonl", 40)
    with open(corpus, "a") as stream:
        stream.write("not json\n" * 5)
    prefix = tmp_path / "train"
    completed = run(
        "tools/prepare_data.py",
        "tokenize",
        "--inputs",
        str(corpus),
        "--tokenizer",
        str(demo_data.tokenizer),
        "--output",
        str(prefix),
        "--workers",
        "0",
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(Path(f"{prefix}.summary.json").read_text())["problems"]["skipped_total"] == 5
