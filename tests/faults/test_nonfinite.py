"""Faults: weights and runs that are not finite (issue 27 cases 6 and 11).

    python -m pytest tests/faults/test_nonfinite.py -q

Before: from NaN weights with train.on_nonfinite: skip, 40 of 40 steps were skipped, iter_38
and iter_40 were saved with the same NaN weights and the run exited 0; NaN/inf weights
converted in both directions unchecked; `--verify` printed FAILED next to "greedy continuations
agree"; evaluation reported passkey 0 and ppl nan with exit code 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_support import error_lines, run
from data_support import tiny_training_config

from megatron_harpe import parallel
from megatron_harpe.convert.verify import VerifyReport

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=4096,
    max_position_embeddings=64,
)
POISONED = "decoder.final_layernorm.weight"


def _save_with_nan(save_dir: str, tokenizer: str) -> None:
    import torch

    from megatron_harpe.checkpointing.checkpoint import save_checkpoint
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.model import build_model

    config = from_dict(
        Config,
        {"model": TINY, "position": {"type": "harpe", "bases": [300.0, 30000.0]}, "data": {"tokenizer": tokenizer}},
    )
    config.position.resolve(config.model)
    parallel.initialize(1, 1)
    gpt = build_model(config.model, config.position)
    with torch.no_grad():
        dict(gpt.named_parameters())[POISONED][:5] = float("nan")
    save_checkpoint(save_dir, 0, model=gpt, config=config.to_dict(), train_state={"weights_only": True})


@pytest.fixture(scope="module")
def nan_checkpoint(demo_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nan") / "ckpt"
    parallel.run_on_ranks(_save_with_nan, 1, str(path), str(demo_data.tokenizer))
    return path


def test_megatron_to_hf_refuses_nan_weights_by_name(nan_checkpoint, tmp_path: Path) -> None:
    completed = run(
        "tools/convert_checkpoint.py",
        "megatron-to-hf",
        "--input",
        str(nan_checkpoint),
        "--output",
        str(tmp_path / "hf"),
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert f"{POISONED} (5 NaN/inf of 64)" in line and "--allow-nonfinite" in line
    assert not (tmp_path / "hf").exists()


def test_verify_never_says_nan_logits_agree(nan_checkpoint, tmp_path: Path) -> None:
    completed = run(
        "tools/convert_checkpoint.py",
        "megatron-to-hf",
        "--input",
        str(nan_checkpoint),
        "--output",
        str(tmp_path / "hf"),
        "--allow-nonfinite",
        "--verify",
    )
    assert completed.returncode == 1, completed.stderr  # exported on purpose, then the check fails
    said = completed.stdout + completed.stderr
    assert "verify: FAILED" in said and "hold NaN/inf" in said and "agree" not in said


def test_a_report_over_nan_logits_is_not_ok_and_says_why() -> None:
    report = VerifyReport(
        max_abs_logit_diff=float("nan"),
        max_abs_logit=float("nan"),
        megatron_tokens=[0, 0],
        hf_tokens=[0, 0],
        prompt_length=8,
        nonfinite_logits=("megatron", "HF"),
    )
    assert not report.ok(1e-3) and not report.greedy_agree
    assert "agree" not in report.summary() and "megatron and HF hold NaN/inf" in report.summary()


def test_hf_to_megatron_refuses_nan_weights_by_name(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    source = tmp_path / "hf"
    source.mkdir()
    save_tiny_tokenizer(str(source))
    save_tiny_llama(str(source), seed=0)
    weights = load_file(source / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, :3] = float("inf")
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    completed = run(
        "tools/convert_checkpoint.py", "hf-to-megatron", "--input", str(source), "--output", str(tmp_path / "ckpt")
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "model.layers.1.mlp.up_proj.weight (3 NaN/inf of" in line and "--allow-nonfinite" in line
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    allowed = run(
        "tools/convert_checkpoint.py",
        "hf-to-megatron",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "ckpt"),
        "--allow-nonfinite",
    )
    assert allowed.returncode == 0, allowed.stderr


def test_evaluate_refuses_nan_weights(nan_checkpoint, demo_data, tmp_path: Path) -> None:
    completed = run(
        "tools/evaluate.py",
        "--model",
        str(nan_checkpoint),
        "--tokenizer",
        str(demo_data.tokenizer),
        "--task",
        "passkey",
        "--lengths",
        "128",
        "--samples",
        "1",
        "--output-dir",
        str(tmp_path / "eval"),
        "--no-progress",
    )
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert line.startswith(f"error: model {nan_checkpoint} holds non-finite weights: {POISONED} (5 NaN/inf of 64)")
    assert not (tmp_path / "eval").exists()


def _train(tree: dict) -> dict:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training.loop import train

    try:
        history = train(from_dict(Config, tree))
        outcome = f"trained {len(history)} steps"
    except ValueError as error:
        outcome = str(error)
    save = Path(tree["checkpoint"]["save"])
    return {"outcome": outcome, "saved": sorted(path.name for path in save.glob("iter_*")) if save.is_dir() else []}


@pytest.mark.distributed
@pytest.mark.parametrize("save_interval", [0, 1])
def test_a_run_that_skips_every_step_stops_and_saves_no_nan_weights(
    nan_checkpoint, demo_data, tmp_path: Path, save_interval: int
) -> None:
    tree = yaml.safe_load(
        tiny_training_config(
            tmp_path / "run.yaml",
            demo_data.prefix,
            str(demo_data.tokenizer),
            train={"on_nonfinite": "skip", "train_tokens": 40 * 2 * 64, "max_consecutive_skips": 3},
            checkpoint={
                "pretrained": str(nan_checkpoint),
                "save": str(tmp_path / "ckpt"),
                "save_interval": save_interval,
            },
        ).read_text()
    )
    (result,) = parallel.run_on_ranks(_train, 1, tree)
    assert result["saved"] == []
    if save_interval:  # the first save finds the weights not finite
        assert result["outcome"].startswith(
            f"step 1: the weights hold NaN/inf ({POISONED} (5 of 64)), so they were not saved"
        )
    else:
        assert result["outcome"].startswith("step 3: 3 optimizer steps in a row were skipped for a NaN/inf loss")
        assert f"The weights themselves hold NaN/inf ({POISONED})" in result["outcome"]
