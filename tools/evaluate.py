"""Evaluate a model on long-context retrieval and perplexity (SPEC.md section 4).

    python tools/evaluate.py --model exports/harpe_hf --trust-remote-code \
        --task niah,passkey --lengths 4096,8192,16384 --samples 10 --output-dir eval_out
    python tools/evaluate.py --model exports/harpe_hf --task needle_grid --lengths 1024,2048,4096
    python tools/evaluate.py --model exports/harpe_hf --task ppl --lengths 4096,8192 \
        --ppl-data data/long_docs.jsonl --ppl-stride 256
    python tools/evaluate.py --model oracle --tokenizer exports/harpe_hf --task niah --lengths 4096
    python tools/evaluate.py --model exports/instruct_hf --task ruler --lengths 4k,8k \
        --qa-squad squad_dev_v2.json --qa-hotpot hotpot_dev_distractor_v1.json   # all 13 RULER tasks

    python tools/evaluate.py --model exports/llama2_hf --task niah --lengths 16k --self-extend window=1024,group=32

--model takes a Hugging Face directory, a megatron_harpe checkpoint directory, or the synthetic
"oracle" / "random" backends (harness checks: they must score 100 and about 0). Writes
results.json, results.md and PNG plots to --output-dir and prints the Markdown table. Under
torchrun (a checkpoint sharded with --tensor-parallel / --context-parallel) every rank evaluates
and rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import sys

from megatron_harpe import cli
from megatron_harpe.eval.perplexity import DEFAULT_STRIDE
from megatron_harpe.eval.suite import (
    ALL_TASKS,
    DEFAULT_GRID_DEPTHS,
    DEFAULT_SAMPLES,
    SCORING_METHODS,
    expand_tasks,
    parse_token_counts,
    run_eval_suite,
)


def _self_extend_argument(text: str):
    """argparse type for --self-extend; imports torch only when the option is given."""
    from megatron_harpe.eval.self_extend import parse_self_extend_argument

    return parse_self_extend_argument(text)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="HF model dir, megatron_harpe checkpoint dir, 'oracle' or 'random'")
    parser.add_argument("--task", required=True,
                        help=f"comma-separated: ruler (all 13), niah (all 8), {', '.join(ALL_TASKS)}")
    parser.add_argument("--lengths", required=True, type=parse_token_counts,
                        help="context lengths in tokens: 4096,8192 or 4k,8k")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="samples per task and length (per grid cell); the default 100 keeps a cell's 95%% "
                             "Wilson interval within +-10 points at any score (RULER uses 500: +-4.4)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the generated samples")
    parser.add_argument("--output-dir", default="eval_results", help="where results.json/.md and plots go")
    parser.add_argument("--scoring", choices=SCORING_METHODS, default="auto",
                        help="generate (greedy decoding + string match), teacher_forcing, or auto "
                             "(generate when the backend can)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer budget and generation limit (default: 128 for NIAH, 32 for passkey/grid)")
    parser.add_argument("--haystack-file", default=None, help="UTF-8 prose replacing the default haystack")
    parser.add_argument("--grid-depths", type=parse_token_counts, default=list(DEFAULT_GRID_DEPTHS),
                        help="needle depths in percent for needle_grid")
    parser.add_argument("--ppl-data", default=None, help="documents for ppl: .jsonl[.zst], .txt or Megatron prefix")
    parser.add_argument("--ppl-text-key", default="text", help="jsonl field holding the text")
    parser.add_argument("--ppl-stride", type=int, default=DEFAULT_STRIDE, help="sliding-window stride in tokens")
    parser.add_argument("--ppl-max-documents", type=int, default=20, help="documents read for ppl")
    parser.add_argument("--ppl-document-tokens", type=int, default=None,
                        help="score up to this many tokens per document (default: the length itself)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (required for oracle/random)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (HARPE export)")
    parser.add_argument("--device", default="cpu", help="torch device of the HF backend")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (HF backend)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="megatron backend: TP size")
    parser.add_argument("--context-parallel", type=int, default=1, help="megatron backend: CP size")
    parser.add_argument("--self-extend", type=_self_extend_argument, default=None, metavar="window=W,group=G",
                        help="Self-Extend grouped attention at evaluation time (paper: window=1024,group=32), "
                             "any RoPE model on either backend")
    parser.add_argument("--allow-nonfinite", action="store_true", help="evaluate a model whose weights hold NaN/inf")
    parser.add_argument("--save-predictions", action="store_true", help="also write predictions.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # RULER comparability: prompt template and the QA data of qa_1 / qa_2
    parser.add_argument("--chat-template", default="auto",
                        help="auto (the tokenizer's chat template when it has one), none (base models), or a "
                             "file holding a Jinja chat template; recorded in results.json")
    parser.add_argument("--qa-squad", default=None, help="SQuAD dev JSON for qa_1 (e.g. dev-v2.0.json; no download)")
    parser.add_argument("--qa-hotpot", default=None,
                        help="HotpotQA dev JSON for qa_2 (e.g. hotpot_dev_distractor_v1.json; no download)")
    cli.add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_harpe.eval.backends import load_backend  # torch, transformers: not for --help
    from megatron_harpe.eval.perplexity import load_documents
    from megatron_harpe.eval.report import markdown_table, write_report

    try:
        requested = [name.strip() for name in args.task.split(",") if name.strip()]
        tasks = expand_tasks(requested)
        backend = load_backend(
            args.model, tokenizer=args.tokenizer, trust_remote_code=args.trust_remote_code, device=args.device,
            dtype=args.dtype, seed=args.seed, tensor_parallel=args.tensor_parallel,
            context_parallel=args.context_parallel, self_extend=args.self_extend,
        )
        if getattr(backend, "model", None) is not None and not args.allow_nonfinite:
            from megatron_harpe.convert.finite import refuse_nonfinite_everywhere

            refuse_nonfinite_everywhere(backend.model, f"model {args.model}")  # scores of NaN weights mean nothing
        documents = None
        if "ppl" in tasks:
            if not args.ppl_data:
                raise ValueError("--task ppl needs --ppl-data (a .jsonl, .txt or Megatron dataset prefix)")
            documents = load_documents(args.ppl_data, backend.tokenizer, args.ppl_text_key,
                                       args.ppl_max_documents, min_tokens=min(args.lengths))
        qa_files = {task: path for task, path in (("qa_1", args.qa_squad), ("qa_2", args.qa_hotpot)) if path}
        results = run_eval_suite(
            backend, requested, args.lengths, samples=args.samples, seed=args.seed, scoring=args.scoring,
            max_new_tokens=args.max_new_tokens, haystack_file=args.haystack_file,
            grid_depths=tuple(args.grid_depths), ppl_documents=documents, ppl_stride=args.ppl_stride,
            ppl_document_tokens=args.ppl_document_tokens, keep_records=args.save_predictions,
            progress=not args.no_progress and is_main_process(),
            chat_template=args.chat_template, qa_files=qa_files,
        )
    except ValueError as error:
        return cli.report_user_error(error)
    if not is_main_process():  # under torchrun every rank evaluates; rank 0 reports
        return 0
    paths = write_report(results, args.output_dir)
    print(markdown_table(results))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, gpu_note=True))
