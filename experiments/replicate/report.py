"""Results of the CPU replication: aggregate the `tools/evaluate.py` outputs of every run into a
table (mean and spread over seeds, per method and length), accuracy by needle depth, a plot,
and a JSON summary.

    python experiments/replicate/report.py --eval-dir runs/replicate/eval --output experiments/replicate/results

Spread is the sample standard deviation over seeds (each seed has its own base model, data
order and initialisation, and its own extensions). Depth bins pool the samples of all seeds
of a method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

DEPTH_BINS = ((0, 25), (25, 50), (50, 75), (75, 101))
BASE_ROW = "base (no extension)"


def load_run(eval_dir: Path, name: str, base_length: int | None = None) -> dict[str, Any] | None:
    """results.json and the per-sample records of one evaluated model (None if missing), with its
    held-out perplexity at the base length when <name>_ppl holds it."""
    results_path = eval_dir / name / "results.json"
    if not results_path.exists():
        return None
    results = json.loads(results_path.read_text())
    predictions = eval_dir / name / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()] if predictions.exists() else []
    perplexity = None
    ppl_path = eval_dir / f"{name}_ppl" / "results.json"
    if base_length is not None and ppl_path.exists():
        perplexity = json.loads(ppl_path.read_text()).get("perplexity", {}).get(str(base_length), {}).get("ppl")
    return {
        "scores": {int(length): cell["score"] for length, cell in results["tasks"]["synthetic_kv"].items()},
        "records": records,
        "ppl": perplexity,
    }


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    eval_dir: Path,
    methods: list[str],
    runs: list[tuple[str, int]],
    lengths: tuple[int, ...],
    base_length: int | None = None,
) -> dict:
    """{row: {"per_seed": {seed: {length: score}}, "mean": {length: m}, "spread": {length: s},
    "depth": {length: {bin label: accuracy}}, "ppl": {seed: held-out perplexity at base_length}}}
    for the base model and every method."""
    rows: dict[str, dict[str, Any]] = {}
    seeds = sorted({seed for _, seed in runs})  # every seed has one base model
    groups: dict[str, list[tuple[int, str]]] = {BASE_ROW: [(seed, f"base_seed{seed}") for seed in seeds]}
    for method, seed in runs:
        groups.setdefault(method, []).append((seed, f"{method}_seed{seed}"))
    for row, members in groups.items():
        if row != BASE_ROW and row not in methods:
            continue
        loaded = {seed: run for seed, name in members if (run := load_run(eval_dir, name, base_length)) is not None}
        if not loaded:
            continue
        per_seed = {seed: run["scores"] for seed, run in loaded.items()}
        stats = {
            length: mean_and_spread([scores[length] for scores in per_seed.values() if length in scores])
            for length in lengths
            if any(length in scores for scores in per_seed.values())
        }
        records = [record for run in loaded.values() for record in run["records"]]
        digits_per_seed = [digit_accuracy(run["records"], lengths) for run in loaded.values()]
        first_per_seed = [digit_accuracy(run["records"], lengths, positions=(0,)) for run in loaded.values()]
        rows[row] = {
            "per_seed": per_seed,
            "mean": {k: v[0] for k, v in stats.items()},
            "spread": {k: v[1] for k, v in stats.items()},
            "depth": depth_table(records, lengths),
            "digits": {
                k: mean_and_spread([seed[k] for seed in digits_per_seed if k in seed])
                for k in lengths
                if any(k in seed for seed in digits_per_seed)
            },
            "first_digit": {
                k: mean_and_spread([seed[k] for seed in first_per_seed if k in seed])
                for k in lengths
                if any(k in seed for seed in first_per_seed)
            },
            "ppl": {seed: run["ppl"] for seed, run in loaded.items() if run["ppl"] is not None},
        }
    return rows


def retention(rows: dict, base_length: int) -> dict[str, dict[str, tuple[float, float] | None]]:
    """{method: measure -> (mean, std) over seeds} at the base length, each method against its own
    seed's base model: exact match before and after extension, the share kept (after / before x
    100, seeds whose base model scored 0 left out), held-out perplexity before and after and their
    ratio (above 1: worse after extension)."""
    if BASE_ROW not in rows:
        return {}
    base = rows[BASE_ROW]
    table: dict[str, dict[str, tuple[float, float] | None]] = {}

    def stats(values: list[float]) -> tuple[float, float] | None:
        return mean_and_spread(values) if values else None

    for row, data in rows.items():
        if row == BASE_ROW:
            continue
        pairs = [
            (base["per_seed"][seed][base_length], scores[base_length])
            for seed, scores in data["per_seed"].items()
            if base_length in scores and base_length in base["per_seed"].get(seed, {})
        ]
        ppl_pairs = [(base["ppl"][seed], value) for seed, value in data["ppl"].items() if seed in base["ppl"]]
        table[row] = {
            "exact_match_before": stats([before for before, _ in pairs]),
            "exact_match_after": stats([after for _, after in pairs]),
            "kept": stats([100.0 * after / before for before, after in pairs if before > 0]),
            "ppl_before": stats([before for before, _ in ppl_pairs]),
            "ppl_after": stats([after for _, after in ppl_pairs]),
            "ppl_ratio": stats([after / before for before, after in ppl_pairs]),
        }
    return table


def retention_markdown(rows: dict, base_length: int) -> list[str]:
    table = retention(rows, base_length)
    if not table:
        return []

    def cell(value: tuple[float, float] | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    lines = [
        "",
        f"Retention at the base length ({base_length} tokens): each method against its own seed's base model, "
        "mean ± std over seeds: `synthetic_kv` exact match (%) before and after extension and the share kept "
        "(after / before per seed), and perplexity on held-out base-length documents (never trained on) before "
        "and after (a ratio above 1: worse after extension):",
        "",
        "| method | exact match before | after | kept (%) | held-out ppl before | after | ppl after / before |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, values in table.items():
        lines.append(
            f"| {row} | {cell(values['exact_match_before'])} | {cell(values['exact_match_after'])} | "
            f"{cell(values['kept'])} | {cell(values['ppl_before'], 3)} | {cell(values['ppl_after'], 3)} | "
            f"{cell(values['ppl_ratio'], 3)} |"
        )
    return lines


def paired_differences(
    rows: dict, reference: str, lengths: tuple[int, ...]
) -> dict[str, dict[int, tuple[float, float, int]]]:
    """{method: {length: (mean, std, wins)}} of (method - reference) exact-match accuracy in
    percentage points, paired by seed (same base model, same prompts), so the spread between
    base models cancels; `wins` counts the seeds where the method scored higher."""
    if reference not in rows:
        return {}
    table: dict[str, dict[int, tuple[float, float, int]]] = {}
    for row, data in rows.items():
        if row in (reference, BASE_ROW):
            continue
        cells = {}
        for length in lengths:
            pairs = [
                (scores[length], rows[reference]["per_seed"][seed][length])
                for seed, scores in data["per_seed"].items()
                if length in scores and length in rows[reference]["per_seed"].get(seed, {})
            ]
            if pairs:
                differences = [mine - theirs for mine, theirs in pairs]
                cells[length] = (*mean_and_spread(differences), sum(mine > theirs for mine, theirs in pairs))
        table[row] = cells
    return table


def digit_accuracy(
    records: list[dict[str, Any]], lengths: tuple[int, ...], positions: tuple[int, ...] = (0, 1, 2)
) -> dict[int, float]:
    """Share (%) of value digits at `positions` predicted right (teacher forced): a softer
    signal than the exact match of all three digits (chance: 10%). The first digit is the pure
    lookup (find `set KEY`, copy what follows); the later ones can also be copied by continuing
    from the teacher-forced digit before them."""
    table: dict[int, float] = {}
    for length in lengths:
        hits = [
            float(want == got)
            for r in records
            if r["length"] == length
            for position, (want, got) in enumerate(zip(r["answers"][0].split(), r["output"].split() + [""] * 3))
            if position in positions
        ]
        if hits:
            table[length] = 100.0 * statistics.fmean(hits)
    return table


def depth_table(records: list[dict[str, Any]], lengths: tuple[int, ...]) -> dict[int, dict[str, float]]:
    table: dict[int, dict[str, float]] = {}
    for length in lengths:
        at_length = [r for r in records if r["length"] == length]
        cells = {}
        for low, high in DEPTH_BINS:
            scores = [r["score"] for r in at_length if low <= r["depths"][0] < high]
            if scores:
                cells[f"{low}-{min(high, 100)}%"] = statistics.fmean(scores)
        if cells:
            table[length] = cells
    return table


def markdown(rows: dict, lengths: tuple[int, ...], scale: Any) -> str:
    lines = [
        f"Accuracy (%) of `synthetic_kv` retrieval, mean ± std over {len(scale.seeds)} seed(s), "
        f"{scale.eval_samples} samples per length and model; base length {scale.base_length}, "
        f"target {scale.target_length}.",
        "",
    ]
    header = "| method | " + " | ".join(str(length) for length in lengths) + " | mean |"
    lines += [header, "|---" * (len(lengths) + 2) + "|"]
    for row, data in rows.items():
        cells = [f"{data['mean'][k]:.1f} ± {data['spread'][k]:.1f}" if k in data["mean"] else "-" for k in lengths]
        overall = statistics.fmean(data["mean"].values()) if data["mean"] else float("nan")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {overall:.1f} |")
    lines += [
        "",
        "Per seed:",
        "",
        "| method | seed | " + " | ".join(str(k) for k in lengths) + " |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for row, data in rows.items():
        for seed, scores in sorted(data["per_seed"].items()):
            lines.append(
                f"| {row} | {seed} | " + " | ".join(f"{scores.get(k, float('nan')):.1f}" for k in lengths) + " |"
            )
    for key, title in (
        ("digits", "Digit accuracy (%): value digits predicted right (teacher forced)"),
        ("first_digit", "First-digit accuracy (%): the lookup itself, with no earlier digit to continue from"),
    ):
        lines += [
            "",
            f"{title}, mean ± std over seeds (chance 10%):",
            "",
            "| method | " + " | ".join(str(k) for k in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for row, data in rows.items():
            lines.append(
                f"| {row} | "
                + " | ".join(
                    f"{data[key][k][0]:.1f} ± {data[key][k][1]:.1f}" if k in data[key] else "-" for k in lengths
                )
                + " |"
            )
    reference = "abf_multistage"
    differences = paired_differences(rows, reference, lengths)
    if differences:
        seeds = len(rows[reference]["per_seed"])
        lines += [
            "",
            f"Exact match minus {reference}'s, paired by seed (same base model, same prompts), percentage "
            f"points, mean ± std over seeds (higher in how many of {seeds} seeds):",
            "",
            "| method | " + " | ".join(str(k) for k in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for row, cells in differences.items():
            lines.append(
                f"| {row} | "
                + " | ".join(
                    f"{cells[k][0]:+.1f} ± {cells[k][1]:.1f} ({cells[k][2]}/{seeds})" if k in cells else "-"
                    for k in lengths
                )
                + " |"
            )
    lines += masking_lines(rows, lengths)
    lines += retention_markdown(rows, scale.base_length)
    bins = [f"{low}-{min(high, 100)}%" for low, high in DEPTH_BINS]
    for length in [k for k in lengths if k >= scale.target_length]:
        lines += [
            "",
            f"Accuracy by depth of the queried needle at length {length} (all seeds pooled):",
            "",
            "| method | " + " | ".join(bins) + " |",
            "|---" * (len(bins) + 1) + "|",
        ]
        for row, data in rows.items():
            cells = data["depth"].get(length, {})
            lines.append(f"| {row} | " + " | ".join(f"{cells[b]:.1f}" if b in cells else "-" for b in bins) + " |")
    return "\n".join(lines) + "\n"


def masking_lines(rows: dict, lengths: tuple[int, ...]) -> list[str]:
    """Each `<method>_docmask` row against its method packed across documents, paired by seed."""
    pairs = [
        (row, row.removesuffix("_docmask"))
        for row in rows
        if row.endswith("_docmask") and row.removesuffix("_docmask") in rows
    ]
    if not pairs:
        return []
    lines = [
        "",
        "Document masking: exact match of `<method>_docmask` minus `<method>` (packed across documents), "
        "paired by seed, percentage points, mean ± std over seeds (higher in how many seeds):",
        "",
        "| method | " + " | ".join(str(k) for k in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for masked, packed in pairs:
        cells = paired_differences({packed: rows[packed], masked: rows[masked]}, packed, lengths)[masked]
        seeds = len(rows[masked]["per_seed"])
        lines.append(
            f"| {masked} | "
            + " | ".join(
                f"{cells[k][0]:+.1f} ± {cells[k][1]:.1f} ({cells[k][2]}/{seeds})" if k in cells else "-"
                for k in lengths
            )
            + " |"
        )
    return lines


def plot(rows: dict, lengths: tuple[int, ...], scale: Any, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (
        ("mean", "spread", "exact-match retrieval accuracy (%)", (-2, 108)),
        ("digits", None, "value digits predicted right (%), chance 10", None),
    )
    for axis, (key, spread_key, label, limits) in zip(axes, panels):
        for row, data in rows.items():
            xs = [k for k in lengths if k in data[key]]
            if key == "digits":
                ys, errors = [data[key][k][0] for k in xs], [data[key][k][1] for k in xs]
            else:
                ys, errors = [data[key][k] for k in xs], [data[spread_key][k] for k in xs]
            axis.errorbar(
                xs, ys, yerr=errors, marker="o", capsize=3, label=row, linestyle="--" if row == BASE_ROW else "-"
            )
        for x in (scale.base_length, scale.target_length):
            axis.axvline(x, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(lengths), [str(k) for k in lengths])
        if limits:
            axis.set_ylim(*limits)
        axis.set_xlabel("evaluation length (tokens); dotted: base and target length")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8, loc="upper right")
    figure.suptitle(f"CPU replication: {scale.base_length} -> {scale.target_length} tokens, mean ± std over seeds")
    return save_figure(figure, path, dpi=120)


def save_figure(figure: Any, path: Path, dpi: int) -> Path:
    """Lay out, write under a temporary name, rename, close."""
    from megatron_harpe import files

    figure.tight_layout()
    return files.save_figure(figure, path, dpi=dpi)


def write_report(
    eval_dir: Path,
    output: Path,
    scale: Any,
    methods: list[str],
    runs: list[tuple[str, int]],
    log: Callable[[str], None] = print,
) -> list[Path]:
    """results.md, results.png and summary.json in `output`; returns their paths."""
    rows = summarize(eval_dir, methods, runs, scale.eval_lengths, scale.base_length)
    if not rows:
        raise ValueError(f"no evaluation results under {eval_dir}: run the eval phase first")
    from megatron_harpe.files import write_text

    output.mkdir(parents=True, exist_ok=True)
    table = output / "results.md"
    write_text(str(table), markdown(rows, scale.eval_lengths, scale))
    summary = output / "summary.json"
    serializable = {row: {key: value for key, value in data.items()} for row, data in rows.items()}
    serializable["retention_at_base_length"] = retention(rows, scale.base_length)
    write_text(str(summary), json.dumps(serializable, indent=2, default=str))
    figure = plot(rows, scale.eval_lengths, scale, output / "results.png")
    log(f"report: {len(rows)} rows ({', '.join(rows)})")
    return [table, figure, summary]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from methods import ABLATIONS, FULL, METHODS, SMOKE, Scale

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-dir", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path, help="results folder (its scale.json, if any, is used)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    saved_scale = args.output / "scale.json"
    if saved_scale.exists():  # the scale the run actually used (run.py writes it, flags included)
        fields = json.loads(saved_scale.read_text())
        fields.pop("ratio", None)
        scale = Scale(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})
    ablations = [
        name for name in ABLATIONS if any((args.eval_dir / f"{name}_seed{seed}").exists() for seed in scale.seeds)
    ]
    methods = list(METHODS) + ablations  # an ablation is reported when it was run
    runs = [(method, seed) for seed in scale.seeds for method in methods]
    for path in write_report(args.eval_dir, args.output, scale, methods, runs):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
