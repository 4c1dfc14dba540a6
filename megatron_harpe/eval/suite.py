"""Run a set of evaluation tasks at a set of lengths against one backend; the one entry point
shared by `tools/evaluate.py` and evaluation during training.

    from megatron_harpe.eval.suite import run_eval_suite, scalars_for_logging
    results = run_eval_suite(backend, ["niah", "passkey"], [4096, 8192], samples=10, seed=42)
    writer.add_scalars(scalars_for_logging(results))   # {"eval/niah_single_1/4096": 100.0, ...}

Tasks: RULER's 13 (all as "ruler"): the eight NIAH tasks (each by name, or all as "niah"), vt,
cwe, fwe, qa_1 and qa_2 (these two need `qa_files`, the user's SQuAD / HotpotQA JSON; "ruler"
without them skips them and says so); "passkey", "synthetic_kv" (word-level key/value retrieval
of the CPU replication, see synthetic_kv.py), "needle_grid" (single needle over lengths x
depths) and "ppl" (needs `ppl_documents`). Scores are 0..100: mean over samples per task and
length, with its 95% Wilson interval; `per_length` = mean over the RULER tasks run (passkey and
synthetic_kv are averaged only when run alone), `overall` = mean over lengths, and `mean_label`
names that average exactly ("RULER-13 mean", "NIAH-8 mean", ...; the paper's headline is the
NIAH-8 mean). `provenance` records versions, tokenizer, prompt template and haystack hash.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from megatron_harpe.eval.backends import ModelBackend
from megatron_harpe.eval.chat import PromptFormat, resolve_prompt_format
from megatron_harpe.eval.haystack import load_prose_sentences
from megatron_harpe.eval.niah import NIAH_TASKS, build_niah_sample
from megatron_harpe.eval.passkey import PASSKEY_ANSWER_BUDGET, build_passkey_sample
from megatron_harpe.eval.perplexity import DEFAULT_STRIDE, perplexity_by_length
from megatron_harpe.eval.provenance import run_provenance
from megatron_harpe.eval.qa import QA_ANSWER_BUDGET, QA_TASKS, build_qa_sample, load_qa_dataset
from megatron_harpe.eval.samples import EvalSample
from megatron_harpe.eval.scoring import METRICS, mean, wilson_interval
from megatron_harpe.eval.synthetic_kv import ANSWER_BUDGET as SYNTHETIC_KV_BUDGET
from megatron_harpe.eval.synthetic_kv import build_synthetic_kv_sample
from megatron_harpe.eval.teacher_forcing import teacher_forced_sample_score
from megatron_harpe.eval.variable_tracking import VT_ANSWER_BUDGET, build_vt_sample
from megatron_harpe.eval.word_extraction import CWE_ANSWER_BUDGET, FWE_ANSWER_BUDGET, build_cwe_sample, build_fwe_sample

RULER_TASKS = (*NIAH_TASKS, "vt", "cwe", "fwe", *QA_TASKS)
RETRIEVAL_TASKS = (*RULER_TASKS, "passkey")
SYNTHETIC_TASKS = ("synthetic_kv",)  # scored like the retrieval tasks; needs its word-level tokenizer
TASK_GROUPS = {"niah": tuple(NIAH_TASKS), "ruler": RULER_TASKS}
QA_FLAGS = {"qa_1": "--qa-squad", "qa_2": "--qa-hotpot"}
ALL_TASKS = (*RETRIEVAL_TASKS, *SYNTHETIC_TASKS, "needle_grid", "ppl")
SCORING_METHODS = ("auto", "generate", "teacher_forcing")
DEFAULT_SAMPLES = 100  # the CLI's: a 95% Wilson interval within +-10 points at any score
GRID_TASK = "niah_single_2"
GRID_ANSWER_BUDGET = 32
DEFAULT_GRID_DEPTHS = tuple(int(d) for d in np.linspace(0, 100, 11))


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


def _sample_factory(
    task: str, backend: ModelBackend, seed: int, max_new_tokens: int | None, prose: tuple[str, ...],
    chat: PromptFormat, qa_files: dict[str, str],
) -> Callable[[int, int], EvalSample]:
    tokenizer = backend.tokenizer
    if task == "passkey":
        budget = max_new_tokens or PASSKEY_ANSWER_BUDGET
        return lambda length, index: build_passkey_sample(tokenizer, length, index, seed, budget, chat=chat)
    if task == "synthetic_kv":  # the CPU replication's word-level task (eval/synthetic_kv.py)
        kv_budget = max_new_tokens or SYNTHETIC_KV_BUDGET
        return lambda length, index: build_synthetic_kv_sample(tokenizer, length, index, seed, answer_budget=kv_budget)
    builders = {"vt": (build_vt_sample, VT_ANSWER_BUDGET), "cwe": (build_cwe_sample, CWE_ANSWER_BUDGET),
                "fwe": (build_fwe_sample, FWE_ANSWER_BUDGET)}
    if task in builders:
        build, default_budget = builders[task]
        budget = max_new_tokens or default_budget
        return lambda length, index: build(tokenizer, length, index, seed, budget, chat=chat)
    if task in QA_TASKS:
        dataset = load_qa_dataset(task, qa_files[task])
        budget = max_new_tokens or QA_ANSWER_BUDGET
        return lambda length, index: build_qa_sample(task, dataset, tokenizer, length, index, seed, budget, chat=chat)
    niah_task = NIAH_TASKS[task]
    kwargs: dict[str, Any] = {"prose": prose, "chat": chat}
    if max_new_tokens:
        kwargs["answer_budget"] = max_new_tokens
    return lambda length, index: build_niah_sample(niah_task, tokenizer, length, index, seed, **kwargs)


def mean_label(averaged: list[str], skipped: dict[str, str]) -> str:
    """The name of the headline average: "RULER-13 mean", "NIAH-8 mean", or what it covers."""
    if set(averaged) == set(RULER_TASKS):
        return "RULER-13 mean"
    if set(averaged) == set(NIAH_TASKS):
        return "NIAH-8 mean"
    if set(averaged) == set(RULER_TASKS) - set(skipped):
        return f"RULER mean of {len(averaged)} tasks ({', '.join(skipped)} skipped: not RULER-13)"
    return f"mean of {len(averaged)} tasks ({', '.join(averaged)})"


def _resolve_qa(task_names: list[str], requested: list[str], qa_files: dict[str, str]) -> tuple[list[str], dict[str, str]]:
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


def run_eval_suite(
    backend: ModelBackend,
    tasks: list[str],
    lengths: list[int],
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
) -> dict[str, Any]:
    """Evaluate `backend`; returns a JSON-ready dict (lengths as string keys). See module doc.
    `chat_template`: "none" (base models, the default for checkpoints in training), "auto" or
    a Jinja file (chat.py). `qa_files`: {"qa_1": SQuAD JSON, "qa_2": HotpotQA JSON}."""
    qa_files = qa_files or {}
    task_names, skipped = _resolve_qa(expand_tasks(tasks), tasks, qa_files)
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if "ppl" in task_names and not ppl_documents:
        raise ValueError("the ppl task needs documents: pass --ppl-data (jsonl, txt or Megatron prefix)")
    method = resolve_scoring(backend, scoring)
    prose = load_prose_sentences(haystack_file)
    chat = resolve_prompt_format(backend.tokenizer, chat_template)
    started = time.time()
    results: dict[str, Any] = {
        "model": backend.name, "seed": seed, "samples": samples, "lengths": list(lengths),
        "scoring": method, "provenance": run_provenance(backend.tokenizer, chat, haystack_file), "tasks": {},
    }
    if getattr(backend, "self_extend", None) is not None:  # evaluation-time grouped attention
        results["self_extend"] = backend.self_extend.as_dict()
    if skipped:
        results["skipped"] = skipped
        if progress:
            print(f"note: {', '.join(skipped)} skipped ({'; '.join(skipped.values())}): the headline is not "
                  "RULER-13", file=sys.stderr)
    records: list[dict[str, Any]] = []
    retrieval = [task for task in task_names if task in RETRIEVAL_TASKS or task in SYNTHETIC_TASKS]
    grid_cells = len(grid_depths) * len(lengths) if "needle_grid" in task_names else 0
    bar = tqdm(total=(len(retrieval) * len(lengths) + grid_cells) * samples, desc="eval", disable=not progress)

    def run_cell(task_label: str, make: Callable[[int, int], EvalSample], length: int) -> dict[str, Any]:
        scores, prompt_tokens = [], []
        for index in range(samples):
            sample = make(length, index)
            score, output = score_sample(backend, sample, method)
            scores.append(score)
            prompt_tokens.append(sample.prompt_tokens)
            if keep_records:
                records.append({"task": task_label, "length": length, "index": index, "depths": sample.depths,
                                "prompt_tokens": sample.prompt_tokens, "answers": sample.answers,
                                "output": output, "score": score})
            bar.set_postfix_str(f"{task_label} @ {length}")
            bar.update()
        low, high = wilson_interval(scores)
        return {"score": mean(scores), "interval": [round(low, 2), round(high, 2)], "interval_method": "wilson95",
                "scores": scores, "samples": samples, "method": method,
                "prompt_tokens_mean": mean([float(t) for t in prompt_tokens])}

    for task in retrieval:
        make = _sample_factory(task, backend, seed, max_new_tokens, prose, chat, qa_files)
        results["tasks"][task] = {str(length): run_cell(task, make, length) for length in lengths}
    if retrieval:
        # the headline averages the RULER tasks; passkey joins the mean only when run alone
        averaged = [task for task in retrieval if task in RULER_TASKS] or retrieval
        results["mean_over"] = averaged
        results["mean_label"] = mean_label(averaged, skipped)
        results["per_length"] = {
            str(length): mean([results["tasks"][task][str(length)]["score"] for task in averaged])
            for length in lengths
        }
        results["overall"] = mean(list(results["per_length"].values()))
    if "needle_grid" in task_names:
        grid_scores, grid_intervals = [], []
        for depth in grid_depths:
            make_at_depth = lambda length, index, depth=depth: build_niah_sample(  # noqa: E731
                NIAH_TASKS[GRID_TASK], backend.tokenizer, length, index, seed,
                answer_budget=max_new_tokens or GRID_ANSWER_BUDGET, prose=prose, fixed_depth=depth, chat=chat)
            cells = [run_cell(f"needle_grid@{depth}", make_at_depth, length) for length in lengths]
            grid_scores.append([cell["score"] for cell in cells])
            grid_intervals.append([cell["interval"] for cell in cells])
        results["needle_grid"] = {"task": GRID_TASK, "depths": list(grid_depths), "lengths": list(lengths),
                                  "scores": grid_scores, "intervals": grid_intervals, "method": method}
    bar.close()
    if "ppl" in task_names:
        assert ppl_documents is not None
        by_length = perplexity_by_length(backend, ppl_documents, lengths, ppl_stride, ppl_document_tokens, progress)
        results["perplexity"] = {str(length): value for length, value in by_length.items()}
    if keep_records:
        results["records"] = records
    results["seconds"] = round(time.time() - started, 2)
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
