"""Short-context tasks through lm-evaluation-harness, offline: task YAMLs over small local JSON
files of our own (multiple choice, generation, plain text; tests/e2e/lm_eval_tasks.py) run on a
tiny Hugging Face Llama through lm-eval's own HF model, and on the same model converted to a
megatron_harpe checkpoint through our wrapper (`MegatronLM`, via tools/evaluate.py). Both must
give the same log-likelihood for every item and choice, the same generated text, the same
rolling log-likelihoods and scores; a wrapper that drops the BOS token or misaligns the
continuation by one position must not. --baseline adds the retention column.

Run: pytest tests/e2e/test_short_tasks.py
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
from lm_eval_tasks import SHORT_TASKS, TOLERANCE, assert_same_items, items, offline_environment, responses, write_tasks

from megatron_harpe import parallel
from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "evaluate.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    environment = offline_environment(str(root / "datasets_cache"))
    os.environ.update(environment)  # the in-process runs below (this test module only reads local files)
    hf_dir = str(root / "hf")
    save_tiny_tokenizer(hf_dir)
    save_tiny_llama(hf_dir, seed=3)
    megatron_dir = str(root / "megatron")
    converted = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "convert_checkpoint.py"),
            "hf-to-megatron",
            "--input",
            hf_dir,
            "--output",
            megatron_dir,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **environment},
        timeout=600,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    return {
        "root": root,
        "hf": hf_dir,
        "megatron": megatron_dir,
        "tasks": write_tasks(str(root / "tasks")),
        "environment": environment,
    }


def load_tool():
    module = importlib.import_module("megatron_harpe.commands.evaluate")
    return module


@pytest.fixture(scope="module")
def hf_run(setup):
    """lm-eval's own Hugging Face model on the HF directory, through the tool in this process."""
    output = str(setup["root"] / "out_hf")
    tool = load_tool()
    args = tool.build_parser().parse_args(
        [
            "--model",
            setup["hf"],
            "--task",
            "short",
            "--short-tasks",
            SHORT_TASKS,
            "--lm-eval-include",
            setup["tasks"],
            "--output-dir",
            output,
            "--save-predictions",
            "--no-progress",
        ]
    )
    from megatron_harpe.eval.evaluation import run_evaluation

    run_evaluation(args)
    return output


@pytest.fixture(scope="module")
def megatron_run(setup, hf_run):
    """Our wrapper on the converted checkpoint, through the CLI, against the HF run as baseline."""
    output = str(setup["root"] / "out_megatron")
    completed = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--model",
            setup["megatron"],
            "--task",
            "short",
            "--short-tasks",
            SHORT_TASKS,
            "--lm-eval-include",
            setup["tasks"],
            "--output-dir",
            output,
            "--save-predictions",
            "--baseline",
            hf_run,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **setup["environment"]},
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output, completed


def test_both_paths_give_the_same_log_likelihoods_text_and_scores(hf_run, megatron_run):
    output, _ = megatron_run
    reference, ours = (
        items(os.path.join(hf_run, "short_samples.jsonl")),
        items(os.path.join(output, "short_samples.jsonl")),
    )
    assert {key[0] for key in reference} == {"harpe_tiny_mc", "harpe_tiny_gen", "harpe_tiny_text"}
    choices = [len(record["responses"]) for key, record in reference.items() if key[0] == "harpe_tiny_mc"]
    assert choices == [4] * 28  # every question's four choices scored
    assert_same_items(reference, ours)
    hf_short = json.loads(open(os.path.join(hf_run, "results.json")).read())["short"]
    megatron_short = json.loads(open(os.path.join(output, "results.json")).read())["short"]
    assert "HFLM" in hf_short["backend"] and "MegatronLM" in megatron_short["backend"]
    for name, cell in hf_short["tasks"].items():
        theirs = megatron_short["tasks"][name]
        assert theirs["score"] == pytest.approx(cell["score"], rel=1e-6), name
        assert (theirs["version"], theirs["num_fewshot"], theirs["samples"]) == (
            cell["version"],
            cell["num_fewshot"],
            cell["samples"],
        )
    assert hf_short["tasks"]["harpe_tiny_mc"]["num_fewshot"] == 2 and hf_short["tasks"]["harpe_tiny_mc"]["stderr"] > 0
    assert hf_short["harness"] == "lm-evaluation-harness 0.4.13"


def test_baseline_adds_a_retention_column_and_the_run_is_quiet(megatron_run):
    output, completed = megatron_run
    short = json.loads(open(os.path.join(output, "results.json")).read())["short"]
    retention = short["retention"]
    assert retention["tasks"]["harpe_tiny_mc"]["retention"] == pytest.approx(100.0)
    assert retention["tasks"]["harpe_tiny_text"]["retention"] == pytest.approx(100.0, rel=1e-5)  # lower is better
    assert short["mean_over"] == ["harpe_tiny_mc", "harpe_tiny_gen"]
    # a random model answers none of the generation items: 0 / 0 has no retention, and is left out of the mean
    assert retention["tasks"]["harpe_tiny_gen"]["retention"] is None and retention["mean_over"] == ["harpe_tiny_mc"]
    table = open(os.path.join(output, "results.md")).read()
    assert "| baseline | retention |" in table and "| harpe_tiny_mc | 2 | acc_norm |" in table
    assert "harpe_tiny_mc (2-shot acc_norm):" in completed.stdout  # printed when the task finished
    # lm-eval's logging, warnings, bars and `git describe` go to the log file, not the terminal
    noise = [
        line
        for line in completed.stderr.splitlines()  # our own progress bar and GPU note are ours
        if line.strip() and not line.startswith(("note: Transformer Engine", "short tasks: "))
    ]
    assert not noise, noise
    assert os.path.getsize(os.path.join(output, "lm_eval.log")) > 0


def _wrapped_items(checkpoint: str, tasks: str, environment: dict[str, str]) -> dict[str, dict]:
    """lm-eval on the checkpoint through MegatronLM and two broken variants of it."""
    os.environ.update(environment)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_harpe.eval.backends import load_backend
    from megatron_harpe.eval.lm_eval_adapter import MegatronLM

    class DroppedBos(MegatronLM):
        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.model_tokenizer.encode(string)

    class ShiftedContinuation(MegatronLM):
        def _continuation_logprob(self, context, continuation):
            import torch

            ids = (context + continuation)[:-1]
            logits = self.backend.logits(ids, last=len(continuation) + 1)[:-1].float()  # one position too early
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(continuation)
            return float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())

    backend = load_backend(checkpoint)
    manager = TaskManager(include_path=tasks)
    found = {}
    for name, cls in (("wrapper", MegatronLM), ("dropped_bos", DroppedBos), ("shifted", ShiftedContinuation)):
        output = lm_eval.simple_evaluate(
            model=cls(backend), tasks=["harpe_tiny_mc"], num_fewshot=2, limit=8, task_manager=manager, verbosity="ERROR"
        )
        found[name] = {
            (s["doc_id"], json.dumps(s["arguments"])): [r[0][0] for r in s["resps"]]
            for s in output["samples"]["harpe_tiny_mc"]
        }
    return found


def test_a_broken_wrapper_does_not_match(setup, hf_run):
    reference = {
        (key[1], key[2]): [pair[0] for pair in responses(record)]
        for key, record in items(os.path.join(hf_run, "short_samples.jsonl")).items()
        if key[0] == "harpe_tiny_mc"
    }
    variants = parallel.run_on_ranks(_wrapped_items, 1, setup["megatron"], setup["tasks"], setup["environment"])[0]

    def largest_gap(found):
        assert len(found) == 8 and found.keys() <= reference.keys()  # the first 8 questions
        return max(abs(a - b) for key in found for a, b in zip(reference[key], found[key], strict=True))

    assert largest_gap(variants["wrapper"]) < TOLERANCE
    assert largest_gap(variants["dropped_bos"]) > 100 * TOLERANCE
    assert largest_gap(variants["shifted"]) > 100 * TOLERANCE


def _sharded_items(checkpoint: str, tasks: str, environment: dict[str, str]) -> dict[str, dict]:
    """lm-eval on the checkpoint through MegatronLM at TP=2 and at CP=2 (two ranks, every rank
    running the harness; lm-eval aggregates on LOCAL_RANK 0)."""
    os.environ.update(environment)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_harpe.eval.backends import load_backend
    from megatron_harpe.eval.lm_eval_adapter import MegatronLM

    manager = TaskManager(include_path=tasks)
    found = {}
    for name, tp, cp in (("tp2", 2, 1), ("cp2", 1, 2)):
        backend = load_backend(checkpoint, tensor_parallel=tp, context_parallel=cp)
        output = lm_eval.simple_evaluate(
            model=MegatronLM(backend),
            tasks=["harpe_tiny_mc", "harpe_tiny_gen"],
            num_fewshot=2,
            limit=4,
            task_manager=manager,
            verbosity="ERROR",
        )
        if output is not None:
            found[name] = {
                (task, s["doc_id"], json.dumps(s["arguments"])): {"responses": s["resps"]}
                for task in ("harpe_tiny_mc", "harpe_tiny_gen")
                for s in output["samples"][task]
            }
    return found


@pytest.mark.slow  # CI time; the megatron wrapper's one-process equality stays
def test_tensor_and_context_parallel_wrappers_give_the_same_items(setup, hf_run):
    reference = items(os.path.join(hf_run, "short_samples.jsonl"))
    found = parallel.run_on_ranks(_sharded_items, 2, setup["megatron"], setup["tasks"], setup["environment"])[0]
    for name in ("tp2", "cp2"):
        sharded = found[name]
        assert len(sharded) == 8 and sharded.keys() <= reference.keys()
        assert_same_items({key: reference[key] for key in sharded}, sharded)
