"""tools/select_bases.py run as a user would: YAML that a config accepts, PNG figures, errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_harpe.config import ModelConfig
from megatron_harpe.position.bases import PAPER_LLAMA2_7B_BASES
from megatron_harpe.position.config import PositionConfig

TOOL = Path(__file__).resolve().parents[2] / "tools" / "select_bases.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def test_paper_strategy_prints_a_snippet_the_config_accepts() -> None:
    result = run_tool("--strategy", "paper", "--heads", "32")
    assert result.returncode == 0, result.stderr
    snippet = yaml.safe_load(result.stdout)
    assert snippet["position"]["bases"] == list(PAPER_LLAMA2_7B_BASES)
    llama2 = ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32)
    resolved = PositionConfig(**snippet["position"]).resolve(llama2, seq_length=131072)
    assert resolved.query_head_bases(llama2) == list(PAPER_LLAMA2_7B_BASES)


def test_peak_valley_with_plot(tmp_path: Path) -> None:
    figure = tmp_path / "figures" / "bases.png"
    result = run_tool(
        "--strategy", "peak_valley", "--heads", "8", "--head-dim", "64", "--base-min", "1e4",
        "--base-max", "6e4", "--stride", "2e3", "--target-length", "16384", "--plot", str(figure),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bases = yaml.safe_load(result.stdout)["position"]["bases"]
    assert len(bases) == 8 and bases == sorted(set(bases)) and bases[0] == 1.0e4 and bases[-1] <= 6.0e4
    assert figure.read_bytes().startswith(PNG_SIGNATURE) and figure.stat().st_size > 10_000
    assert [p.name for p in figure.parent.iterdir()] == ["bases.png"]  # no temporary left behind


def test_one_base_per_kv_group_under_gqa() -> None:
    result = run_tool(
        "--strategy", "uniform", "--heads", "32", "--kv-groups", "8", "--base-min", "1e6", "--base-max", "5e6",
        "--order", "descending",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    position = yaml.safe_load(result.stdout)["position"]
    assert position["gqa_bases"] == "per_group"
    assert position["bases"] == pytest.approx([5.0e6 - g * 4.0e6 / 7 for g in range(8)])
    llama3_like = ModelConfig(hidden_size=4096, num_attention_heads=32, num_query_groups=8)
    resolved = PositionConfig(**position).resolve(llama3_like)
    assert resolved.query_head_bases(llama3_like)[:4] == [5.0e6] * 4


def test_compare_ranks_all_strategies_and_plots(tmp_path: Path) -> None:
    figure = tmp_path / "compare.png"
    result = run_tool("--compare", "--heads", "32", "--target-length", "32768", "--plot", str(figure))
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if not line.startswith("#")][1:]  # after the header
    rows = [re.match(r"(?P<label>\S+(?: \S+)?)\s+(?P<coverage>[0-9.]+)\s+(?P<distinct>\d+)\s", line) for line in table]
    assert all(rows), result.stdout
    labels = [row["label"] for row in rows]
    assert sorted(labels) == sorted(["paper", "uniform ascending", "uniform descending", "peak_valley", "constant"])
    scores = [float(row["coverage"]) for row in rows]
    assert scores == sorted(scores, reverse=True) and labels[-1] == "constant" and scores[-1] == 0.0
    assert min(scores[:-1]) > 0.05
    assert figure.read_bytes().startswith(PNG_SIGNATURE)


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    figure = tmp_path / "never.png"
    result = run_tool("--strategy", "explicit", "--heads", "4", "--values", "1e6,2e6", "--plot", str(figure))
    assert result.returncode == 2
    assert "values has 2 values but the model has 4" in result.stderr
    assert not figure.exists() and list(tmp_path.iterdir()) == []
    result = run_tool("--strategy", "uniform", "--heads", "6", "--kv-groups", "4")
    assert result.returncode == 2 and "multiple of --kv-groups" in result.stderr
