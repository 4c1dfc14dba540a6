"""The cells of a long-context run, (task, length), built before the first model call.

    from megatron_harpe.eval.cells import plan_cells
    plan = plan_cells(tokenizer, ["ruler"], [4096, 8192], seed=42, qa_files={...})
    plan.unfit        # {("cwe", 1024): "needs at least 1101 tokens"}: fail at once, or skip them

Every retrieval cell (and every needle-grid cell) gets its sample 0 built and sized with the
model's tokenizer before any model is called: a prompt that cannot fit the length (cwe's
in-context example alone is ~960 tokens with a 4k-piece tokenizer) fails the run in seconds
instead of after hours of computed cells. For such a cell `plan_cells` finds the shortest length
that works (a doubling then bisecting search over lengths, building sample 0 each time). The
built samples are reused by the run.

Task names: RULER's 13 ("ruler"): the eight NIAH tasks (each by name, or "niah"), vt, cwe, fwe,
qa_1 and qa_2 (these two need `qa_files`; "ruler" without them skips them and says so);
"passkey", "synthetic_kv", "needle_grid" (single needle over lengths x depths) and "ppl".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from megatron_harpe.eval.backends import Tokenizer
from megatron_harpe.eval.chat import PromptFormat
from megatron_harpe.eval.niah import NIAH_TASKS, build_niah_sample
from megatron_harpe.eval.passkey import PASSKEY_ANSWER_BUDGET, build_passkey_sample
from megatron_harpe.eval.qa import QA_ANSWER_BUDGET, QA_TASKS, build_qa_sample, load_qa_dataset
from megatron_harpe.eval.samples import EvalSample, Fill
from megatron_harpe.eval.synthetic_kv import ANSWER_BUDGET as SYNTHETIC_KV_BUDGET
from megatron_harpe.eval.synthetic_kv import build_synthetic_kv_sample
from megatron_harpe.eval.variable_tracking import VT_ANSWER_BUDGET, build_vt_sample
from megatron_harpe.eval.word_extraction import CWE_ANSWER_BUDGET, FWE_ANSWER_BUDGET, build_cwe_sample, build_fwe_sample

RULER_TASKS = (*NIAH_TASKS, "vt", "cwe", "fwe", *QA_TASKS)
RETRIEVAL_TASKS = (*RULER_TASKS, "passkey")
SYNTHETIC_TASKS = ("synthetic_kv",)  # scored like the retrieval tasks; needs its word-level tokenizer
TASK_GROUPS = {"niah": tuple(NIAH_TASKS), "ruler": RULER_TASKS}
QA_FLAGS = {"qa_1": "--qa-squad", "qa_2": "--qa-hotpot"}
ALL_TASKS = (*RETRIEVAL_TASKS, *SYNTHETIC_TASKS, "needle_grid", "ppl")
GRID_TASK = "niah_single_2"
GRID_ANSWER_BUDGET = 32
DEFAULT_GRID_DEPTHS = tuple(int(d) for d in np.linspace(0, 100, 11))
ANSWER_BUDGETS = {**{task: 128 for task in NIAH_TASKS}, "vt": VT_ANSWER_BUDGET, "cwe": CWE_ANSWER_BUDGET,
                  "fwe": FWE_ANSWER_BUDGET, "qa_1": QA_ANSWER_BUDGET, "qa_2": QA_ANSWER_BUDGET,
                  "passkey": PASSKEY_ANSWER_BUDGET, "synthetic_kv": SYNTHETIC_KV_BUDGET, "needle_grid": GRID_ANSWER_BUDGET}
LONGEST_SEARCHED = 1 << 22


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


def resolve_qa(task_names: list[str], requested: list[str], qa_files: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Drop the QA tasks that have no data file when they came with the "ruler" group (saying
    why); a QA task asked for by name without its file is an error."""
    kept, skipped = [], {}
    for task in task_names:
        if task in QA_TASKS and not qa_files.get(task):
            if task in requested:
                raise ValueError(f"{task} needs its data file: pass {QA_FLAGS[task]} FILE "
                                 f"({QA_TASKS[task]} JSON; nothing is downloaded)")
            skipped[task] = f"no {QA_FLAGS[task]} file given"
            continue
        kept.append(task)
    return kept, skipped


def sample_factory(
    task: str, tokenizer: Tokenizer, seed: int, max_new_tokens: int | None, prose: tuple[str, ...],
    chat: PromptFormat, qa_files: dict[str, str], fill: str = "tight", fixed_depth: int | None = None,
) -> Callable[[int, int], EvalSample]:
    """make(length, index) -> the sample. With RULER's fill, sample 0 of a length sizes every
    other sample of it, so it is built first. `fixed_depth`: a needle-grid cell (GRID_TASK)."""
    rule = Fill(fill)
    budget = max_new_tokens or ANSWER_BUDGETS["needle_grid" if fixed_depth is not None else task]
    build: Callable[[int, int], EvalSample]
    if task == "passkey":
        build = lambda length, index: build_passkey_sample(tokenizer, length, index, seed, budget, chat=chat)  # noqa: E731
    elif task == "synthetic_kv":  # the CPU replication's word-level task (eval/synthetic_kv.py)
        build = lambda length, index: build_synthetic_kv_sample(tokenizer, length, index, seed, answer_budget=budget)  # noqa: E731
    elif task in ("vt", "cwe", "fwe"):
        builder = {"vt": build_vt_sample, "cwe": build_cwe_sample, "fwe": build_fwe_sample}[task]
        build = lambda length, index: builder(tokenizer, length, index, seed, budget, chat=chat, fill=rule)  # noqa: E731
    elif task in QA_TASKS:
        dataset = load_qa_dataset(task, qa_files[task])
        build = lambda length, index: build_qa_sample(task, dataset, tokenizer, length, index, seed, budget,  # noqa: E731
                                                      chat=chat, fill=rule)
    else:
        niah_task = NIAH_TASKS[task]
        build = lambda length, index: build_niah_sample(niah_task, tokenizer, length, index, seed, answer_budget=budget,  # noqa: E731
                                                        prose=prose, fixed_depth=fixed_depth, chat=chat, fill=rule)

    def make(length: int, index: int) -> EvalSample:
        if rule.mode == "ruler" and index and length not in rule.starts:
            build(length, 0)  # RULER's probe sample sizes the cell
        return build(length, index)

    return make


@dataclasses.dataclass
class CellPlan:
    """The cells of a run: `makers[label]` builds a sample (label = task, or needle_grid@depth),
    `first[(label, length)]` is each buildable cell's sample 0, `unfit[(label, length)]` why a
    cell cannot be built and `shortest[(label, length)]` the shortest length that works."""

    makers: dict[str, Callable[[int, int], EvalSample]]
    first: dict[tuple[str, int], EvalSample]
    unfit: dict[tuple[str, int], str]
    shortest: dict[tuple[str, int], int | None]

    def unfit_line(self) -> str:
        """One line naming every cell that cannot be built and the shortest length that works."""
        parts = []
        for (label, length), reason in self.unfit.items():
            shortest = self.shortest.get((label, length))
            fix = f"needs at least {shortest} tokens" if shortest else reason
            parts.append(f"{label} at {length} ({fix})")
        return "cannot build " + "; ".join(parts)


def shortest_length(make: Callable[[int, int], EvalSample], failing: int) -> int | None:
    """The shortest length above `failing` whose sample 0 builds (None if none up to 4M tokens)."""
    def builds(length: int) -> bool:
        try:
            make(length, 0)
            return True
        except ValueError:
            return False

    low, high = failing, max(failing * 2, failing + 1)
    while not builds(high):
        low, high = high, high * 2
        if high > LONGEST_SEARCHED:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if builds(middle) else (middle, high)
    return high


def plan_cells(
    tokenizer: Tokenizer, task_names: list[str], lengths: list[int], seed: int, max_new_tokens: int | None,
    prose: tuple[str, ...], chat: PromptFormat, qa_files: dict[str, str], fill: str = "tight",
    grid_depths: tuple[int, ...] = DEFAULT_GRID_DEPTHS, progress: Callable[[str], None] | None = None,
) -> CellPlan:
    """Build sample 0 of every retrieval and needle-grid cell of `task_names` (already expanded)
    at every length; see the module docstring."""
    plan = CellPlan({}, {}, {}, {})
    for task in task_names:
        if task in RETRIEVAL_TASKS or task in SYNTHETIC_TASKS:
            plan.makers[task] = sample_factory(task, tokenizer, seed, max_new_tokens, prose, chat, qa_files, fill)
        elif task == "needle_grid":
            for depth in grid_depths:
                plan.makers[f"needle_grid@{depth}"] = sample_factory(
                    GRID_TASK, tokenizer, seed, max_new_tokens, prose, chat, qa_files, fill, fixed_depth=depth)
    for label, make in plan.makers.items():
        for length in lengths:
            if progress is not None:
                progress(f"{label} @ {length}")
            try:
                plan.first[(label, length)] = make(length, 0)
            except ValueError as error:
                plan.unfit[(label, length)] = str(error)
    for label, length in plan.unfit:
        plan.shortest[(label, length)] = shortest_length(plan.makers[label], length)
    return plan


def first_sample_or_build(plan: CellPlan, label: str, length: int, index: int) -> EvalSample:
    """Sample `index` of a cell, reusing sample 0 built by the plan."""
    if index == 0 and (label, length) in plan.first:
        return plan.first[(label, length)]
    return plan.makers[label](length, index)


def describe_budgets() -> str:
    """The default answer budgets, for --help."""
    return ("NIAH 128, vt 30, cwe 120, fwe 50, qa 32, passkey and needle_grid 32, synthetic_kv "
            f"{SYNTHETIC_KV_BUDGET}")
