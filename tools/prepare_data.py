"""Prepare long-context training data: jsonl corpora -> length upsampling -> Megatron .bin/.idx.

Each stage runs alone or chained; every run writes `<output>.summary.json` and
`<output>.report.png` (tokens per source, share of tokens in long documents, skipped lines).

    # the offline demo: corpus from the Python stdlib, its sentencepiece tokenizer, dataset
    python tools/prepare_data.py demo --workdir work/demo

    # SlimPajama-style corpus, Fu et al. 2024's recipe: per-source upsampling to 6B tokens, Llama2 tokenizer
    python tools/prepare_data.py upsample --inputs slimpajama/ --output work/up.jsonl.zst \\
        --source-field meta.redpajama_set_name --total-tokens 6e9 --tokenizer llama2/tokenizer.model
    python tools/prepare_data.py tokenize --inputs work/up.jsonl.zst --output-prefix work/train \\
        --tokenizer llama2/tokenizer.model --shard-dir work/shards
    # or both in one pass (each document tokenized once)
    python tools/prepare_data.py all --inputs slimpajama/ --output-prefix work/train \\
        --source-field meta.redpajama_set_name --total-tokens 6e9 --tokenizer llama2/tokenizer.model

    # the other pieces
    python tools/prepare_data.py build-demo-corpus --output work/corpus.jsonl
    python tools/prepare_data.py train-tokenizer --inputs work/corpus.jsonl --output-prefix work/sp --vocab-size 4096
    python tools/prepare_data.py merge --inputs work/shards/shard-00000 work/shards/shard-00001 --output-prefix work/all
    python tools/prepare_data.py report --inputs raw.jsonl --compare work/up.jsonl.zst --tokenizer tok.model --output-prefix work/lengths

Bad lines (malformed JSON, missing fields, empty text, non-UTF-8 bytes, ids beyond the
vocabulary) are skipped, printed with file:line and counted; `--strict` stops at the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_harpe import cli
from megatron_harpe.data.jsonl import Document, FieldSpec, expand_inputs, parse_line, read_line_chunks


def _positive_tokens(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens (e.g. 6e9)") from error
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _add_input_options(parser: argparse.ArgumentParser, source_default: str | None = "source") -> None:
    parser.add_argument("--inputs", nargs="+", required=True, help="jsonl files (.gz/.zst too), directories or globs")
    parser.add_argument("--text-field", default="text", help="field holding the text; dotted paths reach nested keys")
    parser.add_argument("--source-field", default=source_default, help="field holding the source label, e.g. meta.redpajama_set_name")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores; 0 = in this process)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")


def _add_upsample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="per_source", choices=["per_source", "upsample_code_arxiv_book", "global", "none"])
    parser.add_argument("--total-tokens", type=_positive_tokens, default=None, help="token budget of the output, e.g. 6e9")
    parser.add_argument("--shares", default=None, help="per_source shares: name=weight,... or a JSON/YAML file (default: SlimPajama)")
    parser.add_argument("--length-threshold", type=int, default=4096, help="documents shorter than this are 'short'")
    parser.add_argument("--short-keep-probability", type=float, default=0.1)
    parser.add_argument("--length-estimate", choices=["tokens", "chars"], default="tokens",
                        help="measure lengths by tokenizing (default) or as characters / 3.68 (the published estimate)")
    parser.add_argument("--seed", type=int, default=1234)


def _add_tokenize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="BOS before every document")
    parser.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True,
                        help="EOS after every document (the loader finds document ends by it)")
    parser.add_argument("--vocab-size", type=int, default=None, help="largest valid id + 1 (default: the tokenizer's vocabulary)")


def _upsample_config(args: argparse.Namespace):
    from megatron_harpe.data.upsample import UpsampleConfig, parse_shares

    config = UpsampleConfig(mode=args.mode, total_tokens=args.total_tokens, shares=parse_shares(args.shares) if args.shares else None,
                            length_threshold=args.length_threshold, short_keep_probability=args.short_keep_probability, seed=args.seed)
    config.validate()
    return config


def _fields(args: argparse.Namespace) -> FieldSpec:
    """Modes that ignore sources (global, none) keep documents without one."""
    return FieldSpec(text_field=args.text_field, source_field=args.source_field or None,
                     source_optional=getattr(args, "mode", None) in ("global", "none"))


def _iter_texts(inputs: list[str], fields: FieldSpec, limit: int | None):
    count = 0
    for chunk in read_line_chunks(expand_inputs(inputs)):
        for offset, raw in enumerate(chunk.lines):
            parsed = parse_line(raw, fields, chunk.path, chunk.first_line_number + offset)
            if isinstance(parsed, Document):
                yield parsed.text
                count += 1
                if limit is not None and count >= limit:
                    return


def run(args: argparse.Namespace) -> dict | str:
    if args.command == "build-demo-corpus":
        from megatron_harpe.data.demo_corpus import build_demo_corpus

        return str(build_demo_corpus(args.output, overwrite=args.overwrite))
    if args.command == "train-tokenizer":
        from megatron_harpe.data.output_lock import output_lock
        from megatron_harpe.data.tokenizer import train_sentencepiece

        model = Path(f"{args.output_prefix}.model")
        with output_lock(model, "tokenizer"):
            if model.exists() and not args.overwrite:
                raise ValueError(f"{model} already exists: pass --overwrite to replace it")
            fields = FieldSpec(text_field=args.text_field, source_field=None)
            texts = _iter_texts(args.inputs, fields, args.max_documents)
            return str(train_sentencepiece(texts, args.output_prefix, args.vocab_size, overwrite=args.overwrite))
    if args.command == "demo":
        from megatron_harpe.data.demo_corpus import prepare_demo_data

        demo = prepare_demo_data(args.workdir, workers=args.workers)
        return {"corpus": str(demo.corpus), "tokenizer": str(demo.tokenizer), "prefix": demo.prefix, "summary": str(demo.summary)}

    from megatron_harpe.data import pipeline

    if args.command == "upsample":
        return pipeline.upsample_corpus(args.inputs, args.output, _upsample_config(args), tokenizer=args.tokenizer,
                                        length_measure=args.length_estimate, fields=_fields(args), workers=args.workers,
                                        strict=args.strict, overwrite=args.overwrite)
    if args.command == "tokenize":
        return pipeline.tokenize_corpus(args.inputs, args.output_prefix, args.tokenizer, fields=_fields(args),
                                        add_bos=args.bos, add_eos=args.eos, vocab_size=args.vocab_size, workers=args.workers,
                                        strict=args.strict, overwrite=args.overwrite, shard_dir=args.shard_dir)
    if args.command == "all":
        return pipeline.prepare(args.inputs, args.output_prefix, _upsample_config(args), args.tokenizer, fields=_fields(args),
                                length_measure=args.length_estimate, add_bos=args.bos, add_eos=args.eos,
                                vocab_size=args.vocab_size, workers=args.workers, strict=args.strict, overwrite=args.overwrite)
    if args.command == "merge":
        return pipeline.merge_corpus(args.inputs, args.output_prefix, overwrite=args.overwrite)
    if args.command == "report":
        return pipeline.corpus_report(args.inputs, args.output_prefix, compare=args.compare, tokenizer=args.tokenizer,
                                      length_measure=args.length_estimate, fields=_fields(args),
                                      long_threshold=args.length_threshold, workers=args.workers)
    raise AssertionError(args.command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="build the offline demo corpus, tokenizer and dataset (skips finished steps)")
    demo.add_argument("--workdir", required=True)
    demo.add_argument("--workers", type=int, default=None)

    corpus = commands.add_parser("build-demo-corpus", help="gather the demo corpus from the Python stdlib")
    corpus.add_argument("--output", required=True)
    corpus.add_argument("--overwrite", action="store_true")

    train = commands.add_parser("train-tokenizer", help="train a Llama-style sentencepiece model on jsonl text")
    train.add_argument("--inputs", nargs="+", required=True)
    train.add_argument("--text-field", default="text")
    train.add_argument("--output-prefix", required=True, help="writes <prefix>.model")
    train.add_argument("--vocab-size", type=int, default=4096)
    train.add_argument("--max-documents", type=int, default=None)
    train.add_argument("--overwrite", action="store_true")

    upsample = commands.add_parser("upsample", help="select documents by per-source length upsampling -> jsonl")
    _add_input_options(upsample)
    _add_upsample_options(upsample)
    upsample.add_argument("--tokenizer", default=None, help="for exact token lengths (not needed with --length-estimate chars)")
    upsample.add_argument("--output", required=True, help="output jsonl (.gz / .zst compress)")
    upsample.add_argument("--overwrite", action="store_true")

    tokenize = commands.add_parser("tokenize", help="tokenize jsonl -> Megatron .bin/.idx")
    _add_input_options(tokenize, source_default=None)
    _add_tokenize_options(tokenize)
    tokenize.add_argument("--tokenizer", required=True, help="sentencepiece .model, tokenizer.json or an HF model directory")
    tokenize.add_argument("--output-prefix", required=True)
    tokenize.add_argument("--shard-dir", default=None, help="one shard per input file here first (reused on rerun), then merged")
    tokenize.add_argument("--overwrite", action="store_true")

    both = commands.add_parser("all", help="upsample and tokenize in one pass -> Megatron .bin/.idx")
    _add_input_options(both)
    _add_upsample_options(both)
    _add_tokenize_options(both)
    both.add_argument("--tokenizer", required=True)
    both.add_argument("--output-prefix", required=True)
    both.add_argument("--overwrite", action="store_true")

    merge = commands.add_parser("merge", help="concatenate Megatron datasets (shards) into one")
    merge.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes, in order")
    merge.add_argument("--output-prefix", required=True)
    merge.add_argument("--overwrite", action="store_true")

    report = commands.add_parser("report", help="length statistics per source of a corpus (and of a second one)")
    _add_input_options(report)
    report.add_argument("--compare", nargs="+", default=None, help="a second corpus shown side by side (e.g. the upsampled one)")
    report.add_argument("--tokenizer", default=None)
    report.add_argument("--length-estimate", choices=["tokens", "chars"], default="tokens")
    report.add_argument("--length-threshold", type=int, default=4096)
    report.add_argument("--output-prefix", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except ValueError as error:
        return cli.report_user_error(error)
    if isinstance(result, dict):
        brief = {key: value for key, value in result.items() if key not in ("before", "after", "lengths", "stages")}
        print(json.dumps(brief, indent=2))
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
