"""Short-context evaluation through lm-evaluation-harness: did context extension damage the model
at short lengths?

    python tools/evaluate.py --model exports/harpe_hf --trust-remote-code --task short --output-dir eval_out
    python tools/evaluate.py --model ckpt/harpe --task short --baseline eval_base/results.json
    python tools/evaluate.py --model ckpt/harpe --task short --short-tasks my_task:3:acc --lm-eval-include my_tasks/

The tasks are lm-eval's own (its task definitions, prompts, few-shot sampling, metrics and
standard errors; the data comes from the Hugging Face hub at run time), run with the paper's
few-shot settings (`PAPER_SHORT_TASKS`): MMLU 5-shot, HellaSwag 10-shot, ARC-Challenge 25-shot,
PIQA 0-shot, TriviaQA 5-shot, plus WinoGrande 5-shot. A Hugging Face directory (a HARPE export
with --trust-remote-code too) runs through lm-eval's own Hugging Face model (`HFLM`); a
megatron_harpe checkpoint runs directly through `lm_eval_adapter.MegatronLM` (TP/CP under
torchrun). Scores are percentages with lm-eval's standard errors and task versions, written into
results.json under "short". With a baseline (a results.json holding short scores, or a model to
evaluate first) every task gets a retention: extended / base in percent (base / extended for a
metric where lower is better, so 100 means unchanged either way), and their mean.

`--short-tasks NAME[:SHOTS[:METRIC]],...` picks other tasks or settings; `--lm-eval-include DIR`
adds task YAMLs of your own (lm-eval's `include_path`), e.g. a local JSON data set
(`dataset_path: json`), which is how the offline tests run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from importlib import metadata
from typing import Any

from megatron_harpe import cli

SHORT_GROUP = "short"
DEFAULT_SAMPLE_SEEDS = {
    "random_seed": 0,
    "numpy_random_seed": 1234,
    "torch_random_seed": 1234,
    "fewshot_random_seed": 1234,
}  # lm-eval's defaults, recorded with the results
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "word_perplexity")


@dataclasses.dataclass(frozen=True)
class ShortTask:
    name: str  # an lm-eval task or group
    shots: int
    metric: str | None = None  # None: the first of METRIC_PREFERENCE the task reports


PAPER_SHORT_TASKS = (
    ShortTask("mmlu", 5, "acc"),
    ShortTask("hellaswag", 10, "acc_norm"),
    ShortTask("arc_challenge", 25, "acc_norm"),
    ShortTask("piqa", 0, "acc"),
    ShortTask("triviaqa", 5, "exact_match"),
    ShortTask("winogrande", 5, "acc"),
)
KNOWN = {task.name: task for task in PAPER_SHORT_TASKS}


def parse_short_tasks(spec: str | None) -> list[ShortTask]:
    """'mmlu,hellaswag:0,my_task:3:acc' -> tasks; None -> the paper's six. A name of the paper's
    table keeps its settings unless given; any other name defaults to 0 shots."""
    if not spec:
        return list(PAPER_SHORT_TASKS)
    tasks: list[ShortTask] = []
    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue
        name, *rest = part.split(":")
        if len(rest) > 2 or not name:
            raise ValueError(f"--short-tasks {part!r}: expected NAME[:SHOTS[:METRIC]]")
        known = KNOWN.get(name, ShortTask(name, 0))
        try:
            shots = int(rest[0]) if rest and rest[0] else known.shots
        except ValueError:
            raise ValueError(f"--short-tasks {part!r}: the number of shots must be an integer") from None
        if shots < 0:
            raise ValueError(f"--short-tasks {part!r}: the number of shots must be >= 0")
        tasks.append(ShortTask(name, shots, rest[1] if len(rest) > 1 and rest[1] else known.metric))
    if not tasks:
        raise ValueError("--short-tasks names no task")
    if len({task.name for task in tasks}) != len(tasks):
        raise ValueError(f"--short-tasks names a task twice: {spec}")
    return tasks


def lm_eval_version() -> str:
    return metadata.version("lm_eval")


def load_task_manager(tasks: list[ShortTask], include_path: str | None) -> Any:
    """lm-eval's TaskManager, after loading every task once (its data read into the local
    cache) before any model: an unknown task or an unreachable data set fails here, in seconds."""
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.isdir(include_path):
        raise ValueError(f"--lm-eval-include {include_path!r} is not a directory of task YAML files")
    manager = TaskManager(include_path=include_path or None)
    unknown = [task.name for task in tasks if task.name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"lm-eval has no task {', '.join(unknown)}: check the name ('lm-eval ls tasks' lists them) "
            "or pass --lm-eval-include DIR with your task YAML files"
        )
    for task in tasks:
        try:
            manager.load([task.name])
        except Exception as error:  # a data set that cannot be fetched or read, a broken YAML
            raise ValueError(
                f"lm-eval could not load task {task.name}: {type(error).__name__}: {error} "
                "(the standard tasks read their data from the Hugging Face hub; offline, define a "
                "task over local files and pass --lm-eval-include DIR)"
            ) from error
    return manager


def build_lm(model: str, options: dict[str, Any], backend: Any = None, batch_size: int = 1) -> tuple[Any, str]:
    """(lm-eval LM, description) for a megatron_harpe checkpoint (our wrapper; `backend` reuses
    one already loaded) or a Hugging Face directory (lm-eval's own HFLM)."""
    from megatron_harpe.eval.backends import is_megatron_checkpoint, load_backend

    if model in ("oracle", "random"):
        raise ValueError("the short tasks need a model: the oracle/random backends only answer the retrieval tasks")
    if options.get("self_extend") is not None:
        raise ValueError("--self-extend is for the long tasks; run the short tasks without it")
    if is_megatron_checkpoint(model):
        from megatron_harpe.eval.lm_eval_adapter import MegatronLM

        backend = backend or load_backend(model, **options)
        return MegatronLM(backend), "megatron_harpe checkpoint through megatron_harpe.eval.lm_eval_adapter.MegatronLM"
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            "a Hugging Face directory runs the short tasks in one process: start it with python, not torchrun"
        )
    from lm_eval.models.huggingface import HFLM

    if not os.path.isdir(model) or not os.path.exists(os.path.join(model, "config.json")):
        raise ValueError(f"model path {model!r} is neither a Hugging Face directory nor a megatron_harpe checkpoint")
    from megatron_harpe.eval.backends.hf import needs_remote_code

    trust = bool(options.get("trust_remote_code"))
    if not trust and needs_remote_code(model):
        raise ValueError(
            f"{model!r} ships its own modeling code (our HARPE export does): rerun with --trust-remote-code"
        )
    tokenizer = options.get("tokenizer")
    if tokenizer and not os.path.isdir(tokenizer):  # lm-eval's HFLM loads tokenizers from directories only
        raise ValueError(
            f"--task short runs a Hugging Face model through lm-eval, which loads a tokenizer from a "
            f"directory: --tokenizer {tokenizer} is a file; pass a Hugging Face tokenizer directory or "
            "leave --tokenizer out (the model's own)"
        )
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer or model,
        trust_remote_code=trust,
        dtype=cli.torch_dtype(options.get("dtype", "fp32")),
        device=options.get("device", "cpu"),
        batch_size=batch_size,
    )
    return lm, "Hugging Face directory through lm-eval's HFLM"


def _metric_key(task_results: dict[str, Any], metric: str) -> str | None:
    """'acc_norm,none' for metric acc_norm (the unfiltered value when a task has several filters)."""
    keys = [key for key in task_results if "," in key and key.split(",")[0] == metric]
    if not keys:
        return None
    return next((key for key in keys if key.endswith(",none")), keys[0])


def _samples_of(output: dict[str, Any], name: str) -> int:
    counts = output.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    return sum(_samples_of(output, sub) for sub in output.get("group_subtasks", {}).get(name, []))


def _task_score(output: dict[str, Any], task: ShortTask) -> dict[str, Any]:
    task_results = output["results"].get(task.name)
    if task_results is None:
        raise ValueError(f"lm-eval returned no result for {task.name}")
    metric = task.metric or next((m for m in METRIC_PREFERENCE if _metric_key(task_results, m)), None)
    key = _metric_key(task_results, metric) if metric else None
    if key is None:
        reported = sorted({key.split(",")[0] for key in task_results if "," in key and "_stderr" not in key})
        raise ValueError(
            f"task {task.name} reports no {metric or 'known'} metric: choose one of {', '.join(reported)} "
            f"(--short-tasks {task.name}:{task.shots}:METRIC)"
        )
    value = float(task_results[key])
    stderr_value = task_results.get(key.replace(",", "_stderr,", 1))
    stderr = float(stderr_value) if isinstance(stderr_value, (int, float)) else None
    higher = output.get("higher_is_better", {}).get(task.name, {}).get(metric, True)
    percent = bool(higher) and 0.0 <= value <= 1.0  # accuracies and exact match as 0..100, like RULER scores
    scale = 100.0 if percent else 1.0
    return {
        "lm_eval_task": task.name,
        "num_fewshot": task.shots,
        "metric": metric,
        "filter": key.split(",", 1)[1],
        "score": value * scale,
        "stderr": None if stderr is None else stderr * scale,
        "percent": percent,
        "higher_is_better": bool(higher),
        "version": output.get("versions", {}).get(task.name),
        "samples": _samples_of(output, task.name),
    }


def _write_samples(path: str, output: dict[str, Any], append: bool) -> None:
    """Every scored item (lm-eval's logged samples) as one JSON line: what was asked, the
    model's log-likelihoods or text, and the item's metrics."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {str(key): plain(item) for key, item in value.items()}
        if hasattr(value, "item"):  # numpy / torch scalars
            return value.item()
        return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)

    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        for task, items in output.get("samples", {}).items():
            for item in items:
                record = {
                    "task": task,
                    "doc_id": item["doc_id"],
                    "arguments": plain(item["arguments"]),
                    "responses": plain(item["resps"]),
                    "filtered": plain(item["filtered_resps"]),
                    "target": plain(item["target"]),
                    "metrics": {name: plain(item[name]) for name in item.get("metrics", []) if name in item},
                }
                handle.write(json.dumps(record) + "\n")


def request_cache(directory: str, identity: dict[str, Any], resume: bool, rank: int = 0) -> str:
    """lm-eval's request cache (its `use_cache`) for this run in `directory`: every scored request
    is kept in an SQLite file as it is computed, so `--resume` reuses them. A fresh run clears it;
    a resume with another model or options is refused. One directory per rank (under torchrun
    every rank scores every request)."""
    own = os.path.join(directory, f"rank{rank}")
    marker = os.path.join(own, "model.json")
    identity = json.loads(json.dumps(identity))
    if resume and os.path.exists(marker):
        with open(marker, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous != identity:
            raise ValueError(
                f"--resume: the short tasks in {directory} were scored for {previous.get('model')} with "
                "other options: resume with the same ones, or use another --output-dir"
            )
    elif os.path.isdir(own):
        shutil.rmtree(own)
    os.makedirs(own, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump(identity, handle)
    return os.path.join(own, "requests")


def run_short_tasks(
    lm: Any,
    tasks: list[ShortTask],
    manager: Any,
    description: str,
    model_name: str,
    limit: int | None = None,
    samples_path: str | None = None,
    log_path: str | None = None,
    progress: bool = True,
    cache: str | None = None,
    announce: Any = None,
    on_group: Any = None,
) -> dict[str, Any]:
    """Run `tasks` (checked by `load_task_manager`) on `lm`; returns the "short" section of
    results.json: per task score, stderr, metric, shots, version and item count, and the mean.
    `cache`: a `request_cache` path; `announce(line)` prints each task's score as it finishes;
    `on_group(section)` sees the section after each group of tasks (one group per shot count)."""
    import lm_eval

    from megatron_harpe.eval.lm_eval_adapter import ProgressLM, quiet_lm_eval

    section: dict[str, Any] = {
        "harness": f"lm-evaluation-harness {lm_eval_version()}",
        "model": model_name,
        "backend": description,
        "limit": limit,
        "seeds": dict(DEFAULT_SAMPLE_SEEDS),
        "tasks": {},
    }
    by_shots: dict[int, list[ShortTask]] = {}
    for task in tasks:
        by_shots.setdefault(task.shots, []).append(task)
    with quiet_lm_eval(log_path) as terminal:
        wrapped = ProgressLM(lm, stream=terminal, enabled=progress)
        for number, (shots, group) in enumerate(by_shots.items()):
            output = lm_eval.simple_evaluate(
                model=wrapped,
                tasks=[task.name for task in group],
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=samples_path is not None,
                verbosity="ERROR",
                bootstrap_iters=100000,
                use_cache=cache,
                **DEFAULT_SAMPLE_SEEDS,
            )
            if output is None:  # a non-zero rank under torchrun
                continue
            for task in group:
                cell = section["tasks"][task.name] = _task_score(output, task)
                if announce is not None:
                    stderr = f" ± {cell['stderr']:.2f}" if cell["stderr"] is not None else ""
                    announce(
                        f"{task.name} ({task.shots}-shot {cell['metric']}): {cell['score']:.2f}{stderr} "
                        f"({cell['samples']} items)"
                    )
            if samples_path is not None:
                _write_samples(samples_path, output, append=number > 0)
            _summarize(section)
            if on_group is not None:
                on_group(section)
    _summarize(section)
    return section


def _summarize(section: dict[str, Any]) -> None:
    averaged = [name for name, cell in section["tasks"].items() if cell["percent"]]
    section["mean_over"] = averaged
    section["mean"] = sum(section["tasks"][name]["score"] for name in averaged) / len(averaged) if averaged else None


def load_baseline(spec: str) -> dict[str, Any] | None:
    """The short section of a results.json (a file, or a directory holding one); None when
    `spec` is a model to evaluate instead."""
    path = os.path.join(spec, "results.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        if os.path.isdir(spec):
            return None  # a model directory
        raise ValueError(
            f"--baseline {spec!r} is neither a results.json, a directory holding one, nor a model directory"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--baseline: cannot read {path}: {error}") from error
    short = results.get(SHORT_GROUP) if isinstance(results, dict) else None
    if not short or not short.get("tasks"):
        raise ValueError(
            f"--baseline {path} holds no short-task scores: evaluate the base model with --task short first"
        )
    return short


def add_retention(short: dict[str, Any], baseline: dict[str, Any], baseline_name: str) -> None:
    """Per task retention (100 = the base model's score kept) and their mean, in `short`."""
    cells: dict[str, Any] = {}
    for name, cell in short["tasks"].items():
        base = baseline["tasks"].get(name)
        if base is None:
            raise ValueError(f"the baseline {baseline_name} has no score for {name}: evaluate both with the same tasks")
        for field in ("num_fewshot", "metric"):
            if base[field] != cell[field]:
                raise ValueError(
                    f"{name}: the baseline was scored with {field} {base[field]}, this run with "
                    f"{cell[field]}: compare like with like"
                )
        if cell["higher_is_better"]:
            ratio = cell["score"] / base["score"] if base["score"] else None
        else:
            ratio = base["score"] / cell["score"] if cell["score"] else None
        cells[name] = {
            "baseline_score": base["score"],
            "baseline_stderr": base.get("stderr"),
            "retention": None if ratio is None else 100.0 * ratio,
            "baseline_version": base.get("version"),
        }
    averaged = [name for name in short.get("mean_over", []) if cells[name]["retention"] is not None]
    short["retention"] = {
        "baseline": baseline_name,
        "tasks": cells,
        "mean_over": averaged,
        "mean": sum(cells[name]["retention"] for name in averaged) / len(averaged) if averaged else None,
        "definition": "extended / base x 100 per task (base / extended where lower is better); "
        "mean = average of the retentions of the tasks in the score mean",
    }


def markdown_section(short: dict[str, Any]) -> list[str]:
    """The short-task table: score ± stderr per task, and the baseline and retention when given."""
    retention = short.get("retention")
    header = "| task | shots | metric | score | version |" + (" baseline | retention |" if retention else "")
    lines = [
        f"Short tasks ({short['harness']}; {short['backend']}"
        + (f"; limited to {short['limit']} items per task" if short.get("limit") else "")
        + "):",
        "",
        header,
        "|---" * (7 if retention else 5) + "|",
    ]

    def number(value: float | None, stderr: float | None = None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}" + (f" ± {stderr:.2f}" if stderr is not None else "")

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}%"

    for name, cell in short["tasks"].items():
        row = (
            f"| {name} | {cell['num_fewshot']} | {cell['metric']} | {number(cell['score'], cell['stderr'])} | "
            f"{cell['version']} |"
        )
        if retention:
            kept = retention["tasks"][name]
            row += f" {number(kept['baseline_score'], kept['baseline_stderr'])} | {percent(kept['retention'])} |"
        lines.append(row)
    if short.get("mean") is not None:
        mean_row = f"| **mean** ({len(short['mean_over'])} tasks) | | | **{short['mean']:.2f}** | |"
        if retention:
            mean_row += f" | **{percent(retention['mean'])}** |"
        lines.append(mean_row)
    if retention:
        lines += ["", f"Retention against {retention['baseline']}: {retention['definition']}."]
    return lines + [""]
