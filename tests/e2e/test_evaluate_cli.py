"""tools/evaluate.py end to end: a tiny Hugging Face Llama on real prose, the oracle through the
CLI, and the error path.

Run: pytest tests/e2e/test_evaluate_cli.py
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from megatron_harpe.eval.tasks.haystack import load_prose_sentences
from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "evaluate.py")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, env=environment, timeout=600
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_tokenizer(directory)
    save_tiny_llama(directory, seed=1)
    return directory


def test_hf_model_all_task_kinds(model_dir, tmp_path):
    sentences = load_prose_sentences()
    documents = tmp_path / "docs.jsonl"
    documents.write_text(
        "".join(json.dumps({"text": " ".join(sentences[i : i + 150])}) + "\n" for i in range(0, 450, 150)),
        encoding="utf-8",
    )
    output = tmp_path / "out"
    completed = run_tool(
        "--model",
        model_dir,
        "--task",
        "niah_single_2,passkey,needle_grid,ppl",
        "--lengths",
        "512,1k",
        "--samples",
        "1",
        "--max-new-tokens",
        "8",
        "--grid-depths",
        "0,100",
        "--ppl-data",
        str(documents),
        "--ppl-stride",
        "128",
        "--output-dir",
        str(output),
        "--save-predictions",
        "--no-progress",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads((output / "results.json").read_text())
    assert results["lengths"] == [512, 1024] and results["scoring"] == "generate"
    assert set(results["tasks"]) == {"niah_single_2", "passkey"}
    for by_length in results["tasks"].values():
        for length, cell in by_length.items():
            assert 0.0 <= cell["score"] <= 100.0 and cell["prompt_tokens_mean"] + 8 <= int(length)
    assert len(results["needle_grid"]["scores"]) == 2
    perplexity = results["perplexity"]["1024"]
    assert perplexity["documents"] == 3 and perplexity["tokens"] == 3 * 1023
    # a random model is close to uniform over its vocabulary, far from a trained model's perplexity
    assert 100 < perplexity["ppl"] < 5 * 512
    for name in ("results.md", "retrieval.png", "needle_grid.png", "perplexity.png", "predictions.jsonl"):
        assert (output / name).stat().st_size > 0
    assert "| passkey |" in completed.stdout


def test_oracle_through_the_cli_scores_100(model_dir, tmp_path):
    completed = run_tool(
        "--model",
        "oracle",
        "--tokenizer",
        model_dir,
        "--task",
        "niah",
        "--lengths",
        "1024",
        "--samples",
        "2",
        "--scoring",
        "teacher_forcing",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["tasks"]) == 8 and results["overall"] == 100.0
    assert results["scoring"] == "teacher_forcing"


DATA = os.path.join(REPO, "tests", "data")


def test_ruler_through_the_cli_with_a_chat_template(model_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>")
    completed = run_tool(
        "--model",
        "oracle",
        "--tokenizer",
        model_dir,
        "--task",
        "ruler",
        "--lengths",
        "2048",
        "--samples",
        "2",
        "--qa-squad",
        os.path.join(DATA, "qa_squad_tiny.json"),
        "--qa-hotpot",
        os.path.join(DATA, "qa_hotpot_tiny.json"),
        "--chat-template",
        str(template),
        "--output-dir",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["tasks"]) == 13 and results["overall"] == 100.0 and results["mean_label"] == "RULER-13 mean"
    provenance = results["provenance"]
    assert provenance["prompt"]["chat_template"] == str(template)
    assert len(provenance["haystack"]["sha256"]) == 64 and provenance["versions"]["torch"]
    assert results["tasks"]["cwe"]["2048"]["interval"][1] == 100.0
    assert "| **RULER-13 mean** |" in completed.stdout
    without_qa = run_tool(
        "--model",
        "oracle",
        "--tokenizer",
        model_dir,
        "--task",
        "ruler",
        "--lengths",
        "2048",
        "--samples",
        "1",
        "--output-dir",
        str(tmp_path / "no_qa"),
    )
    assert without_qa.returncode == 0, without_qa.stderr
    assert "qa_1, qa_2 skipped" in without_qa.stderr and "not RULER-13" in without_qa.stdout


def load_tool_main():
    module = importlib.import_module("megatron_harpe.commands.evaluate")
    return module.main


def test_user_errors_exit_with_a_message(model_dir, tmp_path, capsys):
    main = load_tool_main()
    assert main(["--model", model_dir, "--task", "ppl", "--lengths", "512", "--output-dir", str(tmp_path)]) == 2
    assert "--ppl-data" in capsys.readouterr().err
    assert main(["--model", model_dir, "--task", "niah_single_9", "--lengths", "512"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["--model", "oracle", "--task", "passkey", "--lengths", "512"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                "oracle",
                "--tokenizer",
                model_dir,
                "--task",
                "qa_1",
                "--lengths",
                "2048",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "qa_1 needs its data file: pass --qa-squad FILE" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                "oracle",
                "--tokenizer",
                model_dir,
                "--task",
                "niah_single_1",
                "--lengths",
                "2048",
                "--chat-template",
                str(tmp_path / "none.jinja"),
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "Jinja chat template" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(SystemExit):
        main(["--model", model_dir, "--task", "passkey", "--lengths", "4x"])
