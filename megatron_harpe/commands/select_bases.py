"""Choose HARPE per-head RoPE bases, print them as a config snippet, and plot their waveforms.

Runs one base strategy (megatron_harpe.position.bases) for a head count, head dimension, base
range and target length, prints a YAML `position:` block to paste into a config, and with
`--plot` draws the attention waveform A_b(D) of every chosen base over 0..target length
(Gaussian-smoothed, see megatron_harpe.position.waveform) above their combined coverage: the
band between the lowest and highest head at each distance, whose mean height / sqrt(d) is the
coverage score. `--compare` runs every strategy on the same range and ranks them by that score.

    harpe-select-bases --strategy paper --heads 32
    harpe-select-bases --strategy peak_valley --heads 32 --base-min 1e6 --base-max 5e6 --stride 3e4 --target-length 131072 --plot bases.png
    harpe-select-bases --strategy uniform --heads 32 --kv-groups 8 --base-min 1e6 --base-max 5e6
    harpe-select-bases --compare --heads 32 --target-length 131072 --plot compare.png

(`python tools/select_bases.py` is the same command.)
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_harpe import cli, files  # noqa: E402
from megatron_harpe.position.bases import (  # noqa: E402
    PAPER_BASE_MAX,
    PAPER_BASE_MIN,
    PAPER_STRIDE,
    STRATEGIES,
    StrategyOutcome,
    compare_strategies,
    select_bases,
)
from megatron_harpe.position.waveform import (  # noqa: E402
    attention_waveforms,
    coverage_band,
    coverage_score,
    default_smoothing,
    waveform_grid,
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for(__doc__)
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), help="base strategy (not with --compare)")
    parser.add_argument("--compare", action="store_true", help="run every strategy and rank them by coverage score")
    parser.add_argument("--heads", type=int, help="query heads (one base each unless --kv-groups is given)")
    parser.add_argument("--kv-groups", type=int, help="k/v groups under grouped-query attention: one base per group")
    parser.add_argument("--head-dim", type=int, default=128, help="dimension of an attention head (default 128)")
    parser.add_argument("--base-min", type=float, help=f"lowest base (the paper: {PAPER_BASE_MIN:g})")
    parser.add_argument("--base-max", type=float, help=f"highest base (the paper: {PAPER_BASE_MAX:g})")
    parser.add_argument("--stride", type=float, help=f"peak_valley candidate stride (the paper: {PAPER_STRIDE:g})")
    parser.add_argument(
        "--order",
        choices=["ascending", "descending"],
        default="ascending",
        help="bases from the first head to the last (default ascending)",
    )
    parser.add_argument("--value", type=float, help="constant: the base of every head")
    parser.add_argument("--values", help="explicit: comma-separated bases, one per head or k/v group")
    parser.add_argument("--target-length", type=int, default=131072, help="distances 0..this are searched and plotted")
    parser.add_argument("--peak-window", type=float, help="peak_valley: half-window in tokens (default target/128)")
    parser.add_argument("--smoothing", type=float, help="Gaussian smoothing in tokens (default target/2048)")
    parser.add_argument("--plot", type=Path, help="write the waveform / coverage figure to this PNG")
    cli.add_overwrite(parser, "an existing --plot file")
    cli.add_common_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare == (args.strategy is not None):
        parser.error("give either --strategy NAME or --compare")
    if args.heads is None and args.kv_groups is None:
        parser.error("give --heads (and --kv-groups under grouped-query attention)")
    if args.heads is not None and args.kv_groups is not None and (args.kv_groups < 1 or args.heads % args.kv_groups):
        parser.error(f"--heads {args.heads} must be a multiple of --kv-groups {args.kv_groups}")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot {args.plot} must end in .png")
    if args.plot is not None and args.plot.exists() and not args.overwrite:
        parser.error(f"--plot {args.plot} already exists: pass --overwrite to replace it or choose another path")
    return args


def parse_values(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(item) for item in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--values {text!r} must be numbers separated by commas, e.g. 1e6,2e6,3e6") from None


def yaml_snippet(bases: list[float], heads: int | None, kv_groups: int | None) -> str:
    """A `position:` block for a config, with the bases as one flow-style list."""
    lines = ["position:", "  type: harpe"]
    if kv_groups is not None and heads is not None and kv_groups != heads:
        lines.append(f"  gqa_bases: per_group    # one base per k/v group, shared by {heads // kv_groups} query heads")
    lines.append("  bases: [" + ", ".join(repr(float(b)) for b in bases) + "]")
    return "\n".join(lines)


def save_png(figure, path: Path) -> None:
    """Write the figure under a temporary name next to `path`, then rename it into place."""
    files.save_figure(figure, path, dpi=120)


def plot_bases(bases: list[float], title: str, head_dim: int, target: int, smoothing: float, path: Path) -> None:
    """Top: each base's smoothed waveform. Bottom: the band between lowest and highest head."""
    plt = cli.pyplot()
    grid = waveform_grid(target, smoothing)
    distinct = sorted(set(bases))
    waves = attention_waveforms(distinct, head_dim, grid, smoothing)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    shade = plt.Normalize(vmin=distinct[0], vmax=max(distinct[-1], distinct[0] * (1 + 1e-9)))
    for base, wave in zip(distinct, waves):
        top.plot(grid, wave, color=plt.cm.viridis(shade(base)), linewidth=0.7)
    top.set_ylabel("A_b(D), smoothed")
    top.set_title(f"{title}: {len(bases)} bases, d={head_dim}, Gaussian smoothing {smoothing:g} tokens")
    bottom.fill_between(grid, waves.min(axis=0), waves.max(axis=0), alpha=0.4, label="lowest..highest head")
    bottom.plot(grid, waves.mean(axis=0), color="black", linewidth=0.8, label="mean over heads")
    score = coverage_score(bases, head_dim, target, smoothing)
    bottom.set_title(f"combined coverage (score {score:.4f} = mean band height / sqrt(d))")
    bottom.set_xlabel("distance D (tokens)")
    bottom.legend(fontsize=8)
    figure.colorbar(plt.cm.ScalarMappable(norm=shade, cmap="viridis"), ax=(top, bottom), label="base of a head")
    save_png(figure, path)


def plot_comparison(outcomes: list[StrategyOutcome], head_dim: int, target: int, smoothing: float, path: Path) -> None:
    """One coverage band per strategy that ran, stacked, same axes."""
    plt = cli.pyplot()
    ran = [outcome for outcome in outcomes if outcome.bases is not None]
    figure, axes = plt.subplots(len(ran), 1, figsize=(11, 1.8 * len(ran) + 1), sharex=True, sharey=True, squeeze=False)
    for axis, outcome in zip(axes[:, 0], ran):
        grid, lowest, highest = coverage_band(outcome.bases, head_dim, target, smoothing)
        axis.fill_between(grid, lowest, highest, alpha=0.5)
        axis.plot(grid, highest, linewidth=0.4)  # keeps a zero-width band (one shared base) visible
        axis.set_title(f"{outcome.label}: coverage {outcome.coverage:.4f}", fontsize=9)
    axes[-1, 0].set_xlabel("distance D (tokens)")
    figure.tight_layout()
    save_png(figure, path)


def run(args: argparse.Namespace) -> str:
    """Everything but argument parsing; returns the text to print. Raises ValueError on bad input."""
    count = args.kv_groups if args.kv_groups is not None else args.heads
    values = parse_values(args.values)
    smoothing = default_smoothing(args.target_length) if args.smoothing is None else args.smoothing
    if args.compare:
        base_min = PAPER_BASE_MIN if args.base_min is None else args.base_min
        base_max = PAPER_BASE_MAX if args.base_max is None else args.base_max
        stride = PAPER_STRIDE if args.stride is None else args.stride
        outcomes = compare_strategies(
            count, base_min=base_min, base_max=base_max, stride=stride, head_dim=args.head_dim,
            max_distance=args.target_length, value=args.value, values=values,
            peak_window=args.peak_window, smoothing=args.smoothing,
        )  # fmt: skip
        lines = [
            f"# {count} bases, range {base_min:g}..{base_max:g}, stride {stride:g}, d={args.head_dim}, "
            f"distances 0..{args.target_length}",
            "# coverage = mean over D of (highest - lowest head's smoothed waveform) / sqrt(d)",
            f"{'strategy':<20} {'coverage':>9} {'distinct':>8} {'lowest':>12} {'highest':>12}",
        ]
        ranked = sorted(outcomes, key=lambda o: -1.0 if o.coverage is None else o.coverage, reverse=True)
        for outcome in ranked:
            if outcome.bases is None:
                lines.append(f"{outcome.label:<20} {'n/a':>9}  {outcome.problem}")
            else:
                lines.append(
                    f"{outcome.label:<20} {outcome.coverage:>9.4f} {len(set(outcome.bases)):>8} "
                    f"{min(outcome.bases):>12.6g} {max(outcome.bases):>12.6g}"
                )
        if args.plot is not None:
            plot_comparison(outcomes, args.head_dim, args.target_length, smoothing, args.plot)
        return "\n".join(lines)
    bases = select_bases(
        args.strategy, count, base_min=args.base_min, base_max=args.base_max, stride=args.stride,
        order=args.order, value=args.value, values=values, head_dim=args.head_dim,
        max_distance=args.target_length, peak_window=args.peak_window, smoothing=args.smoothing,
    )  # fmt: skip
    score = coverage_score(bases, args.head_dim, args.target_length, smoothing)
    header = f"# strategy {args.strategy}: coverage {score:.4f} over distances 0..{args.target_length}"
    if args.plot is not None:
        plot_bases(bases, f"strategy {args.strategy}", args.head_dim, args.target_length, smoothing, args.plot)
    return header + "\n" + yaml_snippet(bases, args.heads, args.kv_groups)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except ValueError as error:
        return cli.report_user_error(error)
    if args.plot is not None:
        print(f"# figure written to {args.plot}", file=sys.stderr)
    return 0


def entry_point() -> int:
    """The console script: main() behind megatron_harpe.cli's front door."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(entry_point())
