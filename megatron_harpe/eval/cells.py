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

Task names and their sample builders: tasks/registry.py (RULER's 13 "ruler": the eight NIAH
tasks, each by name or "niah", vt, cwe, fwe, qa_1 and qa_2, which need `qa_files`; "passkey",
"synthetic_kv", "needle_grid" (single needle over lengths x depths) and "ppl").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from megatron_harpe.eval.backends.base import Tokenizer
from megatron_harpe.eval.tasks.chat import PromptFormat
from megatron_harpe.eval.tasks.registry import GRID_TASK, TASKS
from megatron_harpe.eval.tasks.samples import EvalSample, Fill, SampleBuilder, TaskSetting

DEFAULT_GRID_DEPTHS = tuple(int(d) for d in np.linspace(0, 100, 11))
LONGEST_SEARCHED = 1 << 22


def sample_factory(
    task: str,
    tokenizer: Tokenizer,
    seed: int,
    max_new_tokens: int | None,
    prose: tuple[str, ...],
    chat: PromptFormat,
    qa_files: dict[str, str],
    fill: str = "tight",
    fixed_depth: int | None = None,
) -> SampleBuilder:
    """make(length, index) -> the sample, from the task's registered builder. With RULER's fill,
    sample 0 of a length sizes every other sample of it, so it is built first. `fixed_depth`: a
    needle-grid cell (registry.GRID_TASK at that depth)."""
    spec = TASKS["needle_grid" if fixed_depth is not None else task]
    rule = Fill(fill)
    setting = TaskSetting(
        tokenizer,
        seed,
        max_new_tokens or spec.answer_budget,
        chat=chat,
        fill=rule,
        prose=prose,
        data_file=qa_files.get(task),
        fixed_depth=fixed_depth,
    )
    build = spec.builder(setting)

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

    makers: dict[str, SampleBuilder]
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


def shortest_length(make: SampleBuilder, failing: int) -> int | None:
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
    tokenizer: Tokenizer,
    task_names: list[str],
    lengths: list[int],
    seed: int,
    max_new_tokens: int | None,
    prose: tuple[str, ...],
    chat: PromptFormat,
    qa_files: dict[str, str],
    fill: str = "tight",
    grid_depths: tuple[int, ...] = DEFAULT_GRID_DEPTHS,
    progress: Callable[[str], None] | None = None,
) -> CellPlan:
    """Build sample 0 of every retrieval and needle-grid cell of `task_names` (already expanded)
    at every length; see the module docstring."""
    plan = CellPlan({}, {}, {}, {})
    for task in task_names:
        spec = TASKS.get(task)
        if spec is None:  # ppl: scored from documents
            continue
        if not spec.grid:
            plan.makers[task] = sample_factory(task, tokenizer, seed, max_new_tokens, prose, chat, qa_files, fill)
        else:
            for depth in grid_depths:
                plan.makers[f"needle_grid@{depth}"] = sample_factory(
                    GRID_TASK, tokenizer, seed, max_new_tokens, prose, chat, qa_files, fill, fixed_depth=depth
                )
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
    budget = {task: spec.answer_budget for task, spec in TASKS.items()}
    return (
        f"NIAH {budget[GRID_TASK]}, vt {budget['vt']}, cwe {budget['cwe']}, fwe {budget['fwe']}, "
        f"qa {budget['qa_1']}, passkey and needle_grid {budget['passkey']}, synthetic_kv {budget['synthetic_kv']}"
    )
