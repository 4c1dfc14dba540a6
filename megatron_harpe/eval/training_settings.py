"""The `eval` section of a training config, checked in Config.validate: before any process group,
without a tokenizer, and without importing a model backend (this module imports only the task
registry, so the config and the evaluation packages do not import each other).

    check_eval_settings(cfg)        # ValueError naming the key and the fix

What needs the tokenizer (every prompt fits its length) is checked at launch, by
in_training.check_eval_prompts.
"""

from __future__ import annotations

from megatron_harpe.eval.tasks.registry import PERPLEXITY_TASK, TASKS, expand_tasks

NEEDS_FILES = {
    PERPLEXITY_TASK: "--ppl-data",
    **{task: spec.data_flag for task, spec in TASKS.items() if spec.data_flag},
}


def check_eval_settings(cfg) -> None:
    """The checks that need no tokenizer and no process group (ValueError naming the key)."""
    if not cfg.eval.interval:
        return
    try:
        tasks = expand_tasks(cfg.eval.tasks)
    except ValueError as error:
        raise ValueError(f"eval.tasks: {error}") from None
    named = [task for task in tasks if task in NEEDS_FILES and (task == PERPLEXITY_TASK or task in cfg.eval.tasks)]
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
