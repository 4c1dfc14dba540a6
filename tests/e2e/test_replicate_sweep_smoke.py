"""The replication's budget and heads sweep (experiments/replicate/sweep.py, issue 19) end to end
at smoke scale, and the arithmetic of its report.

Run: pytest tests/e2e/test_replicate_sweep_smoke.py   (about 30 s on an idle 2-core machine)

The smoke sweep goes through the real entry points with tiny models: two seeds, two heads
settings, two budgets, base models in gated rounds; a second invocation must resume without
rerunning anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "replicate" / "sweep.py"
sys.path.insert(0, str(REPO / "experiments" / "replicate"))


def run_sweep(output: Path, workdir: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    command = [sys.executable, str(SWEEP), "--output", str(output), "--workdir", str(workdir), "--smoke", "--jobs", "0"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600)


@pytest.mark.slow  # ~100 s; the replication smoke run stays in the default suite
def test_smoke_sweep_trains_every_cell_reports_and_resumes(tmp_path):
    from sweep import SMOKE_SWEEP

    output, workdir = tmp_path / "results", tmp_path / "work"
    result = run_sweep(output, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = SMOKE_SWEEP
    scale = json.loads((output / "scale.json").read_text())
    assert scale["budgets"] == list(sweep.budgets) and scale["heads"] == list(sweep.heads)
    # the budget sweep at (32 wide, 4 heads); the heads comparison, 4 and 8 heads, at 64 wide
    assert sweep.models() == [(32, 4), (64, 4), (64, 8)] and scale["models"] == [[32, 4], [64, 4], [64, 8]]
    assert (
        scale["runs"]
        == len(sweep.runs())
        == len(sweep.methods) * len(sweep.scale.seeds) * (len(sweep.budgets) + len(sweep.heads))
    )

    steps_by_budget: dict[tuple[int, int, int], set] = {}
    for hidden, heads, budget, method, seed in sweep.runs():
        name = sweep.run_name(hidden, heads, budget, method, seed)
        config = yaml.safe_load((output / "configs" / f"{name}.yaml").read_text())
        assert (config["model"]["hidden_size"], config["model"]["num_attention_heads"]) == (hidden, heads)
        assert config["model"]["ffn_hidden_size"] == sweep.scale.ffn_hidden_size * hidden // sweep.scale.hidden_size
        tokens = (
            sum(stage["tokens"] for stage in config["stages"])
            if "stages" in config
            else config["train"]["train_tokens"]
        )
        assert tokens == budget
        steps = int((workdir / "checkpoints" / name / "latest_checkpointed_iteration.txt").read_text())
        steps_by_budget.setdefault((hidden, heads, budget), set()).add(steps)
        assert (workdir / "eval" / name / "results.json").exists()
        base = config["checkpoint"]["pretrained"]
        assert f"/{sweep.model_name(hidden, heads)}_base_seed{seed}" in base
        base_config = yaml.safe_load((output / "configs" / f"{Path(base).name}.yaml").read_text())
        assert base_config["model"] == {**config["model"], "max_position_embeddings": sweep.scale.base_length}
    assert all(len(steps) == 1 for steps in steps_by_budget.values()), steps_by_budget  # equal steps per cell
    small, large = (steps_by_budget[sweep.scale.hidden_size, sweep.heads[0], budget].pop() for budget in sweep.budgets)
    assert large == 2 * small

    # the gate is unreachable at smoke scale: every base model trains every round, each from the last
    round2 = yaml.safe_load((output / "configs" / "h4_base_seed1_round2.yaml").read_text())
    assert round2["checkpoint"]["pretrained"].endswith("h4_base_seed1")
    assert "base_grammar" in scale and scale["base_grammar"]["query_share"] == sweep.base_grammar["query_share"]

    report = (output / "sweep.md").read_text()
    for section in (
        "## Base models",
        "vs adaptation budget",
        "## Exact match minus abf_multistage's, paired by seed",
        "## Digit accuracy minus abf_multistage's, paired by seed",
        "## Trend",
        "## Model shapes at",
    ):
        assert section in report
    assert "| 32 | 4 | 1 | 2 | 16,384 |" in report and "| 64 | 8 | 2 | 2 | 8,192 |" in report  # rounds, tokens
    for model in sweep.models():  # every shape in the comparison at heads_budget, with HARPE's paired difference
        assert f"| harpe | {model[0]} | {model[1]} |" in report and f"| {model[0]} | {model[1]} | " in report
    summary = json.loads((output / "sweep_summary.json").read_text())
    assert set(summary["trend"]) == {f"{m}@{k}" for m in ("harpe", "abf") for k in sweep.scale.eval_lengths[1:]}
    assert (output / "sweep.png").stat().st_size > 1000

    commands_before = (output / "commands.md").read_text()
    again = run_sweep(output, workdir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "running 0" in again.stdout and "running 1" not in again.stdout
    assert (output / "commands.md").read_text().count("pretrain_harpe.py") == commands_before.count("pretrain_harpe.py")


def test_trend_is_the_per_seed_slope_over_log_budget():
    from sweep import SMOKE_SWEEP
    from sweep_report import trend, verdict

    sweep = SMOKE_SWEEP  # budgets 4096, 8192 at 4 heads, hidden 32; seeds 1 and 2
    cells = {}
    for budget, gaps in zip(sweep.budgets, ((-20.0, -10.0), (-10.0, -4.0))):
        cells[32, 4, budget, "abf_multistage"] = {seed: {"exact": {256: 50.0}} for seed in (1, 2)}
        cells[32, 4, budget, "harpe"] = {seed: {"exact": {256: 50.0 + gap}} for seed, gap in zip((1, 2), gaps)}
        cells[64, 4, budget, "harpe"] = {seed: {"exact": {256: 0.0}} for seed in (1, 2)}  # another shape: not in it
    fit = trend(cells, sweep, "harpe", 256)
    per_doubling = [10.0, 6.0]  # the gap closes by 10 and 6 points per doubling of the budget
    expected = [value / 0.30103 for value in per_doubling]  # per 10x
    assert fit["slope_per_10x"] == pytest.approx(sum(expected) / 2)
    assert fit["seeds"] == 2 and verdict(fit) == "the gap narrows as the budget grows"
    assert verdict({"slope_per_10x": 1.0, "std": 10.0, "stderr": 7.0, "seeds": 2}) == "no trend beyond the seed spread"
    assert verdict(None) == "not measured"


def test_balance_spreads_costly_chains_over_workers():
    from run import balance

    chains = [[(name, [], Path(name))] for name in ("a", "b", "c", "d")]
    shares = balance(chains, 2, {"a": 10.0, "b": 1.0, "c": 1.0, "d": 8.0})
    loads = sorted(sum({"a": 10.0, "b": 1.0, "c": 1.0, "d": 8.0}[chain[0][0]] for chain in share) for share in shares)
    assert loads == [10.0, 10.0]
    assert sorted(chain[0][0] for share in shares for chain in share) == ["a", "b", "c", "d"]


def test_fresh_queries_ask_each_value_once_and_only_after_its_needle():
    import random

    from megatron_harpe.eval.tasks.synthetic_kv import training_document

    for seed in range(20):
        words = training_document(254, random.Random(seed), mean_gap=1.5, query_share=0.4, fresh_queries=True).split()
        assert len(words) == 254
        latest: dict[str, list[str]] = {}
        asked: set[str] = set()
        queries = 0
        for index, word in enumerate(words[:-4]):
            if word == "set":
                latest[words[index + 1]] = words[index + 2 : index + 5]
                asked.discard(words[index + 1])
            elif word == "get":
                key = words[index + 1]
                assert key not in asked, f"seed {seed}: {key} asked twice for one value"
                assert words[index + 2 : index + 5] == latest[key]
                asked.add(key)
                queries += 1
        assert queries >= 3


def test_paired_differences_compare_the_same_seed_on_either_score():
    from sweep_report import paired

    cells = {
        (128, 8, 100, "harpe"): {
            1: {"exact": {512: 30.0}, "digits": {512: 60.0}},
            2: {"exact": {512: 10.0}, "digits": {512: 50.0}},
        },
        (128, 8, 100, "abf_multistage"): {
            2: {"exact": {512: 25.0}, "digits": {512: 45.0}},
            3: {"exact": {512: 5.0}, "digits": {512: 20.0}},
        },
        (256, 8, 100, "abf_multistage"): {1: {"exact": {512: 0.0}, "digits": {512: 0.0}}},
    }
    assert paired(cells, "harpe", "abf_multistage", (128, 8), 100, 512) == [-15.0]  # seed 2 only: both have it
    assert paired(cells, "harpe", "abf_multistage", (128, 8), 100, 512, "digits") == [5.0]


def test_extensions_of_a_passed_base_model_run_beside_the_next_base_round(tmp_path, monkeypatch):
    import sweep as sweep_module

    class RecordingRunner:  # the phases sweep.py would run, without running them
        def __init__(self) -> None:
            self.workdir, self.phases = tmp_path / "work", []

        def progress(self, message: str) -> None:
            pass

        def run_all(self, phase, chains, costs=None) -> None:
            self.phases.append((phase, [chain[0][0] for chain in chains]))

    # seed 1 of the budget sweep's model passes in round 1, everything else never does
    monkeypatch.setattr(
        sweep_module, "exact_match_at", lambda eval_dir, length: 100.0 if eval_dir.name == "h4_base_seed1" else 0.0
    )
    sweep, runner = sweep_module.SMOKE_SWEEP, RecordingRunner()
    data = {
        "tokenizer": "t.json",
        "base_prefix": "b",
        "extension_prefix": "e",
        "base_mask": "bm",
        "extension_mask": "em",
        "vocab_size": 128,
    }
    bases = sweep_module.train_and_extend(runner, sweep, data, data_dir := tmp_path / "out")
    (phase1, names1), (phase2, names2), (phase3, names3) = runner.phases
    assert phase1 == "base round 1" and len(names1) == 6  # 3 model shapes x 2 seeds
    assert phase2 == "base round 2 + extensions of 1 base model"
    seed1_runs = {sweep.run_name(*run) for run in sweep.runs() if (run[0], run[1], run[4]) == (32, 4, 1)}
    assert "h4_base_seed1_round2" not in names2 and seed1_runs <= set(names2) and len(names2) == 5 + len(seed1_runs)
    assert phase3 == "extend+eval" and not seed1_runs & set(names3)
    assert sorted(names2[5:] + names3) == sorted(sweep.run_name(*run) for run in sweep.runs())  # each once
    assert bases[32, 4, 1]["passed"] and bases[32, 4, 1]["rounds"] == 1 and not bases[64, 8, 2]["passed"]
    assert bases[64, 8, 2]["rounds"] == sweep.base_max_rounds
    assert (data_dir / "configs" / "h4_harpe_4k_seed1.yaml").exists()


def test_the_heads_comparison_is_chosen_on_the_command_line_and_checked(capsys):
    from sweep import build_parser, main, sweep_from_args

    wide = sweep_from_args(
        build_parser().parse_args(
            ["--output", "x", "--heads", "8", "16", "--heads-hidden", "256", "--heads-round-tokens", "1500000"]
        )
    )
    assert wide.models() == [(128, 8), (256, 8), (256, 16)] and wide.round_tokens(256) == 1_500_000
    assert wide.round_tokens(128) == wide.base_round_tokens
    budget_runs = [run for run in wide.runs() if run[:2] == (128, 8)]
    assert len(budget_runs) == len(wide.budgets) * 3 * 3 and len(wide.runs()) == len(budget_runs) + 2 * 3 * 3
    assert wide.run_name(128, 8, 150_000, "harpe", 1) == "h8_harpe_150k_seed1"  # shared with the default sweep
    assert wide.run_name(256, 16, 150_000, "harpe", 1) == "w256_h16_harpe_150k_seed1"
    default = sweep_from_args(build_parser().parse_args(["--output", "x"]))
    assert default.models() == [(128, 8), (128, 4)]
    only = sweep_from_args(
        build_parser().parse_args(["--output", "x", "--heads", "8", "16", "--heads-hidden", "256", "--heads-only"])
    )
    assert only.models() == [(256, 8), (256, 16)]  # no 128-wide model, no budget sweep
    assert sorted({run[:3] for run in only.runs()}) == [(256, 8, 150_000), (256, 16, 150_000)]
    assert len(only.runs()) == 2 * 3 * 3

    for bad in (["--heads", "8", "5", "--heads-hidden", "256"], ["--heads", "0"], ["--heads", "8", "128"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--output", "x", *bad])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "heads" in error and "Traceback" not in error


def test_a_heads_only_report_has_the_comparison_and_no_budget_tables():
    import dataclasses

    from sweep import SMOKE_SWEEP
    from sweep_report import markdown

    sweep = dataclasses.replace(SMOKE_SWEEP, heads_only=True)  # 4 and 8 heads at hidden 64
    cells = {
        (64, heads, sweep.heads_budget, method): {
            seed: {"exact": {64: 90.0, 256: score + seed}, "digits": {64: 95.0, 256: 50.0}} for seed in (1, 2)
        }
        for heads in (4, 8)
        for method, score in (("harpe", 40.0 + heads), ("abf", 30.0), ("abf_multistage", 35.0))
    }
    bases = {
        (64, heads, seed): {"rounds": 1, "tokens": 4096, "exact_match": 90.0, "passed": True}
        for heads in (4, 8)
        for seed in (1, 2)
    }
    text, summary = markdown(cells, sweep, bases)
    assert "vs adaptation budget" not in text and "## Trend" not in text and "budgets" not in text
    assert "Heads per layer at equal width (hidden 64):" in text and "Rounds of 4,096 tokens until" in text
    assert "| harpe | 64 | 8 | 90.0 ± 0.0 | 49.5 ± 0.7 |" in text
    assert "| 64 | 8 | +0.0 ± 0.0 (0/2) | +13.0 ± 0.0 (2/2) |" in text  # harpe 48+seed minus 35+seed
    assert summary["trend"] == {} and summary["heads"]["harpe:64x4@256"] == [9.0, 9.0]
