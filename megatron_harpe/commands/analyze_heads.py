"""How far each attention head reaches, plotted against its RoPE base (issue 8).

For a trained model and some long documents, measures per layer and head the mean attended
distance sum_k p(q,k) * (q-k) and the share of attention mass further back than each threshold,
over the queries in the second half of each document (or from --min-query-position on), and
plots them against the head's base: do small-base heads stay local and large-base heads reach
far? (megatron_harpe.eval.analysis.heads defines the measure and how it is captured.)

    harpe-analyze-heads --model runs/demo_cpu/checkpoints --documents runs/demo_cpu/data/demo_text_document --length 512 --num-documents 8 --thresholds 64,256 --output-dir runs/demo_cpu/heads
    harpe-analyze-heads --model exports/harpe_hf --trust-remote-code --documents long_docs.jsonl --length 32k --num-documents 4 --output-dir heads_32k
    torchrun --nproc-per-node 2 tools/analyze_heads.py --model ckpt/harpe --tensor-parallel 2 --documents long_docs.jsonl --output-dir heads_tp2

(`python tools/analyze_heads.py` is the same command.)

--model: a megatron_harpe checkpoint directory or a Hugging Face model directory (stock Llama:
one base `rope_theta` for all heads; our HARPE export: `rope_bases`). --documents: .jsonl[.zst]
(field --text-key), .txt, or a Megatron dataset prefix; documents shorter than --length are
skipped. Writes head_analysis.json (per layer x head: base, mean distance, shares, first-token
mass; correlations), distance_vs_base.png and distance_heatmap.png to --output-dir, and prints
a table per base with the Pearson (log base) / Spearman correlation of base and mean distance.
Tensor parallelism is supported under torchrun; context parallelism is not (use 1).
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np  # noqa: E402

from megatron_harpe import cli, files  # noqa: E402
from megatron_harpe.eval.suite import parse_token_counts  # noqa: E402

if TYPE_CHECKING:  # head_analysis imports torch: not for --help
    from megatron_harpe.eval.analysis.heads import HeadAnalysis


def single_count(text: str) -> int:
    values = parse_token_counts(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one token count, got {text!r}")
    return values[0]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for(__doc__)
    cli.add_model(parser)
    parser.add_argument("--documents", required=True, help=".jsonl[.zst], .txt or Megatron dataset prefix")
    parser.add_argument("--length", type=single_count, default=2048, help="tokens per document analysed (2048, 32k)")
    parser.add_argument("--num-documents", type=int, default=4, help="documents with at least --length tokens")
    parser.add_argument(
        "--thresholds",
        type=parse_token_counts,
        default=None,
        help="report the attention share further back than these distances (e.g. 64,256 for "
        "short demo contexts; default 4096,32768)",
    )
    parser.add_argument(
        "--min-query-position",
        type=int,
        default=None,
        help="only queries at this position or later count (default: length // 2)",
    )
    cli.add_output_dir(parser, default="head_analysis", help="where the JSON and PNGs go")
    cli.add_overwrite(parser, "an earlier analysis in --output-dir")
    cli.add_text_key(parser)
    cli.add_model_backend(
        parser, tokenizer="replaces the model's own", context="must be 1: not supported by the analysis"
    )
    parser.add_argument(
        "--max-block-elements",
        type=int,
        default=None,
        help="attention scores computed at once (memory: about 4 bytes x 4 x this; default 2^24)",
    )
    cli.add_progress(parser)
    cli.add_common_flags(parser)
    return parser


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_figure(figure, path: Path) -> None:
    files.save_figure(figure, path, dpi=120)


def reachable_threshold(analysis: HeadAnalysis) -> int | None:
    """The largest threshold a query of this analysis can lie beyond (None: none can)."""
    reachable = [t for t in analysis.thresholds if t < analysis.length - 1]
    return max(reachable) if reachable else None


def correlation_text(analysis: HeadAnalysis) -> str:
    correlation = analysis.correlation()
    if correlation["spearman"] is None:
        return "correlation base vs mean distance: undefined (one base for all heads, or constant distances)"
    return (
        f"correlation base vs mean distance over {correlation['points']} (layer, head) points: "
        f"Pearson (log10 base) {correlation['pearson_log_base']:+.3f}, Spearman {correlation['spearman']:+.3f}"
    )


def plot_distance_vs_base(analysis: HeadAnalysis, path: Path) -> None:
    """Mean attended distance (and the share beyond the largest reachable threshold) against
    each head's base: one point per (layer, head), coloured by layer; black: mean per base."""
    plt = cli.pyplot()
    threshold = reachable_threshold(analysis)
    panels = 1 if threshold is None else 2
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    layers = analysis.mean_distance.size(0)
    bases = np.array(analysis.bases)
    colour = plt.cm.viridis(np.linspace(0, 1, max(layers, 2)))
    by_base = analysis.by_base()
    series = [("mean attended distance (tokens)", analysis.mean_distance, "mean_distance")]
    if threshold is not None:
        series.append(
            (
                f"share of attention beyond {threshold} tokens",
                analysis.share_beyond[threshold],
                f"share_beyond_{threshold}",
            )
        )
    for axis, (label, values, key) in zip(axes[0], series):
        for layer in range(layers):
            axis.scatter(bases, values[layer].numpy(), s=18, color=colour[layer], alpha=0.8, label=f"layer {layer}")
        axis.plot(
            [row["base"] for row in by_base],
            [row[key] for row in by_base],
            color="black",
            marker="x",
            linewidth=1,
            label="mean per base",
        )
        axis.set_xscale("log")
        axis.set_xlabel("RoPE base of the head")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    if layers <= 12:
        axes[0][0].legend(fontsize=7)
    figure.suptitle(
        f"{analysis.model}: {analysis.documents} documents x {analysis.length} tokens, queries from "
        f"position {analysis.min_query_position}\n{correlation_text(analysis)}",
        fontsize=9,
    )
    figure.tight_layout()
    save_figure(figure, path)


def plot_heatmaps(analysis: HeadAnalysis, path: Path) -> None:
    """Layer x head maps of the mean distance (and the share beyond the largest reachable
    threshold); head labels carry their bases."""
    plt = cli.pyplot()
    threshold = reachable_threshold(analysis)
    maps = [("mean attended distance", analysis.mean_distance.numpy())]
    if threshold is not None:
        maps.append((f"share beyond {threshold} tokens", analysis.share_beyond[threshold].numpy()))
    layers, heads = analysis.mean_distance.shape
    figure, axes = plt.subplots(
        1, len(maps), figsize=(max(5.0, 0.45 * heads + 2.5) * len(maps), 0.35 * layers + 2.5), squeeze=False
    )
    labels = [f"{head}\n{base:.3g}" for head, base in enumerate(analysis.bases)]
    for axis, (title, values) in zip(axes[0], maps):
        image = axis.imshow(values, aspect="auto", cmap="magma", origin="lower")
        figure.colorbar(image, ax=axis)
        axis.set_title(title, fontsize=10)
        axis.set_xticks(range(heads), labels, fontsize=6)
        axis.set_yticks(range(layers))
        axis.set_xlabel("head / base")
        axis.set_ylabel("layer")
    figure.tight_layout()
    save_figure(figure, path)


def by_base_table(analysis: HeadAnalysis) -> str:
    thresholds = list(analysis.thresholds)
    header = "| base | heads | mean distance | " + " | ".join(f"> {t}" for t in thresholds) + " | first token |"
    lines = [header, "|" + "---|" * (4 + len(thresholds))]
    for row in analysis.by_base():
        shares = " | ".join(f"{row[f'share_beyond_{t}']:.3f}" for t in thresholds)
        lines.append(
            f"| {row['base']:.4g} | {row['heads']} | {row['mean_distance']:.1f} | {shares} | "
            f"{row['first_token_mass']:.3f} |"
        )
    return "\n".join(lines)


def write_outputs(analysis: HeadAnalysis, output_dir: Path) -> list[Path]:
    summary = analysis.to_dict()
    summary["unreachable_thresholds"] = [t for t in analysis.thresholds if t >= analysis.length - 1]
    json_path = output_dir / "head_analysis.json"
    files.write_json(json_path, summary, indent=1)
    scatter, heatmap = output_dir / "distance_vs_base.png", output_dir / "distance_heatmap.png"
    plot_distance_vs_base(analysis, scatter)
    plot_heatmaps(analysis, heatmap)
    return [json_path, scatter, heatmap]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_harpe.eval.analysis.heads import (
        DEFAULT_CHUNK_ELEMENTS,
        DEFAULT_THRESHOLDS,
        analyze_heads,
        check_request,
    )
    from megatron_harpe.eval.backends import load_backend
    from megatron_harpe.eval.perplexity import load_documents

    args.thresholds = list(DEFAULT_THRESHOLDS) if args.thresholds is None else args.thresholds
    args.max_block_elements = args.max_block_elements or DEFAULT_CHUNK_ELEMENTS
    try:
        if args.context_parallel != 1:
            raise ValueError(
                "the head analysis does not support context parallelism (each CP rank would see part "
                "of the keys): use --context-parallel 1, and --tensor-parallel to split a large model"
            )
        check_request(args.length, args.min_query_position, args.thresholds)
        cli.refuse_existing(Path(args.output_dir) / "head_analysis.json", args.overwrite, "head analysis")
        if args.num_documents < 1:
            raise ValueError(f"--num-documents {args.num_documents} must be at least 1")
        if args.model in ("oracle", "random"):
            raise ValueError(f"--model {args.model} is a synthetic backend without attention: pass a model directory")
        backend = load_backend(
            args.model,
            tokenizer=args.tokenizer,
            trust_remote_code=args.trust_remote_code,
            device=args.device,
            dtype=args.dtype,
            tensor_parallel=args.tensor_parallel,
            context_parallel=args.context_parallel,
        )
        documents = load_documents(
            args.documents, backend.tokenizer, args.text_key, args.num_documents, min_tokens=args.length
        )
        analysis = analyze_heads(
            backend,
            documents,
            args.length,
            args.thresholds,
            args.min_query_position,
            args.max_block_elements,
            progress=cli.show_progress(args.no_progress) and is_main_process(),
        )
    except ValueError as error:
        return cli.report_user_error(error)
    if not is_main_process():  # under torchrun every rank measures its heads; rank 0 reports
        return 0
    paths = write_outputs(analysis, Path(args.output_dir))
    print(
        f"{analysis.model}: {analysis.documents} documents x {analysis.length} tokens, queries from position "
        f"{analysis.min_query_position}, position encoding {analysis.position}\n"
    )
    print(by_base_table(analysis))
    print("\n" + correlation_text(analysis))
    unreachable = [t for t in analysis.thresholds if t >= analysis.length - 1]
    if unreachable:
        print(
            f"note: no query is further than {analysis.length - 1} tokens from a key, so the shares beyond "
            f"{unreachable} are 0 by construction: pass smaller --thresholds (e.g. 64,256) or a larger --length"
        )
    print("\nwrote " + ", ".join(str(path) for path in paths))
    return 0


def entry_point() -> int:
    """The console script: main() behind megatron_harpe.cli's front door."""
    return cli.run(main, gpu_note=True)


if __name__ == "__main__":
    sys.exit(entry_point())
