"""Evaluation during training (`eval.interval`): what the trainer runs, and what it checks first.

    check_eval_prompts(cfg)                        # at launch, once the tokenizer exists
    scalars = evaluate_during_training(cfg, model, step, seq_length)   # every rank takes part

Every rank builds the same prompts and runs the same forwards of the model being trained, on the
run's TP / SP / CP layout (eval/backends/megatron.py pads each prompt to what the layout
needs; eval/backends/kv_cache.py decodes one token at a time under every layout). Scoring is
greedy generation on every layout, so the scores of a run mean the same thing whatever its
parallel layout.
Settings that cannot work are refused before training starts: an unknown task, tasks that need
files a training run does not have, or no tokenizer, in Config.validate (eval/training_settings.py);
a length too short for a task's prompt here, at launch.
"""

from __future__ import annotations


def eval_lengths(cfg, seq_length: int) -> list[int]:
    return list(cfg.eval.lengths) or [seq_length]


def check_eval_prompts(cfg) -> None:
    """Build the first prompt of every task at every length the run will evaluate (a prompt that
    cannot fit its length fails here, not hours into the run)."""
    if not cfg.eval.interval:
        return
    from megatron_harpe.eval.backends.tokenizer import load_tokenizer_any
    from megatron_harpe.eval.cells import plan_cells
    from megatron_harpe.eval.tasks.chat import resolve_prompt_format
    from megatron_harpe.eval.tasks.haystack import load_prose_sentences
    from megatron_harpe.eval.tasks.registry import expand_tasks, resolve_data_files

    tokenizer = load_tokenizer_any(cfg.data.tokenizer)
    tasks, _ = resolve_data_files(expand_tasks(cfg.eval.tasks), cfg.eval.tasks, {})
    prose, chat = load_prose_sentences(None), resolve_prompt_format(tokenizer, "none")
    lengths = sorted({length for stage in cfg.resolved_stages() for length in eval_lengths(cfg, stage.seq_length)})
    plan = plan_cells(tokenizer, tasks, lengths, cfg.train.seed, cfg.eval.max_new_tokens, prose, chat, {})
    for (task, length), error in sorted(plan.unfit.items()):
        raise ValueError(f"eval.tasks {task} at length {length} (eval.lengths): {error}")


def evaluate_during_training(cfg, model, step: int, seq_length: int) -> dict[str, float]:
    """The configured tasks on `model` (every rank takes part); TensorBoard scalars by name."""
    from megatron_harpe.eval.backends.megatron import MegatronBackend
    from megatron_harpe.eval.backends.tokenizer import load_tokenizer_any
    from megatron_harpe.eval.suite import run_eval_suite, scalars_for_logging

    backend = MegatronBackend(model, cfg, load_tokenizer_any(cfg.data.tokenizer), f"step {step}", generation=True)
    try:
        results = run_eval_suite(backend, cfg.eval.tasks, eval_lengths(cfg, seq_length), cfg.eval.samples,
                                 seed=cfg.train.seed, max_new_tokens=cfg.eval.max_new_tokens,
                                 progress=False)  # fmt: skip
    finally:
        model.train()
    return {name.removeprefix("eval/"): value for name, value in scalars_for_logging(results).items()}
