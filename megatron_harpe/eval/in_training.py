"""Evaluation during training (`eval.interval`): what the trainer runs, and what it checks first.

    check_eval_settings(cfg)                       # in Config.validate, before any process group
    check_eval_prompts(cfg)                        # at launch, once the tokenizer exists
    scalars = evaluate_during_training(cfg, model, step, seq_length)   # every rank takes part

Every rank builds the same prompts and runs the same forwards of the model being trained, on the
run's TP / SP / CP layout (eval/megatron_backend.py pads each prompt to what the layout needs;
eval/kv_cache.py decodes one token at a time under every layout). Scoring is greedy generation
on every layout, so the scores of a run mean the same thing whatever its parallel layout.
Settings that cannot work are refused before training starts: an unknown task, tasks that need
files a training run does not have (`ppl`, `qa_1`, `qa_2`; run them with tools/evaluate.py on a
checkpoint), no tokenizer, and a length too short for a task's prompt.
"""

from __future__ import annotations


NEEDS_FILES = {"ppl": "--ppl-data", "qa_1": "--qa-squad", "qa_2": "--qa-hotpot"}


def check_eval_settings(cfg) -> None:
    """The checks that need no tokenizer and no process group (ValueError naming the key)."""
    if not cfg.eval.interval:
        return
    from megatron_harpe.eval.suite import expand_tasks

    try:
        tasks = expand_tasks(cfg.eval.tasks)
    except ValueError as error:
        raise ValueError(f"eval.tasks: {error}") from None
    named = [task for task in tasks if task in NEEDS_FILES and (task == "ppl" or task in cfg.eval.tasks)]
    if named:
        raise ValueError(
            f"eval.tasks: {', '.join(named)} need(s) data files a training run does not pass; evaluate a checkpoint "
            f"with tools/evaluate.py {' '.join(NEEDS_FILES[task] + ' FILE' for task in named)} instead"
        )
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be >= 1 (or null for each task's own)")
    if any(length < 1 for length in cfg.eval.lengths):
        raise ValueError(f"eval.lengths={cfg.eval.lengths}: give positive token counts (or [] for each stage's length)")
    if not cfg.data.tokenizer and not cfg.data.demo_workdir:
        raise ValueError("eval.interval needs a tokenizer for its prompts: set data.tokenizer")


def eval_lengths(cfg, seq_length: int) -> list[int]:
    return list(cfg.eval.lengths) or [seq_length]


def check_eval_prompts(cfg) -> None:
    """Build the first prompt of every task at every length the run will evaluate (a prompt that
    cannot fit its length fails here, not hours into the run)."""
    if not cfg.eval.interval:
        return
    from megatron_harpe.eval.backends import load_tokenizer_any
    from megatron_harpe.eval.cells import expand_tasks, plan_cells, resolve_qa
    from megatron_harpe.eval.chat import resolve_prompt_format
    from megatron_harpe.eval.haystack import load_prose_sentences

    tokenizer = load_tokenizer_any(cfg.data.tokenizer)
    tasks, _ = resolve_qa(expand_tasks(cfg.eval.tasks), cfg.eval.tasks, {})
    prose, chat = load_prose_sentences(None), resolve_prompt_format(tokenizer, "none")
    lengths = sorted({length for stage in cfg.resolved_stages() for length in eval_lengths(cfg, stage.seq_length)})
    plan = plan_cells(tokenizer, tasks, lengths, cfg.train.seed, cfg.eval.max_new_tokens, prose, chat, {})
    for (task, length), error in sorted(plan.unfit.items()):
        raise ValueError(f"eval.tasks {task} at length {length} (eval.lengths): {error}")


def evaluate_during_training(cfg, model, step: int, seq_length: int) -> dict[str, float]:
    """The configured tasks on `model` (every rank takes part); TensorBoard scalars by name."""
    from megatron_harpe.eval.backends import load_tokenizer_any
    from megatron_harpe.eval.megatron_backend import MegatronBackend
    from megatron_harpe.eval.suite import run_eval_suite, scalars_for_logging

    backend = MegatronBackend(model, cfg, load_tokenizer_any(cfg.data.tokenizer), f"step {step}", generation=True)
    try:
        results = run_eval_suite(backend, cfg.eval.tasks, eval_lengths(cfg, seq_length), cfg.eval.samples,
                                 seed=cfg.train.seed, max_new_tokens=cfg.eval.max_new_tokens, progress=False)  # fmt: skip
    finally:
        model.train()
    return {name.removeprefix("eval/"): value for name, value in scalars_for_logging(results).items()}
