"""Fault: resuming a run with a config that changes the model or the data order.

    python -m pytest tests/faults/test_resume_config.py -q            (add -m slow for the trainer run)

On main, other bases, seq_length or global batch resumed without a word. Now such a change is
refused with the diff unless --checkpoint.allow_config_change names it; harmless changes are
listed in one line.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from megatron_harpe.checkpointing.resume_check import check_resume_config, compare_configs
from megatron_harpe.config import Config, from_dict

SAVED = Config().to_dict()
SAVED["position"]["bases"] = [10000.0, 500000.0]


def _changed(**dotted) -> dict:
    tree = copy.deepcopy(SAVED)
    for key, value in dotted.items():
        section, name = key.split("__")
        tree[section][name] = value
    return tree


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(position__bases=[10000.0, 400000.0]), "position.bases"),
        (dict(data__seq_length=1024), "data.seq_length"),
        (dict(train__global_batch_size=16), "train.global_batch_size"),
        (dict(model__num_layers=3), "model.num_layers"),
        (dict(data__prefixes=["other/corpus"]), "data.prefixes"),
        (dict(data__seed=7), "data.seed"),
    ],
)
def test_changes_of_function_or_data_order_are_refused_with_the_diff(change, key) -> None:
    with pytest.raises(
        ValueError,
        match=rf"changes the model or the data order: {key}: .* -> .*"
        rf"--checkpoint.allow_config_change {key}",
    ):
        check_resume_config(SAVED, _changed(**change), log=lambda line: None)


def test_allowed_changes_pass_and_are_listed(capsys) -> None:
    lines: list[str] = []
    current = _changed(data__seq_length=1024, train__global_batch_size=16)
    check_resume_config(SAVED, current, allowed="data.seq_length, train", log=lines.append)
    assert lines == [
        "config changes since the checkpoint: data.seq_length 512 -> 1024, train.global_batch_size 8 -> 16"
    ]
    with pytest.raises(ValueError, match=r"data\.seq_length: 512 -> 1024\. "):
        check_resume_config(SAVED, current, allowed="train.global_batch_size", log=lines.append)


def test_harmless_changes_are_listed_in_one_line() -> None:
    lines: list[str] = []
    current = _changed(logging__log_interval=1, train__train_tokens=10**6, parallel__tensor=2)
    current["checkpoint"]["save_interval"] = 50
    check_resume_config(SAVED, current, log=lines.append)
    assert len(lines) == 1
    assert "logging.log_interval 10 -> 1" in lines[0] and "parallel.tensor 1 -> 2" in lines[0]
    assert "checkpoint.save_interval 0 -> 50" in lines[0] and "train.train_tokens 0 -> 1000000" in lines[0]


def test_identical_configs_say_nothing_and_new_keys_with_defaults_are_not_changes() -> None:
    lines: list[str] = []
    check_resume_config(SAVED, copy.deepcopy(SAVED), log=lines.append)
    older = copy.deepcopy(SAVED)
    del older["parallel"]["timeout_minutes"]  # a checkpoint written before the key existed
    assert compare_configs(older, SAVED) == {}
    assert lines == []


def test_stage_changes_are_protected_but_a_longer_stage_is_not() -> None:
    saved = from_dict(
        Config, {"stages": [{"seq_length": 64, "tokens": 100}, {"seq_length": 128, "tokens": 100}]}
    ).to_dict()
    longer = copy.deepcopy(saved)
    longer["stages"][1]["tokens"] = 300
    check_resume_config(saved, longer, log=lambda line: None)
    dropped = copy.deepcopy(saved)
    dropped["stages"].pop()
    with pytest.raises(ValueError, match=r"stages: '<2 entries>' -> '<1 entries>'"):
        check_resume_config(saved, dropped, log=lambda line: None)


# ------------------------------------------------------------------ through the trainer (slow)

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))


def _train_expecting(tree: dict) -> str:
    from megatron_harpe.training.loop import train

    try:
        train(from_dict(Config, tree))
    except ValueError as error:
        return str(error)
    return "trained"


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_refuses_other_bases_on_resume_unless_allowed(demo_data, tmp_path: Path) -> None:
    from test_training import tiny_config

    from megatron_harpe import parallel

    tree = tiny_config(demo_data, checkpoint={"save": str(tmp_path / "ckpt")}, train={"exit_after_steps": 2})
    assert parallel.run_on_ranks(_train_expecting, 1, tree) == ["trained"]
    changed = copy.deepcopy(tree)
    changed["position"]["bases"] = [500.0, 30000.0]
    (message,) = parallel.run_on_ranks(_train_expecting, 1, changed)
    assert "position.bases: [300.0, 30000.0] -> [500.0, 30000.0]" in message
    changed["checkpoint"]["allow_config_change"] = "position.bases"
    assert parallel.run_on_ranks(_train_expecting, 1, changed) == ["trained"]
