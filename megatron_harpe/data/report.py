"""Length statistics per source, the JSON summary and the PNG plot of a data-preparation run.

    stats = LengthStats(long_threshold=4096)
    stats.add("Book", 120_000); stats.add("C4", 300)
    stats.to_dict()   # {"Book": {"documents": 1, "tokens": 120000, "long_tokens": 120000, "long_share": 1.0}, ...}

    plot_report({"before upsampling": before, "after upsampling": after}, "run.report.png", "title")
    write_json(summary, "run.summary.json")

The plot has two panels: tokens per source and the share of tokens in documents longer than
the threshold, one bar per source and per stage (Fu et al. 2024, arXiv 2402.10171: about 30% -> about 70%).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from megatron_harpe import files

TOTAL = "(all)"


class LengthStats:
    """Document and token counts per source, split by whether a document is long."""

    def __init__(self, long_threshold: int = 4096) -> None:
        self.long_threshold = long_threshold
        self.documents: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, float] = defaultdict(float)
        self.long_tokens: dict[str, float] = defaultdict(float)

    def add(self, source: str | None, length: float) -> None:
        source = source if source is not None else "(no source)"
        self.documents[source] += 1
        self.tokens[source] += length
        if length >= self.long_threshold:
            self.long_tokens[source] += length

    def add_many(self, sources: Iterable[str | None], lengths: np.ndarray) -> None:
        for source, length in zip(sources, lengths.tolist()):
            self.add(source, length)

    def state(self) -> dict[str, list[float]]:
        """Exact counts per source, `[documents, tokens, long_tokens]`, for `merge_state`."""
        return {
            source: [self.documents[source], self.tokens[source], self.long_tokens[source]] for source in self.documents
        }

    def merge_state(self, state: dict[str, list[float]]) -> None:
        for source, (documents, tokens, long_tokens) in state.items():
            self.documents[source] += int(documents)
            self.tokens[source] += tokens
            self.long_tokens[source] += long_tokens

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Per source (sorted) plus an `(all)` row: documents, tokens, long_tokens, long_share."""
        rows: dict[str, dict[str, float]] = {}
        for source in sorted(self.documents):
            rows[source] = _row(self.documents[source], self.tokens[source], self.long_tokens[source])
        rows[TOTAL] = _row(sum(self.documents.values()), sum(self.tokens.values()), sum(self.long_tokens.values()))
        return rows


def _row(documents: int, tokens: float, long_tokens: float) -> dict[str, float]:
    return {
        "documents": documents,
        "tokens": round(tokens),
        "long_tokens": round(long_tokens),
        "long_share": (long_tokens / tokens) if tokens else 0.0,
    }


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write `data` as indented JSON through a temporary file."""
    return files.write_json(path, data)


def plot_report(
    stages: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str, long_threshold: int = 4096
) -> Path:
    """Bar charts of tokens per source and long-document token share, one bar group per source,
    one bar per stage (e.g. before / after upsampling). `stages` maps a label to a
    `LengthStats.to_dict()` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({source for rows in stages.values() for source in rows if source != TOTAL}) + [TOTAL]
    positions = np.arange(len(sources))
    width = 0.8 / max(len(stages), 1)
    figure, (tokens_axis, share_axis) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(sources) + 4), 4.5))
    for index, (label, rows) in enumerate(stages.items()):
        offsets = positions - 0.4 + width * (index + 0.5)
        tokens = [rows.get(source, {}).get("tokens", 0) for source in sources]
        shares = [100 * rows.get(source, {}).get("long_share", 0.0) for source in sources]
        tokens_axis.bar(offsets, tokens, width, label=label)
        share_axis.bar(offsets, shares, width, label=label)
    tokens_axis.set_title("tokens per source")
    tokens_axis.set_yscale("log")
    share_axis.set_title(f"% of tokens in documents >= {long_threshold} tokens")
    share_axis.set_ylim(0, 100)
    for axis in (tokens_axis, share_axis):
        axis.set_xticks(positions)
        axis.set_xticklabels(sources, rotation=30, ha="right")
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return files.save_figure(figure, path, dpi=100)


def format_table(stages: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table of the same numbers, for the terminal."""
    lines = [f"{'source':<24}{'stage':<22}{'documents':>11}{'tokens':>14}{'long share':>12}"]
    sources = sorted({source for rows in stages.values() for source in rows if source != TOTAL}) + [TOTAL]
    for source in sources:
        for label, rows in stages.items():
            row = rows.get(source)
            if row:
                lines.append(
                    f"{source:<24}{label:<22}{row['documents']:>11}{row['tokens']:>14}{100 * row['long_share']:>11.1f}%"
                )
    return "\n".join(lines)
