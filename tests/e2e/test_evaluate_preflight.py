"""tools/evaluate.py checks before it computes and keeps what it computed: a cell that cannot fit
fails the run in seconds (or is skipped and marked), a bad output directory fails before the
model loads, each cell's score is printed when it finishes, results are rewritten after every
cell, and an interrupted run resumes where it stopped.

Run: pytest tests/e2e/test_evaluate_preflight.py
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections import namedtuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "evaluate.py")


def load_tool():
    module = importlib.import_module("megatron_harpe.commands.evaluate")
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    directory = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_tokenizer(directory)
    save_tiny_llama(directory, seed=2)
    return directory


def test_a_cell_that_cannot_fit_stops_the_run_in_seconds_naming_it(tool, demo_data, tmp_path, capsys):
    """RULER at 1024 tokens with the demo's 4096-piece tokenizer: cwe's example alone does not fit."""
    arguments = [
        "--model",
        "oracle",
        "--tokenizer",
        str(demo_data.tokenizer),
        "--task",
        "ruler",
        "--lengths",
        "1024",
        "--output-dir",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    began = time.time()
    assert tool.main(arguments) == 2
    assert time.time() - began < 10
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: cannot build cwe at 1024 (needs at least ")
    shortest = int(error[0].split("needs at least ")[1].split()[0])
    assert 1024 < shortest < 1300 and "--skip-unfit" in error[0]
    assert not (tmp_path / "out" / "results.json").exists()
    # the shortest length named works
    assert (
        tool.main(
            [
                "--model",
                "oracle",
                "--tokenizer",
                str(demo_data.tokenizer),
                "--task",
                "cwe",
                "--lengths",
                str(shortest),
                "--samples",
                "1",
                "--output-dir",
                str(tmp_path / "ok"),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # --skip-unfit: the other cells run and the table says which did not fit
    assert tool.main(arguments[:-1] + ["--samples", "1", "--skip-unfit", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| cwe | does not fit |" in out and "cwe at 1k skipped: the prompt does not fit (needs at least" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "cwe" not in results["tasks"] and results["unfit_cells"]["cwe"]["1024"].startswith("needs at least")
    assert len(results["tasks"]) == 10 and results["overall"] == 100.0  # the 10 that fit (no qa files)


def test_a_bad_output_directory_fails_before_the_model_loads(tool, tiny_hf, tmp_path, capsys, monkeypatch):
    import megatron_harpe.eval.backends as backends

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(backends, "load_backend", no_model)
    a_file = tmp_path / "results_here"
    a_file.write_text("not a directory")
    assert tool.main(["--model", tiny_hf, "--task", "passkey", "--lengths", "512", "--output-dir", str(a_file)]) == 2
    error = capsys.readouterr().err
    assert "--output-dir" in error and "is a file, not a directory" in error
    assert a_file.read_text() == "not a directory"
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    assert (
        tool.main(["--model", tiny_hf, "--task", "passkey", "--lengths", "512", "--output-dir", str(tmp_path / "full")])
        == 2
    )
    assert "1 MiB free" in capsys.readouterr().err


def test_max_new_tokens_help_says_it_replaces_every_budget(tool):
    text = " ".join(tool.build_parser().format_help().split())
    assert "replaces every task's answer budget" in text and "vt 30, cwe 120, fwe 50, qa 32" in text


class Interrupt(Exception):
    pass


def test_an_interrupted_run_keeps_its_work_and_resumes(tool, tiny_hf, tmp_path, capsys, monkeypatch):
    import megatron_harpe.eval.suite as suite

    output = tmp_path / "out"
    arguments = [
        "--model",
        "oracle",
        "--tokenizer",
        tiny_hf,
        "--task",
        "niah_single_1,passkey",
        "--lengths",
        "512,1k",
        "--samples",
        "3",
        "--output-dir",
        str(output),
        "--no-progress",
    ]
    real_score, calls = suite.score_sample, []

    def scoring_that_dies(backend, sample, method, limit=7):
        if len(calls) == limit:
            raise Interrupt
        calls.append((sample.task, sample.length, sample.index))
        return real_score(backend, sample, method)

    monkeypatch.setattr(suite, "score_sample", scoring_that_dies)
    with pytest.raises(Interrupt):
        tool.main(arguments)
    printed = capsys.readouterr().out
    assert "niah_single_1 @ 512: 100.0 [44, 100] (3 samples" in printed  # each cell printed as it finished
    partial = json.loads((output / "results.json").read_text())
    assert partial["complete"] is False and list(partial["tasks"]["niah_single_1"]) == ["512", "1024"]
    assert "Partial results" in (output / "results.md").read_text()
    kept = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()[1:]]
    assert len(kept) == 7

    assert tool.main(arguments) == 2  # an unfinished run is neither continued nor overwritten silently
    assert "holds an unfinished evaluation (7 samples scored): pass --resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(
        suite, "score_sample", lambda backend, sample, method: scoring_that_dies(backend, sample, method, 99)
    )
    assert tool.main(arguments + ["--resume"]) == 0
    assert len(calls) == 12 - 7  # only what the first run did not score
    assert "7 samples already scored" in capsys.readouterr().out
    resumed = json.loads((output / "results.json").read_text())
    assert resumed["complete"] is True and resumed["overall"] == 100.0
    assert all(len(cell["scores"]) == 3 for by_length in resumed["tasks"].values() for cell in by_length.values())
    # resuming with other settings is refused by name
    assert tool.main(arguments + ["--resume", "--seed", "7"]) == 2
    assert "other settings (seed)" in capsys.readouterr().err
