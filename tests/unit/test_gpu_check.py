"""scripts/gpu_check.sh's CPU-testable parts: arguments, the reduced preset, the layouts it checks,
comparisons, the table, and (slow) the whole check on the CPU at tiny widths.

    python -m pytest tests/unit/test_gpu_check.py -q            (-m slow for the whole check)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_harpe import gpu_check
from megatron_harpe.gpu_check import check_layouts, parse_args, reduced_tree
from megatron_harpe.gpu_check_common import CheckResult, compare, format_table, visible_devices

REPO = Path(__file__).resolve().parents[2]
LLAMA = dict(num_attention_heads=32, num_query_groups=None, vocab_size=32000)


def test_compare_passes_within_tolerance_and_fails_beyond():
    assert compare("x", [1.0, 2.0], [1.0, 2.01], rtol=0.01, atol=0.0).status == "PASS"
    failed = compare("x", [1.0, 2.2], [1.0, 2.0], rtol=0.01, atol=0.0)
    assert failed.status == "FAIL" and "max |diff| 0.2" in failed.detail
    assert compare("x", [1.0], [1.0, 2.0], 0.1, 0.1).status == "FAIL"  # shapes differ
    assert compare("x", torch.tensor([float("nan")]), torch.tensor([1.0]), 1.0, 1.0).status == "FAIL"


def test_table_lists_every_check_and_the_verdict():
    table = format_table([CheckResult("logits", "PASS", "ok"), CheckResult("parity", "SKIP", "needs 2 GPUs"),
                          CheckResult("resume", "FAIL", "drifted")])  # fmt: skip
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["check", "result"]
    assert any(line.startswith("parity") and "SKIP" in line and "needs 2 GPUs" in line for line in lines)
    assert lines[-1].split()[:2] == ["overall", "FAIL"] and "1 failed, 1 passed, 1 skipped" in lines[-1]
    assert format_table([CheckResult("a", "PASS", "")]).splitlines()[-1].split()[1] == "PASS"


def test_arguments(capsys):
    args, overrides = parse_args(["--device", "cpu", "--train.recompute", "full"])
    assert (args.device, args.gpus, args.steps, args.seq, args.layers) == ("cpu", 4, 6, 256, 2)
    assert overrides == ["train.recompute=full"]
    for bad, message in ((["--device", "cpu", "--steps", "3"], "even number"),
                         (["--device", "cpu", "--gpus", "5"], "between 1 and"),
                         (["--only", "speed"], "invalid choice"),
                         (["--device", "cpu", "oops"], "unrecognised argument")):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_layouts_run_the_presets_kind_of_parallelism_on_this_node():
    preset = {"tensor": 4, "context": 4}
    assert check_layouts(preset, LLAMA, 8) == [(4, 2, 1), (2, 2, 2)]  # TP, SP and CP; then DP x CP sharding too
    assert check_layouts(preset, LLAMA, 4) == [(2, 2, 1), (1, 2, 2)]
    assert check_layouts(preset, LLAMA, 2) == [(1, 2, 1), (1, 1, 2)]
    assert check_layouts(preset, LLAMA, 1) == []  # one GPU: the reference only
    assert check_layouts({"tensor": 2, "context": 4}, LLAMA, 8) == [(2, 4, 1), (1, 4, 2)]  # the multi-stage preset
    assert check_layouts({"tensor": 4, "context": 1}, LLAMA, 8) == [(4, 1, 2), (2, 1, 4)]


def _args(argv):
    args, overrides = parse_args(argv)
    return args, overrides


def test_the_reduced_preset_keeps_its_path(tmp_path, monkeypatch):
    args, overrides = _args(["--device", "cpu"])
    args.device, args.seq = "cuda", 16384  # what a GPU node runs
    tree = reduced_tree(args, overrides, tmp_path)
    model = tree["model"]
    assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"], model["attention_backend"]) == (
        2,
        4096,
        11008,
        "te",
    )
    assert tree["parallel"]["sequence_parallel"] and tree["parallel"]["cp_comm_type"] == "p2p"
    assert tree["train"]["precision"] == "bf16" and tree["train"]["recompute"] == "none"
    assert tree["train"]["train_tokens"] == 6 * 4 * 16384 and tree["data"]["seq_length"] == 16384
    assert tree["checkpoint"] == {"pretrained": str(tmp_path / "initial_weights")}
    assert len(tree["position"]["bases"]) == 32 and tree["position"]["type"] == "harpe"
    assert gpu_check.with_layout(tree, (4, 2, 1))["parallel"]["sequence_parallel"]
    reference = gpu_check.with_layout(tree, (1, 1, 1), train={"exit_after_steps": 3})
    assert not reference["parallel"]["sequence_parallel"] and reference["train"]["exit_after_steps"] == 3
    from megatron_harpe.config import Config, from_dict

    from_dict(Config, reference).validate(world_size=1, require_backend=False)  # one GPU: a config the trainer takes
    from_dict(Config, gpu_check.with_layout(tree, (2, 2, 2))).validate(world_size=8, require_backend=False)

    cpu, cpu_overrides = _args(["--device", "cpu", "--train.recompute", "full", "--train.recompute_method", "block",
                                "--train.recompute_num_layers", "8"])  # fmt: skip
    tiny = reduced_tree(cpu, cpu_overrides, tmp_path)
    assert tiny["model"]["hidden_size"] == 64 and tiny["model"]["attention_backend"] == "sdpa"
    assert not tiny["parallel"]["sequence_parallel"] and tiny["position"]["strategy"] == "uniform"
    assert tiny["train"]["recompute_num_layers"] == 2  # capped to the reduced model's layers

    staged, staged_overrides = _args(
        ["--device", "cpu", "--config", str(REPO / "configs" / "llama2_7b_128k_abf_multistage.yaml")]
    )
    staged.device = "cuda"
    multistage = reduced_tree(staged, staged_overrides, tmp_path)
    assert multistage["stages"] == [] and multistage["position"]["base"] == 5e6  # the last stage's encoding


def test_cpu_runs_hide_cuda_and_restore_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with visible_devices("cpu"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with visible_devices("cuda"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_help_lists_the_preset_path_checks():
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout  # fmt: skip
    for words in ("preset's own training path", "parallel:", "sequence parallelism", "p2p ring", "recompute",
                  "sharding engine", "TP4 x CP2 and\nTP2 x CP2 x DP2", "parity <layout>", "resume",
                  "in-training evaluation", "memory <layout>", "planner", "throughput <layout>", "documents: packed",
                  "Tolerances, bf16", "--device cpu"):  # fmt: skip
        assert words in out, words


@pytest.mark.slow
@pytest.mark.timeout(3000)  # 8 training runs, 4 of them with 4 ranks
def test_the_whole_check_runs_on_cpu(tmp_path, capsys):
    """The preset's path at tiny widths on 4 gloo processes, with a partial recompute on top."""
    code = gpu_check.main(["--device", "cpu", "--steps", "4", "--workdir", str(tmp_path),
                           "--train.recompute", "full", "--train.recompute_method", "block",
                           "--train.recompute_num_layers", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    for row in ("logits: equal bases = stock RoPE (cpu)", "logits: sdpa on cpu vs cpu", "reference: TP1 x CP1",
                "parity TP2 x CP2: loss", "parity TP2 x CP2: grad norm", "parity CP2 x DP2: loss",
                "evaluation: in training on TP2 x CP2", "resume: saved on CP2 x DP2 at step 2, resumed on TP2 x CP2",
                "throughput TP2 x CP2", "memory TP2 x CP2", "documents: sdpa packed = alone (cpu, fp32)"):  # fmt: skip
        assert row in out, row
    assert out.splitlines()[-1].split()[:2] == ["overall", "PASS"]


def test_a_config_no_run_can_take_stops_before_the_first_run(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--seq", "250", "--only", "reference", "--workdir", str(tmp_path)]) == 2
    assert "sequence length 250 (stage 0) is not divisible by 2 x parallel.context = 4" in capsys.readouterr().err
    assert not (tmp_path / "initial_weights").exists()
