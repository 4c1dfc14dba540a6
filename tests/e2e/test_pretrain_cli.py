"""pretrain_harpe.py's command line: every preset validates and plans, and bad configs exit
with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import pretrain_harpe

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_dry_runs(config, capsys):
    world_size = 32 if config.stem.startswith("llama2") else 2
    assert pretrain_harpe.main(["--config", str(config), "--dry-run", "--world-size", str(world_size)]) == 0
    out = capsys.readouterr().out
    assert f"world size {world_size}" in out and "total:" in out


def test_llama2_7b_harpe_plan_numbers(capsys):
    config = Path(__file__).parents[2] / "configs" / "llama2_7b_128k_harpe.yaml"
    assert pretrain_harpe.main(["--config", str(config), "--dry-run", "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "tensor 4 x context 4 x data 2" in out
    assert "6.738B parameters" in out  # Llama2-7B
    assert "32 bases 1e+06..4.54e+06" in out
    assert "4,194,304 tokens/step x 1,431 steps" in out
    # the CUDA plan, shown on a machine without Transformer Engine
    assert "attention: Transformer Engine attention, context parallel p2p" in out
    assert "sequence parallel on" in out
    # bf16 compute over fp32 shards (the default on GPU), as loop.build_model_and_optimizer builds it
    assert "precision: on GPU bf16 compute weights gathered from fp32 sharded main weights" in out
    # the sharding engine, named, and the planner's choice of recompute (none: it fits 80 GiB with the headroom)
    assert "sharding engine: PyTorch FSDP2 (fully_shard per transformer layer, ZeRO-3) over DP x CP, 8 ranks" in out
    assert "reduce-scattered in fp32 every micro-batch" in out and "recompute: none" in out
    # 1.685B parameters per GPU x 16 B / 8 ranks
    assert "sharded state 3.14 GiB" in out and "with the headroom (CUDA context, NCCL, fragmentation)" in out


def test_multistage_plan_has_three_stages(capsys):
    config = Path(__file__).parents[2] / "configs" / "llama2_7b_128k_abf_multistage.yaml"
    assert pretrain_harpe.main(["--config", str(config), "--dry-run", "--world-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "stage 0: seq 32768" in out and "stage 2: seq 131072" in out and "base 5e+06" in out
    # every stage keeps 4.2M tokens per step through its own global batch, so equal tokens are equal steps
    for stage, batch in ((0, 128), (1, 64), (2, 32)):
        assert (
            f"global batch {batch}, 4,194,304 tokens/step x 477 steps"
            in out.split(f"stage {stage}:")[1].splitlines()[0]
        )


def test_stage_batch_size_must_split_over_data_parallel_ranks(tmp_path, capsys):
    tree = yaml.safe_load((Path(__file__).parents[2] / "configs" / "llama2_7b_128k_abf_multistage.yaml").read_text())
    tree["stages"][1]["global_batch_size"] = 63
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tree))
    assert pretrain_harpe.main(["--config", str(tmp_path / "bad.yaml"), "--dry-run", "--world-size", "32"]) == 2
    assert "stages[1].global_batch_size=63 is not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--parallel.context", "3"], "2 x parallel.context"),
        (["--parallel.tensor", "3"], "parallel.tensor=3 does not divide"),
        (["--train.global_batch_size", "5"], "train.global_batch_size=5"),
        (["--model.attention_backend", "sdpa"], "parallel.cp_comm_type=p2p is Transformer Engine's"),
        (
            ["--model.attention_backend", "sdpa", "--parallel.cp_comm_type", "auto"],
            "parallel.sequence_parallel needs model.attention_backend: te",
        ),
        (["--parallel.cp_comm_type", "ring"], "parallel.cp_comm_type='ring' is not one of"),
        (["--trian.lr", "1"], "unknown config key"),
    ],
)
def test_config_errors_exit_before_anything_starts(overrides, message, capsys):
    config = Path(__file__).parents[2] / "configs" / "llama2_7b_128k_harpe.yaml"
    code = pretrain_harpe.main(["--config", str(config), "--dry-run", "--world-size", "32", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err


def test_tiny_cpu_run_logs_mfu_and_peak_memory(demo_data, tmp_path):
    """One process, 4 steps: the log line carries MFU (a peak is given: CPUs have no table
    entry) and the peak resident memory, labelled as such; TensorBoard gets both."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    repo = Path(__file__).parents[2]
    completed = subprocess.run(
        [
            sys.executable,
            str(repo / "pretrain_harpe.py"),
            "--config",
            str(repo / "configs" / "demo_cpu.yaml"),
            "--parallel.context",
            "1",
            "--data.seq_length",
            "128",
            "--model.max_position_embeddings",
            "128",
            "--train.train_tokens",
            "4096",
            "--train.global_batch_size",
            "8",
            "--train.micro_batch_size",
            "4",
            "--train.warmup_steps",
            "1",
            "--data.demo_workdir",
            str(demo_data.corpus.parent),
            "--logging.log_interval",
            "1",
            "--logging.tensorboard_dir",
            str(tmp_path / "tb"),
            "--checkpoint.save",
            "null",
            "--logging.peak_tflops",
            "1.0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("step 4/4")]
    assert lines and " | MFU " in lines[0] and " | peak RSS " in lines[0] and " GiB | " in lines[0], completed.stdout
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/mfu", "train/peak_rss_gib"} <= set(events.Tags()["scalars"])
    mfu = events.Scalars("train/mfu")[-1].value
    assert 0 < mfu < 1  # a tiny model on 1 CPU core against a 1 TFLOP/s peak
