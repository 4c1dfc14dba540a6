"""One evaluation run as tools/evaluate.py performs it: check everything checkable, then load the
model, then compute, writing as it goes.

    from megatron_harpe.eval.evaluation import run_evaluation
    results = run_evaluation(args)      # args: tools/evaluate.py's parsed options

Order of work:
1. the options, the output directory (a writable directory with room; an unfinished earlier run
   there needs --resume or --overwrite), the short tasks (lm-eval loads each task and its data)
   and the baseline;
2. the long tasks' cells, built and sized with the model's tokenizer alone (cells.py): a cell
   that cannot fit fails the run here, in seconds, or is skipped with --skip-unfit;
3. the model; then every cell, each sample appended to samples.jsonl as it is scored and each
   cell's score printed when it finishes, results.json / results.md rewritten after every cell;
4. the short tasks through lm-evaluation-harness (short_tasks.py; requests cached for --resume),
   the baseline's when it is a model, the retention; the final report with plots.
Under torchrun every rank computes; rank 0 writes and prints.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any

from megatron_harpe import cli
from megatron_harpe.eval.preflight import check_output_dir, check_unfinished_run, tokenizer_for

SHORT = "short"


def _say(line: str) -> None:
    if cli.is_rank_zero():
        print(line, flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def split_tasks(task: str) -> tuple[list[str], bool]:
    """(the long tasks asked for, whether the short tasks are) of --task."""
    requested = [name.strip() for name in task.split(",") if name.strip()]
    return [name for name in requested if name != SHORT], SHORT in requested


def option_errors(args: Any) -> str | None:
    """What is wrong with the options alone (checked before anything heavy is imported)."""
    long_requested, short_wanted = split_tasks(args.task)
    if not long_requested and not short_wanted:
        return "--task names no task"
    if long_requested and not args.lengths:
        return f"--lengths is required for {', '.join(long_requested)} (e.g. --lengths 4k,8k)"
    if args.baseline and not short_wanted:
        return "--baseline compares short-task scores: add short to --task"
    if args.self_extend is not None and args.model in ("oracle", "random"):
        return f"--self-extend needs a model; the {args.model} backend has no attention"
    return None


def run_evaluation(args: Any) -> dict[str, Any]:
    """Run what `args` asks for (see the module docstring); returns the results written. A run
    that fails leaves no empty output directory behind (the preflight creates it to probe it)."""
    existed = os.path.isdir(args.output_dir)
    try:
        return _run_evaluation(args)
    except BaseException:
        if not existed and cli.is_rank_zero():
            with contextlib.suppress(OSError):  # not empty (something was written), or already gone
                os.rmdir(args.output_dir)
        raise


def _run_evaluation(args: Any) -> dict[str, Any]:
    from megatron_harpe.eval.report import write_report

    problem = option_errors(args)
    if problem:
        raise ValueError(problem)
    long_requested, short_wanted = split_tasks(args.task)
    writer = cli.is_rank_zero()
    output = args.output_dir
    check_output_dir(output)
    check_unfinished_run(output, args.resume, args.overwrite)
    options = dict(
        tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        tensor_parallel=args.tensor_parallel,
        context_parallel=args.context_parallel,
        self_extend=args.self_extend,
    )

    # 1. the short tasks and the baseline, before any model
    short_plan = _prepare_short(args, output) if short_wanted else None

    # 2. the long tasks' cells, with the tokenizer alone
    setup, documents = None, None
    if long_requested:
        from megatron_harpe.eval.perplexity import load_documents
        from megatron_harpe.eval.suite import prepare_suite
        from megatron_harpe.eval.tasks.registry import expand_tasks

        tokenizer = tokenizer_for(args.model, options)
        if "ppl" in expand_tasks(long_requested):
            if not args.ppl_data:
                raise ValueError("--task ppl needs --ppl-data (a .jsonl, .txt or Megatron dataset prefix)")
            documents = load_documents(
                args.ppl_data, tokenizer, args.text_key, args.ppl_max_documents, min_tokens=min(args.lengths)
            )
        qa_files = {task: path for task, path in (("qa_1", args.qa_squad), ("qa_2", args.qa_hotpot)) if path}
        setup = prepare_suite(
            tokenizer,
            long_requested,
            args.lengths,
            args.samples,
            args.seed,
            args.max_new_tokens,
            args.haystack_file,
            tuple(args.grid_depths),
            args.chat_template,
            qa_files,
            args.fill,
            args.skip_unfit,
        )
        if setup.plan.unfit:
            _say("note: " + setup.plan.unfit_line() + ": skipped (--skip-unfit)")

    # 3. the model, then the long tasks
    results: dict[str, Any] = {"model": args.model, "complete": False}
    backend = None
    if setup is not None:
        from megatron_harpe.eval.backends import load_backend
        from megatron_harpe.eval.run_store import RunStore
        from megatron_harpe.eval.suite import resolve_scoring, run_eval_suite

        backend = load_backend(args.model, **options)
        if getattr(backend, "model", None) is not None and not getattr(args, "allow_nonfinite", False):
            from megatron_harpe.convert.finite import refuse_nonfinite_everywhere

            refuse_nonfinite_everywhere(backend.model, f"model {args.model}")  # scores of NaN weights mean nothing
        method = resolve_scoring(backend, args.scoring)
        self_extend = backend.self_extend.as_dict() if getattr(backend, "self_extend", None) is not None else None
        store = RunStore(
            output,
            setup.settings(backend.tokenizer, backend.name, method, self_extend),
            resume=args.resume,
            overwrite=args.overwrite,
            writer=writer,
        )
        if store.resumed:
            _say(f"resuming: {store.resumed} samples already scored in {output}")
        results = run_eval_suite(
            backend,
            setup=setup,
            scoring=args.scoring,
            ppl_documents=documents,
            ppl_stride=args.ppl_stride,
            ppl_document_tokens=args.ppl_document_tokens,
            keep_records=args.save_predictions,
            progress=cli.show_progress(args.no_progress) and writer,
            store=store,
            on_cell=(lambda partial: write_report(partial, output, plots=False)) if writer else None,
            announce=_say,
        )
        store.finish()
        results["complete"] = not short_wanted

    # 4. the short tasks (and the baseline's), through lm-eval
    if short_plan is not None:
        from megatron_harpe.eval.backends import is_megatron_checkpoint

        # a megatron backend is reused; a Hugging Face model is loaded again by lm-eval's own model
        reusable = backend if backend is not None and is_megatron_checkpoint(args.model) else None
        backend = None
        gc.collect()
        _run_short(args, output, options, short_plan, results, reusable, writer)
    results["complete"] = True
    if writer:
        write_report(results, output)
    return results


def _prepare_short(args: Any, output: str) -> dict[str, Any]:
    try:
        from megatron_harpe.eval.lm_eval_adapter import quiet_lm_eval
    except ImportError as error:
        raise ValueError(
            f"--task short runs lm-evaluation-harness, which is not installed ({error}): pip install -e '.[eval]'"
        ) from error
    from megatron_harpe.eval.short_tasks import load_baseline, load_task_manager, parse_short_tasks

    tasks = parse_short_tasks(args.short_tasks)
    with quiet_lm_eval(_log_path(output)):
        manager = load_task_manager(tasks, args.lm_eval_include)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.baseline and baseline is None and os.path.abspath(args.baseline) == os.path.abspath(args.model):
        raise ValueError("--baseline names the model being evaluated: give the base model or its results.json")
    return {"tasks": tasks, "manager": manager, "baseline": baseline}


def _log_path(output: str) -> str:
    """Where lm-eval's own output goes (rank 0; the other ranks' is dropped)."""
    return os.path.join(output, "lm_eval.log") if cli.is_rank_zero() else os.devnull


def _short_section(
    args: Any,
    output: str,
    model: str,
    options: dict[str, Any],
    plan: dict[str, Any],
    backend: Any,
    name: str,
    on_group: Any,
) -> dict[str, Any]:
    """Score the short tasks of `model` (reusing a megatron `backend` already loaded)."""
    from megatron_harpe.eval.lm_eval_adapter import quiet_lm_eval
    from megatron_harpe.eval.short_tasks import build_lm, request_cache, run_short_tasks

    with quiet_lm_eval(_log_path(output)):
        lm, description = build_lm(model, options, backend=backend, batch_size=args.batch_size)
    identity = {
        "model": os.path.abspath(model) if os.path.exists(model) else model,
        "dtype": args.dtype,
        "tokenizer": args.tokenizer,
        "limit": args.short_limit,
        "tasks": [[task.name, task.shots] for task in plan["tasks"]],
    }
    cache = request_cache(os.path.join(output, "lm_eval_cache", name), identity, args.resume, _rank())
    samples_path = (
        os.path.join(output, f"{name}_samples.jsonl") if args.save_predictions and cli.is_rank_zero() else None
    )
    section = run_short_tasks(
        lm,
        plan["tasks"],
        plan["manager"],
        description,
        model,
        limit=args.short_limit,
        samples_path=samples_path,
        log_path=_log_path(output),
        progress=cli.show_progress(args.no_progress),
        cache=cache,
        announce=_say,
        on_group=on_group,
    )
    return section


def _run_short(
    args: Any,
    output: str,
    options: dict[str, Any],
    plan: dict[str, Any],
    results: dict[str, Any],
    backend: Any,
    writer: bool,
) -> None:
    from megatron_harpe.eval.report import write_report
    from megatron_harpe.eval.short_tasks import add_retention

    def keep(section: dict[str, Any]) -> None:
        if writer:
            write_report({**results, "short": section, "complete": False}, output, plots=False)

    section = _short_section(args, output, args.model, options, plan, backend, "short", keep)
    results["short"] = section
    backend = None
    gc.collect()
    baseline, baseline_name = plan["baseline"], args.baseline
    if args.baseline and baseline is None:  # a model: score it the same way
        _say(f"baseline: the short tasks on {args.baseline}")
        baseline = _short_section(
            args,
            output,
            args.baseline,
            {**options, "tokenizer": None, "self_extend": None},
            plan,
            None,
            "baseline",
            lambda _: None,
        )
        results["short_baseline"] = baseline
    if baseline is not None and section["tasks"]:
        add_retention(section, baseline, baseline_name)
