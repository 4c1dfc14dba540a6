"""Evaluation: RULER's 13 tasks (NIAH x8, vt, cwe, fwe, qa_1/qa_2), passkey, needle grid and
sliding-window perplexity over interchangeable model backends, with Wilson intervals and
provenance; short-context retention through lm-evaluation-harness (short_tasks.py,
lm_eval_adapter.py). CLI: `python tools/evaluate.py --help`; docs/evaluation.md.

    from megatron_harpe.eval import load_backend, run_eval_suite, scalars_for_logging
"""

from megatron_harpe.eval.backends import ModelBackend, Tokenizer, load_backend
from megatron_harpe.eval.suite import expand_tasks, run_eval_suite, scalars_for_logging

__all__ = ["ModelBackend", "Tokenizer", "expand_tasks", "load_backend", "run_eval_suite", "scalars_for_logging"]
