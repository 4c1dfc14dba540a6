"""Run a set of evaluation tasks at a set of lengths against one backend; the one entry point
shared by `tools/evaluate.py` and evaluation during training.

    from megatron_harpe.eval.suite import run_eval_suite, scalars_for_logging
    results = run_eval_suite(backend, ["niah", "passkey"], [4096, 8192], samples=10, seed=42)
    writer.add_scalars(scalars_for_logging(results))   # {"eval/niah_single_1/4096": 100.0, ...}

Tasks: the eight RULER NIAH tasks (each by name, or all as "niah"), "passkey", "synthetic_kv"
(word-level key/value retrieval of the CPU replication, see synthetic_kv.py), "needle_grid"
(single needle over lengths x depths) and "ppl" (needs `ppl_documents`). Retrieval scores are
0..100: mean over samples per task and length, `per_length` = mean over the retrieval tasks
run (the NIAH ones only when any ran: passkey is reported but not averaged in), `overall` =
mean over lengths (the paper's headline when the tasks are the 8 NIAH tasks).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from megatron_harpe.eval.backends import ModelBackend, encode_continuation
from megatron_harpe.eval.haystack import load_prose_sentences
from megatron_harpe.eval.niah import NIAH_TASKS, build_niah_sample
from megatron_harpe.eval.passkey import PASSKEY_ANSWER_BUDGET, build_passkey_sample
from megatron_harpe.eval.perplexity import DEFAULT_STRIDE, perplexity_by_length
from megatron_harpe.eval.samples import EvalSample
from megatron_harpe.eval.scoring import mean, string_match_all, teacher_forced_score
from megatron_harpe.eval.synthetic_kv import ANSWER_BUDGET as SYNTHETIC_KV_BUDGET
from megatron_harpe.eval.synthetic_kv import build_synthetic_kv_sample

RETRIEVAL_TASKS = (*NIAH_TASKS, "passkey")
SYNTHETIC_TASKS = ("synthetic_kv",)  # scored like the retrieval tasks; needs its word-level tokenizer
TASK_GROUPS = {"niah": tuple(NIAH_TASKS)}
ALL_TASKS = (*RETRIEVAL_TASKS, *SYNTHETIC_TASKS, "needle_grid", "ppl")
SCORING_METHODS = ("auto", "generate", "teacher_forcing")
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
                raise ValueError(f"unknown task {member!r}: choose from {', '.join(('niah', *ALL_TASKS))}")
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
    """(score 0..100, what the model answered) for one sample."""
    tokenizer = backend.tokenizer
    if method == "generate":
        output = decode_output(backend, backend.generate(sample.prompt_ids, max_new_tokens=sample.answer_budget))
        return string_match_all(output, sample.answers), output
    answer_ids = encode_continuation(tokenizer, sample.prompt, sample.continuation)
    if len(answer_ids) > sample.answer_budget:
        raise ValueError(f"the expected answer of {sample.task} needs {len(answer_ids)} tokens, more "
                         f"than its budget of {sample.answer_budget}: raise --max-new-tokens")
    predictions = backend.teacher_forced_match(sample.prompt_ids, answer_ids)
    return teacher_forced_score(tokenizer, answer_ids, predictions, sample.answers), decode_output(backend, predictions)


def _sample_factory(
    task: str, backend: ModelBackend, seed: int, max_new_tokens: int | None, prose: tuple[str, ...]
) -> Callable[[int, int], EvalSample]:
    tokenizer = backend.tokenizer
    if task == "passkey":
        budget = max_new_tokens or PASSKEY_ANSWER_BUDGET
        return lambda length, index: build_passkey_sample(tokenizer, length, index, seed, budget)
    if task == "synthetic_kv":  # the CPU replication's word-level task (eval/synthetic_kv.py)
        kv_budget = max_new_tokens or SYNTHETIC_KV_BUDGET
        return lambda length, index: build_synthetic_kv_sample(tokenizer, length, index, seed, answer_budget=kv_budget)
    niah_task = NIAH_TASKS[task]
    kwargs: dict[str, Any] = {"prose": prose}
    if max_new_tokens:
        kwargs["answer_budget"] = max_new_tokens
    return lambda length, index: build_niah_sample(niah_task, tokenizer, length, index, seed, **kwargs)


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
) -> dict[str, Any]:
    """Evaluate `backend`; returns a JSON-ready dict (lengths as string keys). See module doc."""
    task_names = expand_tasks(tasks)
    if not lengths or any(length <= 0 for length in lengths):
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if "ppl" in task_names and not ppl_documents:
        raise ValueError("the ppl task needs documents: pass --ppl-data (jsonl, txt or Megatron prefix)")
    method = resolve_scoring(backend, scoring)
    prose = load_prose_sentences(haystack_file)
    started = time.time()
    results: dict[str, Any] = {
        "model": backend.name, "seed": seed, "samples": samples, "lengths": list(lengths),
        "scoring": method, "tasks": {},
    }
    if getattr(backend, "self_extend", None) is not None:  # evaluation-time grouped attention
        results["self_extend"] = backend.self_extend.as_dict()
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
        return {"score": mean(scores), "scores": scores, "samples": samples, "method": method,
                "prompt_tokens_mean": mean([float(t) for t in prompt_tokens])}

    for task in retrieval:
        make = _sample_factory(task, backend, seed, max_new_tokens, prose)
        results["tasks"][task] = {str(length): run_cell(task, make, length) for length in lengths}
    if retrieval:
        # the paper's headline averages the NIAH tasks; passkey joins the mean only when run alone
        averaged = [task for task in retrieval if task in NIAH_TASKS] or retrieval
        results["mean_over"] = averaged
        results["per_length"] = {
            str(length): mean([results["tasks"][task][str(length)]["score"] for task in averaged])
            for length in lengths
        }
        results["overall"] = mean(list(results["per_length"].values()))
    if "needle_grid" in task_names:
        grid_scores = []
        for depth in grid_depths:
            make_at_depth = lambda length, index, depth=depth: build_niah_sample(  # noqa: E731
                NIAH_TASKS[GRID_TASK], backend.tokenizer, length, index, seed,
                answer_budget=max_new_tokens or GRID_ANSWER_BUDGET, prose=prose, fixed_depth=depth)
            grid_scores.append([run_cell(f"needle_grid@{depth}", make_at_depth, length)["score"]
                                for length in lengths])
        results["needle_grid"] = {"task": GRID_TASK, "depths": list(grid_depths), "lengths": list(lengths),
                                  "scores": grid_scores, "method": method}
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
