"""Prepare long-context training data: jsonl corpora -> length upsampling -> Megatron .bin/.idx.

Each stage runs alone or chained; every run writes `<output>.summary.json` and
`<output>.report.png` (tokens per source, share of tokens in long documents, skipped lines).

    # the offline demo: corpus from the Python stdlib, its sentencepiece tokenizer, dataset
    harpe-prepare-data demo --output-dir work/demo

    # SlimPajama-style corpus: per-source upsampling to 6B tokens, Llama2 tokenizer
    harpe-prepare-data upsample --inputs slimpajama/ --output work/up.jsonl.zst --source-key meta.redpajama_set_name --total-tokens 6e9 --tokenizer llama2/tokenizer.model
    harpe-prepare-data tokenize --inputs work/up.jsonl.zst --output work/train --tokenizer llama2/tokenizer.model --shard-dir work/shards
    # or both in one pass (each document tokenized once)
    harpe-prepare-data all --inputs slimpajama/ --output work/train --source-key meta.redpajama_set_name --total-tokens 6e9 --tokenizer llama2/tokenizer.model

    # the other pieces
    harpe-prepare-data build-demo-corpus --output work/corpus.jsonl
    harpe-prepare-data train-tokenizer --inputs work/corpus.jsonl --output work/sp --vocab-size 4096
    harpe-prepare-data merge --inputs work/shards/shard-00000 work/shards/shard-00001 --output work/all
    harpe-prepare-data report --inputs raw.jsonl --compare work/up.jsonl.zst --tokenizer tok.model --output work/lengths

(`python tools/prepare_data.py` is the same command.) A dataset --output is a prefix: PREFIX.bin,
PREFIX.idx, PREFIX.summary.json and PREFIX.report.png. Progress (with an ETA) shows on a terminal.

Bad lines (malformed JSON, missing fields, empty text, non-UTF-8 bytes, ids beyond the
vocabulary) are skipped, printed with file:line and counted; `--strict` stops at the first.
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

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
    cli.add_text_key(parser)
    parser.add_argument(
        "--source-key",
        default=source_default,
        help=(
            f"jsonl field holding the source label, e.g. meta.redpajama_set_name (default: {source_default or 'none'})"
        ),
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores; 0 = in this process)"
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")


def _add_upsample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        default="per_source",
        choices=["per_source", "upsample_code_arxiv_book", "global", "none"],
        help="upsampling rule: per_source (default: each source to its share), upsample_code_arxiv_book, "
        "global (one rule for all), none (keep every document)",
    )
    parser.add_argument(
        "--total-tokens", type=_positive_tokens, default=None, help="token budget of the output, e.g. 6e9"
    )
    parser.add_argument(
        "--shares", default=None, help="per_source shares: name=weight,... or a JSON/YAML file (default: SlimPajama)"
    )
    parser.add_argument("--length-threshold", type=int, default=4096, help="documents shorter than this are 'short'")
    parser.add_argument(
        "--short-keep-probability", type=float, default=0.1, help="chance a short document is kept (default 0.1)"
    )
    parser.add_argument(
        "--length-estimate",
        choices=["tokens", "chars"],
        default="tokens",
        help="measure lengths by tokenizing (default) or as characters / 3.68 (the published estimate)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampling (default 1234)")


def _add_tokenize_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="BOS before every document")
    parser.add_argument(
        "--eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EOS after every document (the loader finds document ends by it)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="largest valid id + 1 (default: the tokenizer's vocabulary)"
    )


def _upsample_config(args: argparse.Namespace):
    from megatron_harpe.data.upsample import UpsampleConfig, parse_shares

    config = UpsampleConfig(
        mode=args.mode,
        total_tokens=args.total_tokens,
        shares=parse_shares(args.shares) if args.shares else None,
        length_threshold=args.length_threshold,
        short_keep_probability=args.short_keep_probability,
        seed=args.seed,
    )
    config.validate()
    return config


def _fields(args: argparse.Namespace) -> FieldSpec:
    """Modes that ignore sources (global, none) keep documents without one."""
    return FieldSpec(
        text_field=args.text_key,
        source_field=args.source_key or None,
        source_optional=getattr(args, "mode", None) in ("global", "none"),
    )


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

        model = Path(f"{args.output}.model")
        with output_lock(model, "tokenizer"):
            if model.exists() and not args.overwrite:
                raise ValueError(f"{model} already exists: pass --overwrite to replace it")
            fields = FieldSpec(text_field=args.text_key, source_field=None)
            texts = _iter_texts(args.inputs, fields, args.max_documents)
            return str(train_sentencepiece(texts, args.output, args.vocab_size, overwrite=args.overwrite))
    if args.command == "demo":
        from megatron_harpe.data.demo_corpus import prepare_demo_data

        demo = prepare_demo_data(args.output_dir, workers=args.workers)
        return {
            "corpus": str(demo.corpus),
            "tokenizer": str(demo.tokenizer),
            "prefix": demo.prefix,
            "summary": str(demo.summary),
        }

    from megatron_harpe.data import pipeline

    progress = cli.show_progress(getattr(args, "no_progress", False))
    if args.command == "upsample":
        return pipeline.upsample_corpus(
            args.inputs,
            args.output,
            _upsample_config(args),
            tokenizer=args.tokenizer,
            length_measure=args.length_estimate,
            fields=_fields(args),
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=progress,
        )
    if args.command == "tokenize":
        return pipeline.tokenize_corpus(
            args.inputs,
            args.output,
            args.tokenizer,
            fields=_fields(args),
            add_bos=args.bos,
            add_eos=args.eos,
            vocab_size=args.vocab_size,
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            shard_dir=args.shard_dir,
            progress=progress,
        )
    if args.command == "all":
        return pipeline.prepare(
            args.inputs,
            args.output,
            _upsample_config(args),
            args.tokenizer,
            fields=_fields(args),
            length_measure=args.length_estimate,
            add_bos=args.bos,
            add_eos=args.eos,
            vocab_size=args.vocab_size,
            workers=args.workers,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=progress,
        )
    if args.command == "merge":
        return pipeline.merge_corpus(args.inputs, args.output, overwrite=args.overwrite)
    if args.command == "report":
        return pipeline.corpus_report(
            args.inputs,
            args.output,
            compare=args.compare,
            tokenizer=args.tokenizer,
            length_measure=args.length_estimate,
            fields=_fields(args),
            long_threshold=args.length_threshold,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=progress,
        )
    raise AssertionError(args.command)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for(__doc__)
    cli.add_common_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="build the offline demo corpus, tokenizer and dataset (skips finished steps)"
    )
    cli.add_output_dir(demo, required=True, help="where the corpus, tokenizer and dataset go")
    demo.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")

    corpus = commands.add_parser("build-demo-corpus", help="gather the demo corpus from the Python stdlib")
    cli.add_output(corpus, help="the jsonl file to write")
    cli.add_overwrite(corpus, "an existing --output")

    train = commands.add_parser("train-tokenizer", help="train a Llama-style sentencepiece model on jsonl text")
    train.add_argument("--inputs", nargs="+", required=True, help="jsonl files (.gz/.zst too), directories or globs")
    cli.add_text_key(train)
    cli.add_output(train, help="model prefix: writes OUTPUT.model")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    train.add_argument("--max-documents", type=int, default=None, help="train on at most this many documents")
    cli.add_overwrite(train, "an existing OUTPUT.model")

    upsample = commands.add_parser("upsample", help="select documents by per-source length upsampling -> jsonl")
    _add_input_options(upsample)
    _add_upsample_options(upsample)
    cli.add_tokenizer(upsample, help="for exact token lengths (not needed with --length-estimate chars)")
    cli.add_output(upsample, help="output jsonl (.gz / .zst compress)")
    cli.add_overwrite(upsample, "an existing --output")
    cli.add_progress(upsample)

    tokenize = commands.add_parser("tokenize", help="tokenize jsonl -> Megatron .bin/.idx")
    _add_input_options(tokenize, source_default=None)
    _add_tokenize_options(tokenize)
    cli.add_tokenizer(tokenize, required=True)
    cli.add_output(tokenize, help="dataset prefix: writes OUTPUT.bin/.idx/.summary.json/.report.png")
    tokenize.add_argument(
        "--shard-dir", default=None, help="one shard per input file here first (reused on rerun), then merged"
    )
    cli.add_overwrite(tokenize, "an existing dataset (and shards made with other settings)")
    cli.add_progress(tokenize)

    both = commands.add_parser("all", help="upsample and tokenize in one pass -> Megatron .bin/.idx")
    _add_input_options(both)
    _add_upsample_options(both)
    _add_tokenize_options(both)
    cli.add_tokenizer(both, required=True)
    cli.add_output(both, help="dataset prefix: writes OUTPUT.bin/.idx/.summary.json/.report.png")
    cli.add_overwrite(both, "an existing dataset")
    cli.add_progress(both)

    merge = commands.add_parser("merge", help="concatenate Megatron datasets (shards) into one")
    merge.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes, in order")
    cli.add_output(merge, help="dataset prefix of the merged dataset")
    cli.add_overwrite(merge, "an existing dataset")

    report = commands.add_parser("report", help="length statistics per source of a corpus (and of a second one)")
    _add_input_options(report)
    report.add_argument(
        "--compare", nargs="+", default=None, help="a second corpus shown side by side (e.g. the upsampled one)"
    )
    cli.add_tokenizer(report, help="for token lengths (not needed with --length-estimate chars)")
    report.add_argument(
        "--length-estimate",
        choices=["tokens", "chars"],
        default="tokens",
        help="measure lengths by tokenizing (default) or as characters / 3.68",
    )
    report.add_argument("--length-threshold", type=int, default=4096, help="documents shorter than this are 'short'")
    cli.add_output(report, help="report prefix: writes OUTPUT.summary.json and OUTPUT.report.png")
    cli.add_overwrite(report, "an existing report")
    cli.add_progress(report)
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


def entry_point() -> int:
    """The console script: main() behind megatron_harpe.cli's front door."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(entry_point())
