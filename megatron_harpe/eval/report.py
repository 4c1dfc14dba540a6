"""Turn `run_eval_suite` results into files: JSON, a Markdown table and PNG plots.

    from megatron_harpe.eval.report import write_report
    paths = write_report(results, "eval_out/")   # results.json, results.md, *.png

Every file is written under a temporary name and renamed when complete, so an interrupted or
failed run never leaves a half-written result next to good ones.
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_harpe import files  # noqa: E402


def _length_label(length: int | str) -> str:
    length = int(length)
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def _self_extend_note(results: dict[str, Any]) -> str:
    settings = results.get("self_extend")
    return f", Self-Extend window {settings['window']} group {settings['group']}" if settings else ""


def _cell(cell: dict[str, Any]) -> str:
    """'92.0 [84, 97]': the score and its 95% Wilson interval."""
    if "interval" not in cell:  # results written before intervals existed
        return f"{cell['score']:.2f}"
    low, high = cell["interval"]
    return f"{cell['score']:.1f} [{low:.0f}, {high:.0f}]"


def _headline_label(results: dict[str, Any]) -> str:
    if "mean_label" in results:
        return results["mean_label"]
    return "mean" if len(results["mean_over"]) == len(results["tasks"]) else "mean (NIAH)"


def _provenance_lines(results: dict[str, Any]) -> list[str]:
    provenance = results.get("provenance")
    if not provenance:
        return []
    versions = ", ".join(f"{name} {version}" for name, version in provenance["versions"].items() if version)
    tokenizer = provenance["tokenizer"]
    prompt = provenance["prompt"]
    template = prompt["chat_template"] + (f" (sha256 {prompt['sha256'][:12]})" if "sha256" in prompt else "")
    haystack = provenance["haystack"]
    return [
        f"Chat template: {template}; tokenizer: {tokenizer['class']} {tokenizer['name_or_path'] or ''} "
        f"(vocab {tokenizer['vocab_size']}); haystack: {haystack['source']} (sha256 {haystack['sha256'][:12]}); "
        f"megatron_harpe {provenance['megatron_harpe_git'] or 'unknown revision'}; {versions}",
        "",
    ]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _run_line(results: dict[str, Any]) -> str:
    line = (
        f"Model: `{results['model']}`, {results['samples']} samples per cell, seed {results['seed']}, "
        f"scoring: {results['scoring']}" + _self_extend_note(results)
    )
    if "fill" in results:
        line += f", fill: {results['fill']}"
    if "ruler_version" in results:
        line += f", prompts of {results['ruler_version']['repository']} {results['ruler_version']['commit']}"
    return line + "; cells: score [95% Wilson interval]"


def markdown_table(results: dict[str, Any]) -> str:
    """Retrieval scores (task x length, each with its 95% Wilson interval, the per-length mean
    and overall), the needle grid, perplexity and the short tasks, as GitHub Markdown. Cells
    not computed yet (a partial result) show "-"; cells that cannot fit the length say so."""
    lines: list[str] = []
    if not results.get("complete", True):
        lines += ["**Partial results**: the run has not finished (cells not computed yet show -).", ""]
    if "lengths" in results:
        lengths = [str(length) for length in results["lengths"]]
        header = "| " + " | ".join(_length_label(length) for length in lengths) + " |"
        rule = "|---" * (len(lengths) + 1) + "|"
        lines += [_run_line(results), ""]
        lines += _provenance_lines(results)
        unfit = results.get("unfit_cells", {})
        if results.get("tasks") or unfit:
            lines += ["| task " + header + " mean |", rule + "---|"]
            for task in list(results.get("tasks", {})) + [
                t for t in unfit if t not in results.get("tasks", {}) and not t.startswith("needle_grid@")
            ]:
                by_length = results.get("tasks", {}).get(task, {})
                cells = []
                for length in lengths:
                    if length in by_length:
                        cells.append(_cell(by_length[length]))
                    else:
                        cells.append("does not fit" if length in unfit.get(task, {}) else "-")
                scores = [by_length[length]["score"] for length in lengths if length in by_length]
                lines.append(
                    f"| {task} | {' | '.join(cells)} | {_fmt(sum(scores) / len(scores) if scores else None)} |"
                )
            per_length = " | ".join(f"**{_fmt(results.get('per_length', {}).get(length))}**" for length in lengths)
            if results.get("mean_over"):
                lines += [f"| **{_headline_label(results)}** | {per_length} | **{_fmt(results.get('overall'))}** |"]
            lines.append("")
            for task, reason in results.get("skipped", {}).items():
                lines += [f"{task} skipped: {reason}.", ""]
            for task, by_length in unfit.items():
                for length, reason in by_length.items():
                    lines += [f"{task} at {_length_label(length)} skipped: the prompt does not fit ({reason}).", ""]
        if "needle_grid" in results:
            grid = results["needle_grid"]
            lines += [f"Needle grid ({grid['task']}, score by depth x length):", "", "| depth % " + header, rule]
            intervals = grid.get("intervals") or [[None] * len(row) for row in grid["scores"]]
            for depth, row, row_intervals in zip(grid["depths"], grid["scores"], intervals):
                row_cells = [
                    "-" if score is None else f"{score:.0f}" + (f" [{span[0]:.0f}, {span[1]:.0f}]" if span else "")
                    for score, span in zip(row, row_intervals)
                ]
                lines.append(f"| {depth} | " + " | ".join(row_cells) + " |")
            lines.append("")
        if "perplexity" in results:
            lines += ["Perplexity (sliding window):", "", "| " + header, rule]
            cells = []
            for length in lengths:
                value = results["perplexity"][length]
                cells.append("n/a" if value["ppl"] is None else f"{value['ppl']:.3f} ({value['documents']} docs)")
            lines += ["| ppl | " + " | ".join(cells) + " |", ""]
    if results.get("short"):
        from megatron_harpe.eval.short_tasks import markdown_section

        lines += markdown_section(results["short"])
    return "\n".join(lines)


def plot_retrieval(results: dict[str, Any], path: str) -> None:
    lengths = [int(length) for length in results["lengths"]]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for task, by_length in results["tasks"].items():
        present = [length for length in lengths if str(length) in by_length]  # a cell that did not fit is absent
        axis.plot(present, [by_length[str(length)]["score"] for length in present], marker="o", alpha=0.6, label=task)
    present = [length for length in lengths if str(length) in results["per_length"]]
    axis.plot(
        present,
        [results["per_length"][str(length)] for length in present],
        marker="s",
        color="black",
        linewidth=2.5,
        label=_headline_label(results),
    )
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [_length_label(length) for length in lengths])
    axis.set_ylim(-3, 103)
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("score")
    axis.set_title(
        f"Retrieval ({results['scoring']}{_self_extend_note(results)}) - "
        f"{os.path.basename(str(results['model']).rstrip('/'))}"
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    files.save_figure(figure, path, dpi=120, bbox_inches="tight")


def plot_needle_grid(results: dict[str, Any], path: str) -> None:
    grid = results["needle_grid"]
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(grid["lengths"]), 5))
    scores = [[float("nan") if score is None else score for score in row] for row in grid["scores"]]
    image = axis.imshow(scores, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    axis.set_xticks(range(len(grid["lengths"])), [_length_label(length) for length in grid["lengths"]])
    axis.set_yticks(range(len(grid["depths"])), [str(depth) for depth in grid["depths"]])
    if len(grid["depths"]) * len(grid["lengths"]) <= 200:  # small grids: print each score
        for row, row_scores in enumerate(grid["scores"]):
            for column, score in enumerate(row_scores):
                axis.text(column, row, "-" if score is None else f"{score:.0f}", ha="center", va="center", fontsize=8)
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("needle depth (%)")
    axis.set_title("Single needle: score by length x depth")
    figure.colorbar(image, ax=axis, label="score")
    files.save_figure(figure, path, dpi=120, bbox_inches="tight")


def plot_perplexity(results: dict[str, Any], path: str) -> None:
    points = [(int(length), value["ppl"]) for length, value in results["perplexity"].items() if value["ppl"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    if points:
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks([p[0] for p in points], [_length_label(p[0]) for p in points])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("perplexity")
    axis.set_title("Sliding-window perplexity")
    axis.grid(alpha=0.3)
    files.save_figure(figure, path, dpi=120, bbox_inches="tight")


def write_report(results: dict[str, Any], output_dir: str, plots: bool = True) -> dict[str, str]:
    """Write results.json, results.md and (with `plots`) the plots that apply; returns {kind: path}.
    Called after every cell with plots=False, so an interrupted run leaves its partial results."""
    os.makedirs(output_dir, exist_ok=True)
    paths: dict[str, str] = {}
    records = results.get("records")
    summary = {key: value for key, value in results.items() if key != "records"}
    if records is not None:
        paths["predictions"] = os.path.join(output_dir, "predictions.jsonl")
        files.write_text(paths["predictions"], "".join(json.dumps(record) + "\n" for record in records))
    paths["json"] = os.path.join(output_dir, "results.json")
    files.write_text(paths["json"], json.dumps(summary, indent=2) + "\n")
    paths["markdown"] = os.path.join(output_dir, "results.md")
    files.write_text(paths["markdown"], markdown_table(summary) + "\n")
    if not plots:
        return paths
    if summary.get("tasks") and summary.get("per_length"):
        paths["retrieval_plot"] = os.path.join(output_dir, "retrieval.png")
        plot_retrieval(summary, paths["retrieval_plot"])
    if "needle_grid" in summary:
        paths["needle_grid_plot"] = os.path.join(output_dir, "needle_grid.png")
        plot_needle_grid(summary, paths["needle_grid_plot"])
    if "perplexity" in summary:
        paths["perplexity_plot"] = os.path.join(output_dir, "perplexity.png")
        plot_perplexity(summary, paths["perplexity_plot"])
    return paths
