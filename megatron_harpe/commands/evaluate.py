"""Evaluate a model: long-context retrieval (RULER), perplexity, and short-context retention
through lm-evaluation-harness (docs/evaluation.md).

    harpe-evaluate --model exports/harpe_hf --trust-remote-code --task niah,passkey --lengths 4096,8192,16384 --samples 10 --output-dir eval_out
    harpe-evaluate --model exports/harpe_hf --task needle_grid --lengths 1024,2048,4096 --output-dir eval_grid
    harpe-evaluate --model exports/harpe_hf --task ppl --lengths 4096,8192 --ppl-data data/long_docs.jsonl --ppl-stride 256
    harpe-evaluate --model oracle --tokenizer exports/harpe_hf --task niah --lengths 4096
    harpe-evaluate --model exports/instruct_hf --task ruler --lengths 4k,8k --chat-template ruler --qa-squad squad_dev_v2.json --qa-hotpot hotpot_dev_distractor_v1.json
    harpe-evaluate --model ckpt/harpe --task short --baseline eval_base/results.json --output-dir eval_short
    harpe-evaluate --model exports/llama2_hf --task niah --lengths 16k --self-extend window=1024,group=32
    torchrun --nproc-per-node 2 tools/evaluate.py --model ckpt/harpe --tensor-parallel 2 --task niah --lengths 4k

(`python tools/evaluate.py` is the same command.) The fifth runs all 13 RULER tasks; the sixth
adds the retention column (extended / base) of the short tasks.

--model takes a Hugging Face directory, a megatron_harpe checkpoint directory, or the synthetic
"oracle" / "random" backends (harness checks: they must score 100 and about 0). Before the model
loads, the output directory is checked and every (task, length) cell is built and sized; a cell
that cannot fit stops the run at once (or is skipped with --skip-unfit). Each cell's score is
printed when it finishes; results.json and results.md are rewritten after every cell and every
sample is kept in samples.jsonl, so an interrupted run keeps its work and --resume continues it.
At the end: results.json, results.md, PNG plots and the Markdown table. Under torchrun (a
checkpoint sharded with --tensor-parallel / --context-parallel) every rank evaluates and rank 0
writes the results.
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

from __future__ import annotations

import argparse
import sys

from megatron_harpe import cli
from megatron_harpe.eval.cells import DEFAULT_GRID_DEPTHS, describe_budgets
from megatron_harpe.eval.perplexity import DEFAULT_STRIDE
from megatron_harpe.eval.suite import DEFAULT_SAMPLES, SCORING_METHODS, parse_token_counts
from megatron_harpe.eval.tasks.registry import ALL_TASKS
from megatron_harpe.eval.tasks.samples import FILL_MODES


def _self_extend_argument(text: str):
    """argparse type for --self-extend; imports torch only when the option is given."""
    from megatron_harpe.eval.self_extend.core import parse_self_extend_argument

    return parse_self_extend_argument(text)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for(__doc__)
    cli.add_model(
        parser, help="a Hugging Face model directory, a megatron_harpe checkpoint directory, 'oracle' or 'random'"
    )
    parser.add_argument(
        "--task",
        required=True,
        help=f"comma-separated: ruler (all 13), niah (all 8), {', '.join(ALL_TASKS)}, and short "
        "(the paper's short-context tasks through lm-evaluation-harness)",
    )
    parser.add_argument(
        "--lengths",
        type=parse_token_counts,
        default=None,
        help="context lengths in tokens: 4096,8192 or 4k,8k (every task but short needs them)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help="samples per task and length (per grid cell); the default 100 keeps a cell's 95%% "
        "Wilson interval within +-10 points at any score (RULER uses 500: +-4.4)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated samples")
    cli.add_output_dir(
        parser,
        default="eval_results",
        help="where results.json/.md and plots go (must be empty unless --overwrite or --resume)",
    )
    parser.add_argument(
        "--scoring",
        choices=SCORING_METHODS,
        default="auto",
        help="generate (greedy decoding + string match), teacher_forcing, or auto (generate when the backend can)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="replaces every task's answer budget (the tokens kept free after the prompt) and "
        f"generation limit; default: each task's own ({describe_budgets()}). RULER comparisons "
        "keep the defaults",
    )
    parser.add_argument("--haystack-file", default=None, help="UTF-8 prose replacing the default haystack")
    parser.add_argument(
        "--grid-depths",
        type=parse_token_counts,
        default=list(DEFAULT_GRID_DEPTHS),
        help="needle depths in percent for needle_grid",
    )
    parser.add_argument("--ppl-data", default=None, help="documents for ppl: .jsonl[.zst], .txt or Megatron prefix")
    cli.add_text_key(parser)
    parser.add_argument("--ppl-stride", type=int, default=DEFAULT_STRIDE, help="sliding-window stride in tokens")
    parser.add_argument("--ppl-max-documents", type=int, default=20, help="documents read for ppl")
    parser.add_argument(
        "--ppl-document-tokens",
        type=int,
        default=None,
        help="score up to this many tokens per document (default: the length itself)",
    )
    cli.add_model_backend(
        parser,
        tokenizer="replaces the model's own (required for oracle/random)",
        context="megatron checkpoint: context-parallel size (under torchrun)",
    )
    parser.add_argument(
        "--self-extend",
        type=_self_extend_argument,
        default=None,
        metavar="window=W,group=G",
        help="Self-Extend grouped attention at evaluation time (paper: window=1024,group=32), "
        "any RoPE model on either backend",
    )
    parser.add_argument("--allow-nonfinite", action="store_true", help="evaluate a model whose weights hold NaN/inf")
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write predictions.jsonl (and short_samples.jsonl: every lm-eval item)",
    )
    parser.add_argument(
        "--skip-unfit",
        action="store_true",
        help="skip (task, length) cells whose prompt cannot fit the length, marking them in the "
        "table, instead of stopping before the model loads",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --output-dir (same options): its scored samples and "
        "short-task requests are reused",
    )
    cli.add_overwrite(parser, "the results in --output-dir (and an unfinished run there)")
    cli.add_progress(parser)
    # RULER comparability: prompt template and the QA data of qa_1 / qa_2
    parser.add_argument(
        "--chat-template",
        default="auto",
        help="auto (the tokenizer's chat template when it has one), none (base models), ruler "
        "(RULER's own template of the model's family, no system prompt), ruler:NAME (e.g. "
        "ruler:meta-llama3), or a file holding a Jinja chat template; recorded in results.json",
    )
    parser.add_argument(
        "--fill",
        choices=FILL_MODES,
        default="tight",
        help="tight: every prompt as long as fits (default); ruler: RULER's sizing (one probe "
        "sample per cell, whole steps of 500 words / 25 paragraphs / 10 documents; shorter "
        "prompts at 4k-8k); recorded in results.json",
    )
    parser.add_argument("--qa-squad", default=None, help="SQuAD dev JSON for qa_1 (e.g. dev-v2.0.json; no download)")
    parser.add_argument(
        "--qa-hotpot", default=None, help="HotpotQA dev JSON for qa_2 (e.g. hotpot_dev_distractor_v1.json; no download)"
    )
    # short-context retention through lm-evaluation-harness (--task short)
    parser.add_argument(
        "--short-tasks",
        default=None,
        metavar="NAME[:SHOTS[:METRIC]],...",
        help="lm-eval tasks for --task short (default: mmlu:5:acc, hellaswag:10:acc_norm, "
        "arc_challenge:25:acc_norm, piqa:0:acc, triviaqa:5:exact_match, winogrande:5:acc)",
    )
    parser.add_argument(
        "--lm-eval-include",
        default=None,
        metavar="DIR",
        help="a directory of your own lm-eval task YAML files (e.g. over local JSON data)",
    )
    parser.add_argument("--short-limit", type=int, default=None, help="score only the first N items of each short task")
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="RESULTS_OR_MODEL",
        help="the base model's results.json (or its directory), or the base model itself: adds a "
        "retention column (extended / base) to the short tasks",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size of a Hugging Face model")
    cli.add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_harpe.eval.evaluation import option_errors, run_evaluation  # light: torch comes later

    problem = option_errors(args)
    if problem:
        return cli.report_user_error(ValueError(problem))
    from megatron_harpe.eval.report import markdown_table

    try:
        results = run_evaluation(args)
    except ValueError as error:
        return cli.report_user_error(error)
    if not is_main_process():  # under torchrun every rank evaluates; rank 0 reports
        return 0
    print(markdown_table(results))
    print(f"\nwrote {args.output_dir}/results.json, results.md")
    return 0


def entry_point() -> int:
    """The console script: main() behind megatron_harpe.cli's front door."""
    return cli.run(main, gpu_note=True)


if __name__ == "__main__":
    sys.exit(entry_point())
