"""The sweep's report: exact match and digit accuracy vs adaptation budget, paired differences
to multi-stage ABF, the heads comparison and a plain statement of the trend.

Written by sweep.py into its --output folder: sweep.md, sweep.png, sweep_summary.json.
Spread is the sample standard deviation over seeds; differences are paired by seed (same base
model, same prompts), so the spread between base models cancels.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from report import digit_accuracy, load_run, mean_and_spread, save_figure

REFERENCE = "abf_multistage"


def collect(eval_dir: Path, sweep: Any) -> dict:
    """{(hidden, heads, budget, method): {seed: {"exact": {length: %}, "digits": {length: %}}}} of
    every evaluated run."""
    table: dict = {}
    for hidden, heads, budget, method, seed in sweep.runs():
        run = load_run(eval_dir, sweep.run_name(hidden, heads, budget, method, seed))
        if run is None:
            continue
        table.setdefault((hidden, heads, budget, method), {})[seed] = {
            "exact": run["scores"],
            "digits": digit_accuracy(run["records"], sweep.scale.eval_lengths),
        }
    return table


def paired(
    cells: dict, method: str, reference: str, model: tuple[int, int], budget: int, length: int, key: str = "exact"
) -> list[float]:
    """method - reference score (`key`: exact or digits) at one length for one model shape
    (hidden, heads), one value per seed both have."""
    mine, theirs = cells.get((*model, budget, method), {}), cells.get((*model, budget, reference), {})
    return [
        mine[seed][key][length] - theirs[seed][key][length]
        for seed in sorted(set(mine) & set(theirs))
        if length in mine[seed][key]
    ]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def trend(cells: dict, sweep: Any, method: str, length: int) -> dict[str, float] | None:
    """How (method - reference) exact match at `length` moves per 10x budget: the slope over
    log10(budget) per seed, then mean, std and standard error over seeds."""
    model, slopes = sweep.models()[0], []
    for seed in sweep.scale.seeds:
        points = []
        for budget in sweep.budgets:
            mine = cells.get((*model, budget, method), {}).get(seed)
            theirs = cells.get((*model, budget, REFERENCE), {}).get(seed)
            if mine and theirs and length in mine["exact"]:
                points.append((math.log10(budget), mine["exact"][length] - theirs["exact"][length]))
        if len(points) >= 2:
            slopes.append(slope([x for x, _ in points], [y for _, y in points]))
    if not slopes:
        return None
    mean, spread = mean_and_spread(slopes)
    return {"slope_per_10x": mean, "std": spread, "stderr": spread / math.sqrt(len(slopes)), "seeds": len(slopes)}


def verdict(fit: dict[str, float] | None) -> str:
    if fit is None:
        return "not measured"
    if fit["seeds"] < 2:
        return "one seed only: no spread to judge against"
    if abs(fit["slope_per_10x"]) <= 2 * fit["stderr"]:
        return "no trend beyond the seed spread"
    return "the gap narrows as the budget grows" if fit["slope_per_10x"] > 0 else "the gap widens as the budget grows"


def cells_at(cells: dict, model: tuple[int, int], budget: int) -> bool:
    return any(key[:3] == (*model, budget) for key in cells)


def format_difference(differences: list[float]) -> str:
    """Mean ± std of paired differences, and in how many pairs the method was higher."""
    if not differences:
        return "-"
    mean, spread = mean_and_spread(differences)
    return f"{mean:+.1f} ± {spread:.1f} ({sum(d > 0 for d in differences)}/{len(differences)})"


def format_cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, spread = mean_and_spread(values)
    return f"{mean:.1f} ± {spread:.1f}"


def budget_sections(cells: dict, sweep: Any, summary: dict) -> list[str]:
    """The budget sweep's tables and trend (the model of sweep.models()[0]); fills summary["trend"]."""
    scale, lengths, lines = sweep.scale, sweep.scale.eval_lengths, []
    model0 = sweep.models()[0]
    heads0 = model0[1]
    for key, title in (("exact", "Exact match (%)"), ("digits", "Digit accuracy (%), chance 10")):
        lines += [
            "",
            f"## {title} vs adaptation budget, {heads0} heads, hidden {model0[0]}, mean ± std over seeds",
            "",
            "| method | budget | " + " | ".join(str(k) for k in lengths) + " |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for method in sweep.methods:
            for budget in sweep.budgets:
                seeds = cells.get((*model0, budget, method), {})
                lines.append(
                    f"| {method} | {budget:,} | "
                    + " | ".join(format_cell([s[key][k] for s in seeds.values() if k in s[key]]) for k in lengths)
                    + " |"
                )
    for key, title in (("exact", "Exact match"), ("digits", "Digit accuracy")):
        lines += [
            "",
            f"## {title} minus {REFERENCE}'s, paired by seed ({heads0} heads, hidden {model0[0]})",
            "",
            "Percentage points, mean ± std over seeds (higher in how many seeds):",
            "",
            "| method | budget | " + " | ".join(str(k) for k in lengths) + " |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for method in [m for m in sweep.methods if m != REFERENCE]:
            for budget in sweep.budgets:
                row = [
                    format_difference(paired(cells, method, REFERENCE, model0, budget, length, key))
                    for length in lengths
                ]
                lines.append(f"| {method} | {budget:,} | " + " | ".join(row) + " |")
    lines += [
        "",
        f"## Trend: (method - {REFERENCE}) per 10x budget",
        "",
        "Least-squares slope of the paired difference over log10(budget), per seed, then mean ± std over "
        "seeds; judged against twice its standard error.",
        "",
        "| method | length | slope (points per 10x) | verdict |",
        "|---|---|---|---|",
    ]
    for method in [m for m in sweep.methods if m != REFERENCE]:
        for length in [k for k in lengths if k > scale.base_length]:
            fit = trend(cells, sweep, method, length)
            summary["trend"][f"{method}@{length}"] = fit
            shown = f"{fit['slope_per_10x']:+.1f} ± {fit['std']:.1f}" if fit else "-"
            lines.append(f"| {method} | {length} | {shown} | {verdict(fit)} |")
    return lines


def markdown(cells: dict, sweep: Any, bases: dict) -> tuple[str, dict]:
    scale, lengths = sweep.scale, sweep.scale.eval_lengths
    hidden0, heads0 = sweep.models()[0]
    budgets = (
        ""
        if sweep.heads_only
        else (f"budgets {', '.join(f'{b:,}' for b in sweep.budgets)} tokens at {heads0} heads, hidden {hidden0}; ")
    )
    lines = [
        f"Sweep: base length {scale.base_length} -> target {scale.target_length}, {scale.num_layers} layers, "
        f"{len(scale.seeds)} seeds, {scale.eval_samples} samples per length and model (teacher forced); "
        f"{budgets}heads {', '.join(str(h) for h in sweep.heads)} at hidden {sweep.comparison_hidden} with "
        f"{sweep.heads_budget:,} tokens.",
        "",
        "## Base models",
        "",
        f"Rounds of {sweep.round_tokens(hidden0):,} tokens"
        + (
            f" (hidden {hidden0}) or {sweep.round_tokens(sweep.comparison_hidden):,} (hidden {sweep.comparison_hidden})"
            if sweep.comparison_hidden != hidden0
            else ""
        )
        + f" until exact match at {scale.base_length} reaches "
        f"{sweep.base_gate:.0f}% (at most {sweep.base_max_rounds} rounds):",
        "",
        "| hidden | heads | seed | rounds | tokens | exact match at base length |",
        "|---|---|---|---|---|---|",
    ]
    for (hidden, heads, seed), entry in sorted(bases.items()):
        match = entry.get("exact_match")
        lines.append(
            f"| {hidden} | {heads} | {seed} | {entry['rounds']} | {entry['tokens']:,} | "
            + (f"{match:.1f}" if match is not None else "-")
            + (" (below the gate)" if not entry.get("passed") else "")
            + " |"
        )
    summary: dict[str, Any] = {"trend": {}, "heads": {}}
    if not sweep.heads_only:
        lines += budget_sections(cells, sweep, summary)
    compared = [model for model in sweep.models() if cells_at(cells, model, sweep.heads_budget)]
    if len(sweep.heads) > 1:
        lines += [
            "",
            f"## Model shapes at {sweep.heads_budget:,} tokens, exact match (%)",
            "",
            f"Heads per layer at equal width (hidden {sweep.comparison_hidden})"
            + (":" if sweep.heads_only else ", and the budget sweep's model:"),
            "",
            "| method | hidden | heads | " + " | ".join(str(k) for k in lengths) + " |",
            "|---" * (len(lengths) + 3) + "|",
        ]
        for method in sweep.methods:
            for hidden, heads in compared:
                seeds = cells.get((hidden, heads, sweep.heads_budget, method), {})
                lines.append(
                    f"| {method} | {hidden} | {heads} | "
                    + " | ".join(
                        format_cell([s["exact"][k] for s in seeds.values() if k in s["exact"]]) for k in lengths
                    )
                    + " |"
                )
        for other in [m for m in sweep.methods if m != REFERENCE]:
            lines += [
                "",
                f"{other} minus {REFERENCE}, exact match paired by seed, at {sweep.heads_budget:,} tokens "
                "(higher in how many seeds):",
                "",
                "| hidden | heads | " + " | ".join(str(k) for k in lengths) + " |",
                "|---" * (len(lengths) + 2) + "|",
            ]
            for model in compared:
                row = []
                for length in lengths:
                    differences = paired(cells, other, REFERENCE, model, sweep.heads_budget, length)
                    summary["heads"][f"{other}:{model[0]}x{model[1]}@{length}"] = differences
                    row.append(format_difference(differences))
                lines.append(f"| {model[0]} | {model[1]} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", summary


def plot(cells: dict, sweep: Any, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, model0 = sweep.scale, sweep.models()[0]
    shown = [] if sweep.heads_only else [k for k in scale.eval_lengths if k >= scale.target_length // 2][:3]
    figure, axes = plt.subplots(1, len(shown) + 1, figsize=(4.2 * (len(shown) + 1), 4), squeeze=False)
    for axis, length in zip(axes[0], shown):
        for method in sweep.methods:
            xs, ys, errors = [], [], []
            for budget in sweep.budgets:
                values = [
                    s["exact"][length]
                    for s in cells.get((*model0, budget, method), {}).values()
                    if length in s["exact"]
                ]
                if values:
                    xs.append(budget)
                    ys.append(statistics.fmean(values))
                    errors.append(mean_and_spread(values)[1])
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        axis.set_xscale("log")
        axis.set_xticks(list(sweep.budgets), [f"{budget // 1000}k" for budget in sweep.budgets])
        axis.minorticks_off()
        axis.set_xlabel("adaptation tokens")
        axis.set_ylabel(f"exact match at {length} (%)")
        axis.set_title(f"length {length}, {model0[1]} heads, hidden {model0[0]}")
    if shown:
        axes[0][0].legend(fontsize=8)
    models, length = sweep.models(), scale.target_length
    axis, width = axes[0][-1], 0.8 / len(models)
    for index, (hidden, heads) in enumerate(models):
        means = [
            statistics.fmean(values)
            if (
                values := [
                    s["exact"][length]
                    for s in cells.get((hidden, heads, sweep.heads_budget, method), {}).values()
                    if length in s["exact"]
                ]
            )
            else 0.0
            for method in sweep.methods
        ]
        axis.bar(
            [i + index * width for i in range(len(sweep.methods))],
            means,
            width,
            label=f"{heads} heads, hidden {hidden}",
        )
    axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(sweep.methods))], list(sweep.methods))
    axis.set_ylabel(f"exact match at {length} (%)")
    axis.set_title(f"model shapes at {sweep.heads_budget:,} tokens")
    axis.legend(fontsize=8)
    return save_figure(figure, path, dpi=110)


def write_sweep_report(eval_dir: Path, output: Path, sweep: Any, bases: dict) -> list[Path]:
    cells = collect(eval_dir, sweep)
    if not cells:
        raise ValueError(f"no evaluation results under {eval_dir}: run the sweep first")
    from megatron_harpe.files import write_text

    text, summary = markdown(cells, sweep, bases)
    report = output / "sweep.md"
    write_text(str(report), text)
    summary["cells"] = {
        f"{sweep.model_name(hidden, heads)}_{method}_{budget}": seeds
        for (hidden, heads, budget, method), seeds in cells.items()
    }
    summary["bases"] = {
        f"{sweep.model_name(hidden, heads)}_seed{seed}": {k: v for k, v in entry.items() if k != "eval"}
        for (hidden, heads, seed), entry in bases.items()
    }
    data = output / "sweep_summary.json"
    write_text(str(data), json.dumps(summary, indent=2, default=str))
    return [report, plot(cells, sweep, output / "sweep.png"), data]
