"""Run a set of evaluation tasks at a set of lengths against one backend; the one entry point
shared by `tools/evaluate.py` and evaluation during training.

    from megatron_harpe.eval.suite import prepare_suite, run_eval_suite, scalars_for_logging
    setup = prepare_suite(tokenizer, ["ruler"], [4096, 8192], samples=10)   # before the model loads
    results = run_eval_suite(backend, setup=setup)
    writer.add_scalars(scalars_for_logging(results))   # {"eval/niah_single_1/4096": 100.0, ...}

Tasks (tasks/registry.py): RULER's 13 ("ruler"), the eight NIAH tasks ("niah"), vt, cwe, fwe, qa_1 and
qa_2 (these two need `qa_files`, the user's SQuAD / HotpotQA JSON; "ruler" without them skips
them and says so); "passkey", "synthetic_kv" (the CPU replication's word-level key/value task),
"needle_grid" (single needle over lengths x depths) and "ppl" (needs `ppl_documents`).

`prepare_suite` builds sample 0 of every (task, length) cell with the tokenizer alone, so a cell
that cannot fit fails at once (a ValueError naming every such cell and the shortest length that
works), or, with `skip_unfit`, is skipped and marked ("unfit_cells"). `run_eval_suite` then
scores the cells one by one: with a `store` (run_store.py) every sample is kept as it is scored
and an earlier run's samples are reused; `on_cell(results)` sees the results after each cell
(the tool rewrites results.json / results.md there) and `announce` prints each cell's score.

Scores are 0..100: mean over samples per task and length, with its 95% Wilson interval;
`per_length` = mean over the RULER tasks run (passkey and synthetic_kv are averaged only when
run alone), `overall` = mean over lengths, and `mean_label` names that average exactly
("RULER-13 mean", "NIAH-8 mean", ...; the paper's headline is the NIAH-8 mean). `provenance`
records versions, tokenizer, prompt template, fill, RULER version and haystack hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from typing import Any, Callable

from tqdm import tqdm

from megatron_harpe import cli
from megatron_harpe.eval.backends.base import ModelBackend, Tokenizer
from megatron_harpe.eval.cells import DEFAULT_GRID_DEPTHS, CellPlan, first_sample_or_build, plan_cells
from megatron_harpe.eval.perplexity import DEFAULT_STRIDE, perplexity_by_length
from megatron_harpe.eval.provenance import run_provenance, tokenizer_info
from megatron_harpe.eval.scoring import METRICS, mean, wilson_interval
from megatron_harpe.eval.tasks.chat import PromptFormat, resolve_prompt_format
from megatron_harpe.eval.tasks.haystack import load_prose_sentences
from megatron_harpe.eval.tasks.registry import (
    CELL_TASKS,
    GRID_TASK,
    RULER_TASKS,
    TASK_GROUPS,
    expand_tasks,
    resolve_data_files,
)
from megatron_harpe.eval.tasks.ruler_rules import RULER_VERSION
from megatron_harpe.eval.tasks.samples import FILL_MODES, EvalSample
from megatron_harpe.eval.teacher_forcing import teacher_forced_sample_score

SCORING_METHODS = ("auto", "generate", "teacher_forcing")
DEFAULT_SAMPLES = 100  # the CLI's: a 95% Wilson interval within +-10 points at any score


def resolve_scoring(backend: ModelBackend, scoring: str) -> str:
    if scoring not in SCORING_METHODS:
        raise ValueError(f"unknown scoring {scoring!r}: choose from {', '.join(SCORING_METHODS)}")
    if scoring == "auto":
        return "generate" if backend.supports_generation else "teacher_forcing"
    if scoring == "generate" and not backend.supports_generation:
        raise ValueError(f"backend {backend.name} cannot generate: use --scoring teacher_forcing")
    return scoring


def decode_output(backend: ModelBackend, ids: list[int]) -> str:
    """Text of model output ids. Ids beyond the tokenizer (a model vocabulary padded for
    tensor parallelism) spell nothing and are dropped instead of crashing the decoder."""
    vocab_size = backend.tokenizer.vocab_size
    return backend.tokenizer.decode([token for token in ids if 0 <= token < vocab_size])


def score_sample(backend: ModelBackend, sample: EvalSample, method: str) -> tuple[float, str]:
    """(score 0..100, what the model answered) for one sample, by the sample's RULER metric."""
    if method == "generate":
        output = decode_output(backend, backend.generate(sample.prompt_ids, max_new_tokens=sample.answer_budget))
        return METRICS[sample.metric](output.strip(), sample.answers), output
    score, predictions = teacher_forced_sample_score(backend, sample)
    return score, decode_output(backend, predictions)


def mean_label(averaged: list[str], skipped: dict[str, str]) -> str:
    """The name of the headline average: "RULER-13 mean", "NIAH-8 mean", or what it covers."""
    if set(averaged) == set(RULER_TASKS):
        return "RULER-13 mean"
    if set(averaged) == set(TASK_GROUPS["niah"]):
        return "NIAH-8 mean"
    if set(averaged) == set(RULER_TASKS) - set(skipped):
        return f"RULER mean of {len(averaged)} tasks ({', '.join(skipped)} skipped: not RULER-13)"
    return f"mean of {len(averaged)} tasks ({', '.join(averaged)})"


@dataclasses.dataclass
class SuiteSetup:
    """Everything a run decides before the model loads (`prepare_suite`)."""

    requested: list[str]
    task_names: list[str]
    skipped: dict[str, str]
    lengths: list[int]
    samples: int
    seed: int
    max_new_tokens: int | None
    haystack_file: str | None
    grid_depths: tuple[int, ...]
    chat: PromptFormat
    qa_files: dict[str, str]
    fill: str
    plan: CellPlan
    skip_unfit: bool

    @property
    def retrieval(self) -> list[str]:
        return [task for task in self.task_names if task in CELL_TASKS]

    def settings(self, tokenizer: Tokenizer, model: str, scoring: str, self_extend: dict | None) -> dict[str, Any]:
        """What decides every sample's prompt and score (a resumed run must match it)."""
        return {
            "model": model,
            "tokenizer": tokenizer_info(tokenizer),
            "seed": self.seed,
            "scoring": scoring,
            "max_new_tokens": self.max_new_tokens,
            "prompt": self.chat.info,
            "fill": self.fill,
            "ruler_version": RULER_VERSION["commit"],
            "self_extend": self_extend,
            "haystack": run_provenance(tokenizer, self.chat, self.haystack_file)["haystack"]["sha256"],
            "qa_files": {task: _file_sha256(path) for task, path in sorted(self.qa_files.items())},
        }


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_suite(
    tokenizer: Tokenizer,
    tasks: list[str],
    lengths: list[int],
    samples: int = 10,
    seed: int = 42,
    max_new_tokens: int | None = None,
    haystack_file: str | None = None,
    grid_depths: tuple[int, ...] = DEFAULT_GRID_DEPTHS,
    chat_template: str = "none",
    qa_files: dict[str, str] | None = None,
    fill: str = "tight",
    skip_unfit: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SuiteSetup:
    """Check the options and build sample 0 of every cell (see the module docstring)."""
    qa_files = qa_files or {}
    task_names, skipped = resolve_data_files(expand_tasks(tasks), tasks, qa_files)
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if fill not in FILL_MODES:
        raise ValueError(f"unknown fill {fill!r}: choose {' or '.join(FILL_MODES)}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    prose = load_prose_sentences(haystack_file)
    chat = resolve_prompt_format(tokenizer, chat_template)
    plan = plan_cells(
        tokenizer,
        task_names,
        list(lengths),
        seed,
        max_new_tokens,
        prose,
        chat,
        qa_files,
        fill,
        tuple(grid_depths),
        progress,
    )
    if plan.unfit and not skip_unfit:
        raise ValueError(
            plan.unfit_line() + ": evaluate at longer --lengths, drop those tasks, or pass --skip-unfit "
            "to skip such cells"
        )
    return SuiteSetup(
        list(tasks),
        task_names,
        skipped,
        list(lengths),
        samples,
        seed,
        max_new_tokens,
        haystack_file,
        tuple(grid_depths),
        chat,
        qa_files,
        fill,
        plan,
        skip_unfit,
    )


def _cell_result(scores: list[float], prompt_tokens: list[float], method: str) -> dict[str, Any]:
    low, high = wilson_interval(scores)
    return {
        "score": mean(scores),
        "interval": [round(low, 2), round(high, 2)],
        "interval_method": "wilson95",
        "scores": scores,
        "samples": len(scores),
        "method": method,
        "prompt_tokens_mean": mean([float(t) for t in prompt_tokens]),
    }


def summarize_retrieval(
    results: dict[str, Any], retrieval: list[str], lengths: list[int], skipped: dict[str, str]
) -> None:
    """The headline of the cells computed so far: `per_length` (mean over the averaged tasks that
    have the cell) and `overall` (mean over the lengths that have one)."""
    averaged = [task for task in retrieval if task in RULER_TASKS] or retrieval
    results["mean_over"] = averaged
    results["mean_label"] = mean_label(averaged, skipped)
    per_length = {}
    for length in lengths:
        cells = [results["tasks"].get(task, {}).get(str(length)) for task in averaged]
        scores = [cell["score"] for cell in cells if cell is not None]
        if scores:
            per_length[str(length)] = mean(scores)
    results["per_length"] = per_length
    results["overall"] = mean(list(per_length.values())) if per_length else None


def run_eval_suite(
    backend: ModelBackend,
    tasks: list[str] | None = None,
    lengths: list[int] | None = None,
    samples: int = 10,
    seed: int = 42,
    scoring: str = "auto",
    max_new_tokens: int | None = None,
    haystack_file: str | None = None,
    grid_depths: tuple[int, ...] = DEFAULT_GRID_DEPTHS,
    ppl_documents: list[list[int]] | None = None,
    ppl_stride: int = DEFAULT_STRIDE,
    ppl_document_tokens: int | None = None,
    keep_records: bool = False,
    progress: bool = True,
    chat_template: str = "none",
    qa_files: dict[str, str] | None = None,
    fill: str = "tight",
    skip_unfit: bool = False,
    setup: SuiteSetup | None = None,
    store: Any = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate `backend`; returns a JSON-ready dict (lengths as string keys). See module doc.
    Without `setup`, it is prepared here from the task options (before any model call).
    `chat_template`: "none" (base models, the default for checkpoints in training), "auto",
    "ruler[:NAME]" or a Jinja file (tasks/chat.py). `qa_files`: {"qa_1": SQuAD JSON, "qa_2": HotpotQA JSON}.
    `store`: a run_store.RunStore keeping (and resuming) every scored sample."""
    if setup is None:
        if tasks is None or lengths is None:
            raise ValueError("run_eval_suite needs tasks and lengths, or a prepared setup")
        setup = prepare_suite(
            backend.tokenizer,
            tasks,
            lengths,
            samples,
            seed,
            max_new_tokens,
            haystack_file,
            grid_depths,
            chat_template,
            qa_files,
            fill,
            skip_unfit,
        )
    task_names, lengths, samples = setup.task_names, setup.lengths, setup.samples
    if "ppl" in task_names and not ppl_documents:
        raise ValueError("the ppl task needs documents: pass --ppl-data (jsonl, txt or Megatron prefix)")
    method = resolve_scoring(backend, scoring)
    started = time.time()
    results: dict[str, Any] = {
        "model": backend.name,
        "seed": setup.seed,
        "samples": samples,
        "lengths": list(lengths),
        "scoring": method,
        "fill": setup.fill,
        "ruler_version": dict(RULER_VERSION),
        "provenance": run_provenance(backend.tokenizer, setup.chat, setup.haystack_file),
        "tasks": {},
        "complete": False,
    }
    if getattr(backend, "self_extend", None) is not None:  # evaluation-time grouped attention
        results["self_extend"] = backend.self_extend.as_dict()
    if setup.skipped:
        results["skipped"] = setup.skipped
        note = (
            f"note: {', '.join(setup.skipped)} skipped ({'; '.join(setup.skipped.values())}): the headline is "
            "not RULER-13"
        )
        if progress or (announce is not None and cli.is_rank_zero()):  # said with or without a progress bar
            print(note, file=sys.stderr)
    plan = setup.plan
    if plan.unfit:
        results["unfit_cells"] = {}
        for (label, length), reason in plan.unfit.items():
            shortest = plan.shortest.get((label, length))
            results["unfit_cells"].setdefault(label, {})[str(length)] = (
                f"needs at least {shortest} tokens" if shortest else reason
            )
    records: list[dict[str, Any]] = []
    retrieval = setup.retrieval
    labels = list(retrieval) + (
        [f"needle_grid@{depth}" for depth in setup.grid_depths] if "needle_grid" in task_names else []
    )
    cells = [(label, length) for label in labels for length in lengths if (label, length) not in plan.unfit]
    bar = tqdm(total=len(cells) * samples, desc="eval", disable=not progress)

    def run_cell(label: str, length: int) -> dict[str, Any]:
        scores, prompt_tokens, reused, began = [], [], 0, time.time()
        for index in range(samples):
            record = store.get(label, length, index) if store is not None else None
            if record is None:
                sample: EvalSample = first_sample_or_build(plan, label, length, index)
                score, output = score_sample(backend, sample, method)
                record = {
                    "task": label,
                    "length": length,
                    "index": index,
                    "depths": sample.depths,
                    "prompt_tokens": sample.prompt_tokens,
                    "answers": sample.answers,
                    "output": output,
                    "score": score,
                }
                if store is not None:
                    store.add(record)
            else:
                reused += 1
            scores.append(float(record["score"]))
            prompt_tokens.append(float(record["prompt_tokens"]))
            if keep_records:
                records.append(record)
            bar.set_postfix_str(f"{label} @ {length}")
            bar.update()
        cell = _cell_result(scores, prompt_tokens, method)
        if announce is not None:
            low, high = cell["interval"]
            note = f", {reused} from the earlier run" if reused else ""
            announce(
                f"{label} @ {length}: {cell['score']:.1f} [{low:.0f}, {high:.0f}] "
                f"({samples} samples{note}, {time.time() - began:.0f} s)"
            )
        return cell

    for label, length in cells:
        cell = run_cell(label, length)
        if label.startswith("needle_grid@"):
            results.setdefault("needle_grid_cells", {}).setdefault(label, {})[str(length)] = cell
        else:
            results["tasks"].setdefault(label, {})[str(length)] = cell
            summarize_retrieval(results, retrieval, lengths, setup.skipped)
        if on_cell is not None:
            on_cell(results)
    bar.close()
    if retrieval:
        summarize_retrieval(results, retrieval, lengths, setup.skipped)
    if "needle_grid" in task_names:
        grid = results.pop("needle_grid_cells", {})
        scores = [
            [grid.get(f"needle_grid@{d}", {}).get(str(n), {}).get("score") for n in lengths] for d in setup.grid_depths
        ]
        intervals = [
            [grid.get(f"needle_grid@{d}", {}).get(str(n), {}).get("interval") for n in lengths]
            for d in setup.grid_depths
        ]
        results["needle_grid"] = {
            "task": GRID_TASK,
            "depths": list(setup.grid_depths),
            "lengths": list(lengths),
            "scores": scores,
            "intervals": intervals,
            "method": method,
        }
    if "ppl" in task_names:
        assert ppl_documents is not None
        by_length = perplexity_by_length(backend, ppl_documents, lengths, ppl_stride, ppl_document_tokens, progress)
        results["perplexity"] = {str(length): value for length, value in by_length.items()}
    if keep_records:
        results["records"] = records
    results["seconds"] = round(time.time() - started, 2)
    results["complete"] = True
    return results


def scalars_for_logging(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flat {name: value} of the headline numbers, for TensorBoard next to the training scalars."""
    scalars: dict[str, float] = {}
    for task, by_length in results.get("tasks", {}).items():
        for length, cell in by_length.items():
            scalars[f"{prefix}/{task}/{length}"] = float(cell["score"])
    for length, score in results.get("per_length", {}).items():
        scalars[f"{prefix}/retrieval_mean/{length}"] = float(score)
    if results.get("overall") is not None:
        scalars[f"{prefix}/retrieval_mean/overall"] = float(results["overall"])
    for length, value in results.get("perplexity", {}).items():
        if value["ppl"] is not None:
            scalars[f"{prefix}/ppl/{length}"] = float(value["ppl"])
    return scalars


def parse_token_counts(text: str) -> list[int]:
    """'4096,8192' or '4k,8k' (k = 1024) -> [4096, 8192]; an argparse `type` for the CLIs."""
    import argparse

    values = []
    for part in (piece.strip().lower() for piece in text.split(",")):
        if not part:
            continue
        try:
            values.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected token counts like 4096,8192 or 4k,8k, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values
