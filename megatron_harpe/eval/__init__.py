"""Evaluation: RULER's 13 tasks (NIAH x8, vt, cwe, fwe, qa_1/qa_2), passkey, needle grid and
sliding-window perplexity over interchangeable model backends, with Wilson intervals and
provenance; short-context retention through lm-evaluation-harness (short_tasks.py,
lm_eval_adapter.py). CLI: `python tools/evaluate.py --help`; docs/evaluation.md.

    from megatron_harpe.eval import load_backend, run_eval_suite, scalars_for_logging

Layout: backends/ (the backend protocol in base.py, one module per backend, the factory
`load_backend` in its __init__), tasks/ (one module per task family; registry.py maps each task
name to its sample builder, answer budget and metric), self_extend/ (training-free grouped
attention for either backend), analysis/ (attention-head reach). Here: cells.py and suite.py
(plan and run the (task, length) cells), scoring.py and teacher_forcing.py, perplexity.py,
evaluation.py (one tools/evaluate.py run: preflight.py, run_store.py, report.py, provenance.py),
in_training.py and training_settings.py (evaluation during training), testing.py (tiny models).
"""

from megatron_harpe.eval.backends import load_backend
from megatron_harpe.eval.backends.base import ModelBackend, Tokenizer
from megatron_harpe.eval.suite import run_eval_suite, scalars_for_logging
from megatron_harpe.eval.tasks.registry import expand_tasks

__all__ = ["ModelBackend", "Tokenizer", "expand_tasks", "load_backend", "run_eval_suite", "scalars_for_logging"]
