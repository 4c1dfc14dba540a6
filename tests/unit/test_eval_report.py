"""Result files (JSON, Markdown, PNG), logging scalars and task-name handling.

Run: pytest tests/unit/test_eval_report.py
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_harpe.eval.backends.hf import HFTokenizer
from megatron_harpe.eval.backends.synthetic import OracleBackend
from megatron_harpe.eval.report import markdown_table, write_report
from megatron_harpe.eval.suite import resolve_scoring, run_eval_suite, scalars_for_logging
from megatron_harpe.eval.tasks.registry import expand_tasks
from megatron_harpe.eval.testing import save_tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> OracleBackend:
    directory = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    save_tiny_tokenizer(directory)
    return OracleBackend(HFTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module")
def results(oracle) -> dict:
    document = oracle.tokenizer.encode("The grass is green. " * 200)
    return run_eval_suite(
        oracle,
        ["niah_single_1", "passkey", "needle_grid", "ppl"],
        [512, 1024],
        samples=2,
        seed=0,
        grid_depths=(0, 50, 100),
        ppl_documents=[document],
        keep_records=True,
        progress=False,
    )


def test_results_structure(results, oracle):
    assert results["tasks"]["passkey"]["1024"]["scores"] == [100.0, 100.0]
    assert results["per_length"] == {"512": 100.0, "1024": 100.0} and results["overall"] == 100.0
    assert results["mean_over"] == ["niah_single_1"]
    assert results["needle_grid"]["scores"] == [[100.0, 100.0]] * 3
    assert results["perplexity"]["512"]["ppl"] == pytest.approx(oracle.tokenizer.vocab_size)
    assert len(results["records"]) == 2 * 2 * 2 + 3 * 2 * 2
    json.dumps(results)  # JSON-ready


def test_write_report_creates_complete_files(results, tmp_path):
    paths = write_report(results, str(tmp_path / "out"))
    assert set(paths) == {"predictions", "json", "markdown", "retrieval_plot", "needle_grid_plot", "perplexity_plot"}
    saved = json.loads(open(paths["json"], encoding="utf-8").read())
    assert saved["overall"] == 100.0 and "records" not in saved
    assert len(open(paths["predictions"], encoding="utf-8").read().splitlines()) == len(results["records"])
    for key in ("retrieval_plot", "needle_grid_plot", "perplexity_plot"):
        with open(paths[key], "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
    assert not [name for name in os.listdir(tmp_path / "out") if name.startswith(".tmp_")]
    table = open(paths["markdown"], encoding="utf-8").read()
    assert "| niah_single_1 | 100.0 [34, 100] | 100.0 [34, 100] | 100.00 |" in table  # Wilson, 2 samples
    assert "| **NIAH-8 mean** |" not in table and "| **mean of 1 tasks (niah_single_1)** |" in table
    assert "| 50 | 100 [34, 100] | 100 [34, 100] |" in table
    assert "Chat template: none" in table and results["provenance"]["haystack"]["sha256"][:12] in table


def test_markdown_shows_each_score_in_its_cell():
    results = {
        "model": "m",
        "samples": 1,
        "seed": 0,
        "scoring": "generate",
        "lengths": [4096, 8192],
        "tasks": {"passkey": {"4096": {"score": 90.0}, "8192": {"score": 40.0}}},
        "per_length": {"4096": 90.0, "8192": 40.0},
        "overall": 65.0,
    }
    results["mean_over"] = ["passkey"]
    table = markdown_table(results)
    assert "| task | 4k | 8k | mean |" in table
    assert "| passkey | 90.00 | 40.00 | 65.00 |" in table


def test_scalars_for_logging(results):
    scalars = scalars_for_logging(results)
    assert scalars["eval/passkey/512"] == 100.0
    assert scalars["eval/retrieval_mean/overall"] == 100.0
    assert "eval/ppl/1024" in scalars and all(isinstance(v, float) for v in scalars.values())


def test_task_names_and_options_are_checked(oracle):
    assert expand_tasks(["niah"])[0] == "niah_single_1" and len(expand_tasks(["niah", "niah_single_1"])) == 8
    with pytest.raises(ValueError, match="unknown task 'nia'"):
        expand_tasks(["nia"])
    with pytest.raises(ValueError, match="unknown scoring"):
        resolve_scoring(oracle, "sampling")
    with pytest.raises(ValueError, match="needs documents"):
        run_eval_suite(oracle, ["ppl"], [512], progress=False)
    with pytest.raises(ValueError, match="samples"):
        run_eval_suite(oracle, ["passkey"], [512], samples=0, progress=False)


def test_headline_mean_averages_niah_tasks_only(oracle):
    class ForgetsPasskeys(OracleBackend):
        def generate(self, prompt_ids, max_new_tokens):
            if "What is the pass key?" in self.tokenizer.decode(prompt_ids):
                return []
            return super().generate(prompt_ids, max_new_tokens)

    backend = ForgetsPasskeys(oracle.tokenizer)
    mixed = run_eval_suite(backend, ["passkey", "niah_single_2"], [512], samples=1, progress=False)
    assert mixed["tasks"]["passkey"]["512"]["score"] == 0.0
    assert mixed["overall"] == 100.0 and mixed["mean_over"] == ["niah_single_2"]
    alone = run_eval_suite(backend, ["passkey"], [512], samples=1, progress=False)
    assert alone["overall"] == 0.0 and alone["mean_over"] == ["passkey"]
