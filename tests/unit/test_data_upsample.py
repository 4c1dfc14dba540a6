"""The length-upsampling rule (Fu et al. 2024, arXiv 2402.10171): budgets per source, shares, the short-document
keep rate, determinism, modes and share parsing.

    pytest tests/unit/test_data_upsample.py
"""

from __future__ import annotations

import json
import math
import random

import pytest

from megatron_harpe.data.upsample import (
    SLIMPAJAMA_SHARES,
    LengthUpsampler,
    UpsampleConfig,
    code_arxiv_book_shares,
    parse_shares,
)


def synthetic_stream(
    count: int, sources: list[str], long_fraction: float = 0.3, seed: int = 0
) -> list[tuple[str, int]]:
    """(source, length) pairs: short documents 50..4095 tokens, long ones 4096..40000."""
    rng = random.Random(seed)
    stream = []
    for _ in range(count):
        source = rng.choice(sources)
        length = rng.randint(4096, 40000) if rng.random() < long_fraction else rng.randint(50, 4095)
        stream.append((source, length))
    return stream


def run(config: UpsampleConfig, stream: list[tuple[str, int]]) -> tuple[LengthUpsampler, list[int]]:
    sampler = LengthUpsampler(config)
    kept = []
    for index, (source, length) in enumerate(stream):
        if sampler.offer(source, length):
            kept.append(index)
        if sampler.finished:
            break
    return sampler, kept


def test_budgets_are_met_per_source_and_shares_kept():
    sources = list(SLIMPAJAMA_SHARES)
    stream = synthetic_stream(200_000, sources)
    total = 20_000_000
    sampler, kept = run(UpsampleConfig(mode="per_source", total_tokens=total), stream)
    assert sampler.finished
    kept_by_source: dict[str, int] = {source: 0 for source in sources}
    last_length: dict[str, int] = {}
    for index in kept:
        source, length = stream[index]
        kept_by_source[source] += length
        last_length[source] = length
    for source, share in SLIMPAJAMA_SHARES.items():
        budget = share * total
        assert kept_by_source[source] >= budget, source
        assert kept_by_source[source] - last_length[source] < budget, (
            f"{source} took a document after its budget was met"
        )
        # the overshoot is at most one document, so shares hold to within one long document
        assert kept_by_source[source] / total == pytest.approx(share, abs=40000 / total)


def test_short_documents_kept_at_the_stated_rate_long_ones_always():
    stream = synthetic_stream(60_000, ["C4"], long_fraction=0.2, seed=1)
    config = UpsampleConfig(mode="per_source", total_tokens=10**12, shares={"C4": 1.0}, short_keep_probability=0.1)
    _, kept = run(config, stream)
    kept_set = set(kept)
    short = [index for index, (_, length) in enumerate(stream) if length < 4096]
    long = [index for index, (_, length) in enumerate(stream) if length >= 4096]
    assert all(index in kept_set for index in long)
    rate = sum(index in kept_set for index in short) / len(short)
    standard_error = math.sqrt(0.1 * 0.9 / len(short))
    assert abs(rate - 0.1) < 5 * standard_error, rate


def test_long_share_rises_like_the_paper():
    """With 30% of tokens in long documents, keeping 10% of short ones lifts it to about 80%."""
    rng = random.Random(3)
    stream = [("CommonCrawl", 20000 if rng.random() < 0.03 else 1200) for _ in range(50_000)]
    before = sum(length for _, length in stream if length >= 4096) / sum(length for _, length in stream)
    _, kept = run(UpsampleConfig(mode="global"), stream)
    kept_lengths = [stream[index][1] for index in kept]
    after = sum(length for length in kept_lengths if length >= 4096) / sum(kept_lengths)
    assert 0.25 < before < 0.4 and after > 0.75


def test_deterministic_for_a_seed():
    stream = synthetic_stream(20_000, list(SLIMPAJAMA_SHARES), seed=2)
    config = UpsampleConfig(mode="per_source", total_tokens=2_000_000, seed=7)
    assert run(config, stream)[1] == run(UpsampleConfig(**vars(config)), stream)[1]
    other = UpsampleConfig(mode="per_source", total_tokens=2_000_000, seed=8)
    assert run(other, stream)[1] != run(config, stream)[1]


def test_global_and_none_modes_ignore_sources_and_stop_at_the_budget():
    stream = synthetic_stream(5_000, ["anything", "else"], seed=4)
    sampler, kept = run(UpsampleConfig(mode="none", total_tokens=1_000_000), stream)
    kept_tokens = sum(stream[index][1] for index in kept)
    assert kept == list(range(len(kept))) and kept_tokens >= 1_000_000
    assert kept_tokens - stream[kept[-1]][1] < 1_000_000
    sampler, kept = run(UpsampleConfig(mode="global"), stream)  # no budget: whole corpus
    long = [index for index, (_, length) in enumerate(stream) if length >= 4096]
    assert set(long) <= set(kept) and not sampler.finished


def test_code_arxiv_book_mode_reweights_those_sources():
    shares = code_arxiv_book_shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert (
        shares["Github"]
        == shares["ArXiv"]
        == shares["Book"]
        == pytest.approx(0.6 / (0.6 * 3 + 0.53374772 + 0.26609933 + 0.03402128 + 0.03169647))
    )
    assert shares["C4"] / shares["CommonCrawl"] == pytest.approx(
        SLIMPAJAMA_SHARES["C4"] / SLIMPAJAMA_SHARES["CommonCrawl"]
    )
    sampler = LengthUpsampler(UpsampleConfig(mode="upsample_code_arxiv_book", total_tokens=1000))
    assert sampler.budget_report()["Book"]["budget"] == pytest.approx(1000 * shares["Book"])


def test_redpajama_source_names_match_the_table():
    sampler = LengthUpsampler(UpsampleConfig(mode="per_source", total_tokens=10**9))
    assert sampler.offer("RedPajamaArXiv", 5000) and sampler.offer("redpajamabook", 5000)
    assert sampler.budget_report()["ArXiv"]["kept"] == 5000


def test_unknown_sources_and_bad_settings_are_clear_errors():
    sampler = LengthUpsampler(UpsampleConfig(mode="per_source", total_tokens=10**6))
    with pytest.raises(ValueError, match="source 'Manual' has no share.*--shares"):
        sampler.offer("Manual", 10)
    with pytest.raises(ValueError, match="--total-tokens"):
        LengthUpsampler(UpsampleConfig(mode="per_source"))
    with pytest.raises(ValueError, match="unknown"):
        LengthUpsampler(UpsampleConfig(mode="sometimes"))
    with pytest.raises(ValueError, match="per_source only"):
        LengthUpsampler(UpsampleConfig(mode="global", shares={"a": 1.0}))
    with pytest.raises(ValueError, match="non-negative"):
        LengthUpsampler(UpsampleConfig(mode="per_source", total_tokens=10, shares={"a": -1.0}))


def test_parse_shares_from_text_json_and_yaml(tmp_path):
    assert parse_shares("Github=3, Book=1") == {"Github": 3.0, "Book": 1.0}
    (tmp_path / "s.json").write_text(json.dumps({"a": 0.25, "b": 0.75}))
    (tmp_path / "s.yaml").write_text("a: 1\nb: 3\n")
    assert parse_shares(str(tmp_path / "s.json")) == {"a": 0.25, "b": 0.75}
    assert parse_shares(str(tmp_path / "s.yaml")) == {"a": 1.0, "b": 3.0}
    config = UpsampleConfig(mode="per_source", total_tokens=100, shares=parse_shares(str(tmp_path / "s.yaml")))
    assert config.resolved_shares() == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError, match="not name=weight"):
        parse_shares("Github")
    with pytest.raises(ValueError, match="not a number"):
        parse_shares("Github=lots")
