"""Every long-context evaluation task by name: its sample builder, answer budget and metric.

    from megatron_harpe.eval.tasks.registry import TASKS, expand_tasks
    expand_tasks(["niah", "vt"])          # ["niah_single_1", ..., "niah_multiquery", "vt"]
    spec = TASKS["vt"]                    # TaskSpec: builder, answer_budget 30, metric "all", in "ruler"
    make = spec.builder(TaskSetting(tokenizer, seed=42, answer_budget=spec.answer_budget))
    sample = make(4096, 0)                # an EvalSample: prompt ids, expected answers, depths

Adding a task: write its module in this package with a `sample_builder(setting: TaskSetting)`
returning make(length, index) -> EvalSample (see passkey.py for a short one), and register it
below with its answer budget (tokens generated after the prompt, and kept free of it) and its
metric (a key of scoring.METRICS). Everything else (cell planning, scoring by generation or
teacher forcing, intervals, reports, resume) works from the registration.

Groups: "ruler" (RULER's 13 tasks, the headline average) and "niah" (its eight NIAH tasks).
"needle_grid" is scored over lengths x depths (`grid`): single needles of GRID_TASK at fixed
depths. "ppl" is not here: perplexity is computed from documents, not from samples (eval/perplexity.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from megatron_harpe.eval.tasks import niah, passkey, qa, synthetic_kv, variable_tracking, word_extraction
from megatron_harpe.eval.tasks.samples import SampleBuilder, TaskSetting

GRID_TASK = "niah_single_2"
GRID_ANSWER_BUDGET = 32
PERPLEXITY_TASK = "ppl"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: `builder(setting)` returns its make(length, index) -> EvalSample."""

    name: str
    builder: Callable[[TaskSetting], SampleBuilder]
    answer_budget: int
    metric: str  # scoring.METRICS: "all" (string_match_all) or "part" (string_match_part)
    groups: tuple[str, ...] = ()
    data_flag: str | None = None  # tools/evaluate.py's flag for the data file the task needs
    data_format: str | None = None  # what that file holds, for the error naming it
    grid: bool = False  # scored over lengths x depths instead of per length


def _niah(name: str) -> TaskSpec:
    return TaskSpec(
        name, functools.partial(niah.sample_builder, name), niah.NIAH_ANSWER_BUDGET, "all", groups=("ruler", "niah")
    )


def _register(*specs: TaskSpec) -> dict[str, TaskSpec]:
    registry: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.name in registry or spec.name == PERPLEXITY_TASK:
            raise ValueError(f"task {spec.name!r} is registered twice")
        registry[spec.name] = spec
    return registry


TASKS: dict[str, TaskSpec] = _register(
    *(_niah(name) for name in niah.NIAH_TASKS),
    TaskSpec("vt", variable_tracking.sample_builder, variable_tracking.VT_ANSWER_BUDGET, "all", groups=("ruler",)),
    TaskSpec("cwe", word_extraction.cwe_sample_builder, word_extraction.CWE_ANSWER_BUDGET, "all", groups=("ruler",)),
    TaskSpec("fwe", word_extraction.fwe_sample_builder, word_extraction.FWE_ANSWER_BUDGET, "all", groups=("ruler",)),
    TaskSpec(
        "qa_1",
        functools.partial(qa.sample_builder, "qa_1"),
        qa.QA_ANSWER_BUDGET,
        "part",
        groups=("ruler",),
        data_flag="--qa-squad",
        data_format=qa.QA_TASKS["qa_1"],
    ),
    TaskSpec(
        "qa_2",
        functools.partial(qa.sample_builder, "qa_2"),
        qa.QA_ANSWER_BUDGET,
        "part",
        groups=("ruler",),
        data_flag="--qa-hotpot",
        data_format=qa.QA_TASKS["qa_2"],
    ),
    TaskSpec("passkey", passkey.sample_builder, passkey.PASSKEY_ANSWER_BUDGET, "all"),
    # the CPU replication's word-level key/value task: needs its own tokenizer (synthetic_kv.write_tokenizer)
    TaskSpec("synthetic_kv", synthetic_kv.sample_builder, synthetic_kv.ANSWER_BUDGET, "all"),
    TaskSpec("needle_grid", functools.partial(niah.sample_builder, GRID_TASK), GRID_ANSWER_BUDGET, "all", grid=True),
)


def group(name: str) -> tuple[str, ...]:
    return tuple(task for task, spec in TASKS.items() if name in spec.groups)


RULER_TASKS = group("ruler")
TASK_GROUPS = {"niah": group("niah"), "ruler": RULER_TASKS}
CELL_TASKS = tuple(task for task, spec in TASKS.items() if not spec.grid)
"""The tasks scored per (task, length) cell; their scores make the headline average."""
ALL_TASKS = (*TASKS, PERPLEXITY_TASK)


def expand_tasks(names: list[str]) -> list[str]:
    """Resolve group names ("niah") and check every name; keeps order, drops repeats."""
    resolved: list[str] = []
    for name in names:
        members = TASK_GROUPS.get(name, (name,))
        for member in members:
            if member not in ALL_TASKS:
                raise ValueError(f"unknown task {member!r}: choose from {', '.join((*TASK_GROUPS, *ALL_TASKS))}")
            if member not in resolved:
                resolved.append(member)
    return resolved


def resolve_data_files(
    task_names: list[str], requested: list[str], data_files: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Drop the tasks that need a data file without one when they came with a group ("ruler"),
    saying why; such a task asked for by name without its file is an error."""
    kept, skipped = [], {}
    for task in task_names:
        spec = TASKS.get(task)
        if spec is not None and spec.data_flag and not data_files.get(task):
            if task in requested:
                raise ValueError(
                    f"{task} needs its data file: pass {spec.data_flag} FILE "
                    f"({spec.data_format} JSON; nothing is downloaded)"
                )
            skipped[task] = f"no {spec.data_flag} file given"
            continue
        kept.append(task)
    return kept, skipped
