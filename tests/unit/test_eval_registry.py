"""The task registry (eval/tasks/registry.py): every task's builder, budget and metric as registered.

pytest tests/unit/test_eval_registry.py
"""

from __future__ import annotations

import os

import pytest

from megatron_harpe.data.tokenizer import load_tokenizer
from megatron_harpe.eval.backends.hf import HFTokenizer
from megatron_harpe.eval.cells import sample_factory
from megatron_harpe.eval.scoring import METRICS
from megatron_harpe.eval.tasks.chat import PLAIN
from megatron_harpe.eval.tasks.haystack import load_prose_sentences
from megatron_harpe.eval.tasks.registry import (
    ALL_TASKS,
    CELL_TASKS,
    RULER_TASKS,
    TASK_GROUPS,
    TASKS,
    expand_tasks,
    resolve_data_files,
)
from megatron_harpe.eval.tasks.synthetic_kv import write_tokenizer
from megatron_harpe.eval.testing import save_tiny_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
QA_FILES = {"qa_1": os.path.join(DATA, "qa_squad_tiny.json"), "qa_2": os.path.join(DATA, "qa_hotpot_tiny.json")}
LENGTH = 2048


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFTokenizer:
    directory = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    save_tiny_tokenizer(directory)
    return HFTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    return load_tokenizer(str(write_tokenizer(tmp_path_factory.mktemp("kv") / "tokenizer.json")))


def test_the_registry_names_rulers_thirteen_and_every_other_task():
    assert len(RULER_TASKS) == 13 and len(TASK_GROUPS["niah"]) == 8
    assert ALL_TASKS == (*RULER_TASKS, "passkey", "synthetic_kv", "needle_grid", "ppl")
    assert "needle_grid" not in CELL_TASKS and set(CELL_TASKS) == set(TASKS) - {"needle_grid"}
    assert {task: spec.answer_budget for task, spec in TASKS.items() if not task.startswith("niah")} == {
        "vt": 30,
        "cwe": 120,
        "fwe": 50,
        "qa_1": 32,
        "qa_2": 32,
        "passkey": 32,
        "synthetic_kv": 4,
        "needle_grid": 32,
    }
    assert all(TASKS[task].answer_budget == 128 for task in TASK_GROUPS["niah"])
    assert all(spec.metric in METRICS for spec in TASKS.values())
    assert expand_tasks(["niah", "niah_single_1", "ppl"]) == [*TASK_GROUPS["niah"], "ppl"]
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'"):
        expand_tasks(["niah_single_9"])


def test_tasks_that_need_a_data_file_are_skipped_in_a_group_and_refused_by_name():
    kept, skipped = resolve_data_files(expand_tasks(["ruler"]), ["ruler"], {})
    assert kept == [task for task in RULER_TASKS if task not in ("qa_1", "qa_2")]
    assert skipped == {"qa_1": "no --qa-squad file given", "qa_2": "no --qa-hotpot file given"}
    with pytest.raises(ValueError, match="qa_2 needs its data file: pass --qa-hotpot FILE"):
        resolve_data_files(["qa_2"], ["qa_2"], {})


@pytest.mark.parametrize("task", list(TASKS))
def test_each_registered_builder_makes_a_sample_with_its_budget_and_metric(request, task):
    spec = TASKS[task]
    tokenizer = request.getfixturevalue("word_tokenizer" if task == "synthetic_kv" else "tokenizer")
    depth = 50 if spec.grid else None
    make = sample_factory(
        task,
        tokenizer,
        seed=3,
        max_new_tokens=None,
        prose=load_prose_sentences(None),
        chat=PLAIN,
        qa_files=QA_FILES,
        fixed_depth=depth,
    )
    sample = make(LENGTH, 1)
    assert (sample.answer_budget, sample.metric) == (spec.answer_budget, spec.metric)
    assert (sample.length, sample.index) == (LENGTH, 1)
    assert sample.answers and sample.prompt_tokens + spec.answer_budget <= LENGTH
    if spec.grid:
        assert sample.depths == [depth]
    shorter = sample_factory(task, tokenizer, 3, 8, load_prose_sentences(None), PLAIN, QA_FILES, fixed_depth=depth)
    assert shorter(LENGTH, 1).answer_budget == 8  # --max-new-tokens replaces the registered budget
