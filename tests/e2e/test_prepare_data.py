"""End to end on the offline demo corpus through `tools/prepare_data.py`: the `demo` command as
a subprocess, then the stages one by one through the tool's `main`, checked against each other
and read back with megatron-core.

    pytest tests/e2e/test_prepare_data.py
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_harpe.data.demo_corpus import DEMO_LENGTH_THRESHOLD, DEMO_SHARES, build_demo_corpus, prepare_demo_data
from megatron_harpe.data.indexed import read_documents
from megatron_harpe.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_data.py"


def tool_main(argv: list[str]) -> int:
    module = importlib.import_module("megatron_harpe.commands.prepare_data")
    return module.main(argv)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The corpus built by the tool run as a script, then the `demo` command (which reuses it)."""
    workdir = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(TOOL), "build-demo-corpus", "--output", str(workdir / "corpus.jsonl")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == str(workdir / "corpus.jsonl")
    assert tool_main(["demo", "--output-dir", str(workdir), "--workers", "2"]) == 0
    return workdir


def corpus_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_corpus_has_several_sources_of_short_and_long_documents(demo_dir):
    records = corpus_records(demo_dir / "corpus.jsonl")
    assert (demo_dir / "corpus.jsonl").stat().st_size > 2_000_000
    assert set(Counter(r["source"] for r in records)) == set(DEMO_SHARES)
    tokenizer = load_tokenizer(demo_dir / "tokenizer.model")
    assert tokenizer.vocab_size == 4096 and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    for source in DEMO_SHARES:
        lengths = [len(r["text"]) / 3 for r in records if r["source"] == source]
        assert min(lengths) < DEMO_LENGTH_THRESHOLD, f"{source} has no short document"
    assert sum(len(r["text"]) / 3 >= DEMO_LENGTH_THRESHOLD for r in records) > 100
    assert "PSF" in (demo_dir / "LICENSE-PSF.txt").read_text()


def test_demo_corpus_is_deterministic(demo_dir, tmp_path):
    again = build_demo_corpus(tmp_path / "corpus.jsonl")
    assert again.read_bytes() == (demo_dir / "corpus.jsonl").read_bytes()


def test_demo_dataset_is_upsampled_and_decodes_to_corpus_documents(demo_dir):
    summary = json.loads((demo_dir / "demo_text_document.summary.json").read_text())
    before, after = summary["before"]["(all)"], summary["after"]["(all)"]
    assert after["long_share"] > before["long_share"] + 0.1
    assert summary["problems"]["skipped_total"] == 0
    assert (demo_dir / "demo_text_document.report.png").stat().st_size > 10_000
    tokenizer = load_tokenizer(demo_dir / "tokenizer.model")
    texts = [r["text"] for r in corpus_records(demo_dir / "corpus.jsonl")]
    documents = read_documents(demo_dir / "demo_text_document")
    assert len(documents) == summary["documents"] == after["documents"]
    position = 0  # kept documents appear in corpus order, each decoding to its text exactly
    for document in documents:
        decoded = tokenizer.decode(document[1:-1].tolist())
        position = texts.index(decoded, position) + 1
    started = time.perf_counter()
    assert prepare_demo_data(demo_dir).prefix == str(demo_dir / "demo_text_document")
    assert time.perf_counter() - started < 1.0  # every step already done


def test_stages_one_by_one_equal_the_demo(demo_dir, tmp_path):
    corpus = str(demo_dir / "corpus.jsonl")
    assert (
        tool_main(["train-tokenizer", "--inputs", corpus, "--output", str(tmp_path / "sp"), "--vocab-size", "4096"])
        == 0
    )
    assert (tmp_path / "sp.model").read_bytes() == (demo_dir / "tokenizer.model").read_bytes()
    shares = ",".join(f"{name}={weight}" for name, weight in DEMO_SHARES.items())
    assert (
        tool_main(
            [
                "upsample",
                "--inputs",
                corpus,
                "--output",
                str(tmp_path / "up.jsonl.zst"),
                "--shares",
                shares,
                "--total-tokens",
                "5e5",
                "--length-threshold",
                str(DEMO_LENGTH_THRESHOLD),
                "--tokenizer",
                str(tmp_path / "sp.model"),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert (
        tool_main(
            [
                "tokenize",
                "--inputs",
                str(tmp_path / "up.jsonl.zst"),
                "--output",
                str(tmp_path / "train"),
                "--tokenizer",
                str(tmp_path / "sp.model"),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"train{suffix}").read_bytes() == (demo_dir / f"demo_text_document{suffix}").read_bytes()
    assert (
        tool_main(
            [
                "tokenize",
                "--inputs",
                str(tmp_path / "up.jsonl.zst"),
                "--output",
                str(tmp_path / "train"),
                "--tokenizer",
                str(tmp_path / "sp.model"),
            ]
        )
        == 2
    )  # exists: refused, nothing changed


def test_training_samples_are_windows_of_the_packed_corpus(demo_dir):
    from megatron_harpe.data.loader import build_gpt_dataset, micro_batches

    tokenizer = load_tokenizer(demo_dir / "tokenizer.model")
    stream = np.concatenate(read_documents(demo_dir / "demo_text_document"))
    dataset = build_gpt_dataset(
        [str(demo_dir / "demo_text_document")],
        None,
        seq_length=1024,
        num_samples=64,
        seed=1234,
        tokenizer=tokenizer,
        reset_position_ids=True,
    )
    batch = next(micro_batches(dataset, micro_batch_size=4, global_batch_size=8, dp_rank=0, dp_size=2))
    assert batch["tokens"].shape == (4, 1024)
    for row in batch["tokens"].numpy():
        starts = np.flatnonzero(stream[: len(stream) - 1024] == row[0])
        assert any((stream[s : s + 1024] == row).all() for s in starts)


def _tokenize_command(tmp_path: Path, name: str, *extra: str) -> list[str]:
    from megatron_harpe.eval.tasks.synthetic_kv import write_tokenizer

    tokenizer = tmp_path / "tok" / "tokenizer.json"
    if not tokenizer.exists():
        write_tokenizer(tokenizer)
        with open(tmp_path / "corpus.jsonl", "w") as handle:  # about 3 MB: several chunks, a bar that moves
            for index in range(6000):
                handle.write(json.dumps({"text": " ".join(["get", str(index % 10)] * 120)}) + "\n")
    return [
        sys.executable,
        str(TOOL),
        "tokenize",
        "--inputs",
        str(tmp_path / "corpus.jsonl"),
        "--tokenizer",
        str(tokenizer),
        "--output",
        str(tmp_path / name),
        "--workers",
        "0",
        *extra,
    ]


def _run_on_a_terminal(command: list[str]) -> str:
    """Run `command` with stderr on a pseudo-terminal; returns what the terminal showed."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = bytearray()
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(leader)
    assert process.wait(timeout=300) == 0, shown.decode(errors="replace")
    return shown.decode(errors="replace")


def test_tokenize_shows_progress_with_an_eta_on_a_terminal_only(tmp_path):
    import re

    shown = _run_on_a_terminal(_tokenize_command(tmp_path, "on_terminal"))
    assert "tokenize" in shown and re.search(r"\d+%\|", shown), shown[-500:]
    assert re.search(r"<\d\d:\d\d", shown), f"no ETA (elapsed<remaining) in: {shown[-500:]!r}"
    quiet = _run_on_a_terminal(_tokenize_command(tmp_path, "no_progress", "--no-progress"))
    assert not re.search(r"\d+%\|", quiet), quiet[-500:]
    piped = subprocess.run(_tokenize_command(tmp_path, "piped"), capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert not re.search(r"\d+%\||<\d\d:\d\d", piped.stderr), piped.stderr[-500:]  # a log file stays clean
