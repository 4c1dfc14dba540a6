"""Per-source length upsampling (Fu et al. 2024, arXiv 2402.10171): the sampling rule alone.

Documents arrive in corpus order with a source label and a length (real tokens, or the
published characters / 3.68 estimate). `LengthUpsampler.offer(source, length)` says whether
to keep each one:

    sampler = LengthUpsampler(UpsampleConfig(mode="per_source", total_tokens=6_000_000_000))
    for doc in corpus:
        if sampler.offer(doc.source, doc.length):
            keep(doc)
        if sampler.finished:
            break

Modes (the names of the original code):
- `per_source`: budget per source = total_tokens x share; a document shorter than the
  threshold (4096) is kept with probability `short_keep_probability` (0.1), a longer one
  always; a source stops taking documents once its budget is met (the last document may
  overshoot it); the run ends when every budget is met or the corpus ends.
- `upsample_code_arxiv_book`: the same rule with Github, ArXiv and Book weighted 0.60 each
  (other sources keep their SlimPajama weight), normalized to shares.
- `global`: the short-document rule ignoring sources; ends after `total_tokens` kept.
- `none`: keep everything (until `total_tokens`, if given).
Source names match the share table case-insensitively and with or without SlimPajama's
`RedPajama` prefix (`RedPajamaArXiv` is `ArXiv`). Deterministic for a seed and an input order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import yaml

MODES = ("per_source", "upsample_code_arxiv_book", "global", "none")

SLIMPAJAMA_SHARES: dict[str, float] = {
    "CommonCrawl": 0.53374772,
    "C4": 0.26609933,
    "Github": 0.05004782,
    "ArXiv": 0.04290379,
    "Book": 0.0414836,
    "Wikipedia": 0.03402128,
    "StackExchange": 0.03169647,
}
"""The original SlimPajama mixture: per_source keeps it, only lengths change inside a source."""

CODE_ARXIV_BOOK_WEIGHT = 0.60


def code_arxiv_book_shares() -> dict[str, float]:
    weights = dict(SLIMPAJAMA_SHARES)
    for source in ("Github", "ArXiv", "Book"):
        weights[source] = CODE_ARXIV_BOOK_WEIGHT
    total = sum(weights.values())
    return {source: weight / total for source, weight in weights.items()}


def canonical_source(name: str) -> str:
    name = name.strip()
    if name.lower().startswith("redpajama"):
        name = name[len("redpajama") :]
    return name.lower()


@dataclasses.dataclass
class UpsampleConfig:
    mode: str = "per_source"
    total_tokens: int | None = None
    """Token budget of the output (required for per_source and upsample_code_arxiv_book)."""
    shares: dict[str, float] | None = None
    """Per-source shares (normalized to sum 1); None: the SlimPajama mixture. per_source only."""
    length_threshold: int = 4096
    """Documents shorter than this (in measured tokens) are 'short'."""
    short_keep_probability: float = 0.1
    seed: int = 1234

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"upsample mode {self.mode!r} is unknown: choose one of {', '.join(MODES)}")
        if not 0.0 <= self.short_keep_probability <= 1.0:
            raise ValueError(f"short_keep_probability={self.short_keep_probability} must lie in [0, 1]")
        if self.length_threshold < 0:
            raise ValueError(f"length_threshold={self.length_threshold} must be >= 0")
        if self.mode in ("per_source", "upsample_code_arxiv_book") and not self.total_tokens:
            raise ValueError(f"mode {self.mode} needs a token budget: pass --total-tokens N (e.g. 6e9)")
        if self.total_tokens is not None and self.total_tokens <= 0:
            raise ValueError(f"total_tokens={self.total_tokens} must be positive")
        if self.shares is not None:
            if self.mode != "per_source":
                raise ValueError(f"--shares applies to mode per_source only, not {self.mode}")
            if (
                not self.shares
                or any(not math.isfinite(w) or w < 0 for w in self.shares.values())
                or sum(self.shares.values()) <= 0
            ):
                raise ValueError(f"shares {self.shares} must be non-negative numbers with a positive sum")

    def resolved_shares(self) -> dict[str, float]:
        """Shares per source (summing to 1) for the per-source modes."""
        if self.mode == "upsample_code_arxiv_book":
            return code_arxiv_book_shares()
        shares = self.shares if self.shares is not None else SLIMPAJAMA_SHARES
        total = sum(shares.values())
        return {source: weight / total for source, weight in shares.items()}


class LengthUpsampler:
    """Stateful sampler applying `UpsampleConfig` to documents offered one by one."""

    def __init__(self, config: UpsampleConfig) -> None:
        config.validate()
        self.config = config
        self.rng = random.Random(config.seed)
        self.per_source = config.mode in ("per_source", "upsample_code_arxiv_book")
        self.budgets: dict[str, float] = {}
        self.names: dict[str, str] = {}
        if self.per_source:
            for source, share in config.resolved_shares().items():
                key = canonical_source(source)
                if key in self.budgets:
                    raise ValueError(f"shares name source {source!r} twice (names match case-insensitively)")
                self.budgets[key] = share * config.total_tokens
                self.names[key] = source
        self.kept_tokens: dict[str, float] = {key: 0.0 for key in self.budgets}
        self.total_kept = 0.0

    def _key(self, source: str | None) -> str:
        if source is None:
            raise ValueError(f"mode {self.config.mode} needs a source per document: set --source-key")
        key = canonical_source(source)
        if key not in self.budgets:
            known = ", ".join(self.names.values())
            raise ValueError(
                f"source {source!r} has no share (known: {known}): give shares for every source with "
                "--shares name=weight,... or a JSON/YAML file, or use --mode global"
            )
        return key

    def offer(self, source: str | None, length: float) -> bool:
        """Whether to keep a document of `length` tokens from `source`; updates the budgets."""
        if self.finished:
            return False
        if self.per_source:
            key = self._key(source)
            if self.kept_tokens[key] >= self.budgets[key]:
                return False
        if self.config.mode != "none" and length < self.config.length_threshold:
            if self.rng.random() >= self.config.short_keep_probability:
                return False
        if self.per_source:
            self.kept_tokens[key] += length
        self.total_kept += length
        return True

    @property
    def finished(self) -> bool:
        if self.per_source:
            return all(self.kept_tokens[key] >= budget for key, budget in self.budgets.items())
        return self.config.total_tokens is not None and self.total_kept >= self.config.total_tokens

    def budget_report(self) -> dict[str, dict[str, float | bool]]:
        return {
            self.names[key]: {
                "budget": budget,
                "kept": self.kept_tokens[key],
                "met": self.kept_tokens[key] >= budget,
            }
            for key, budget in self.budgets.items()
        }


def parse_shares(text: str) -> dict[str, float]:
    """`--shares` value: `name=weight,name=weight` or the path of a JSON/YAML mapping."""
    path = Path(text)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"shares file {path} does not exist")
        loaded = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"shares file {path} must hold a mapping source -> weight")
        items = list(loaded.items())
    else:
        items = []
        for part in text.split(","):
            name, separator, value = part.partition("=")
            if not separator or not name.strip():
                raise ValueError(f"--shares entry {part!r} is not name=weight (e.g. --shares Github=0.5,Book=0.5)")
            items.append((name.strip(), value))
    shares: dict[str, float] = {}
    for name, value in items:
        try:
            shares[str(name)] = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"share of {name!r} is not a number: {value!r}") from error
    return shares
