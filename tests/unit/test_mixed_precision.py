"""The precision modes (training/mixed_precision.py): which one a config runs on each device.
(bf16 compute over fp32 shards, reduced and accumulated in fp32: tests/distributed/test_sharding.py.)

    python -m pytest tests/unit/test_mixed_precision.py -q
"""

from __future__ import annotations

import pytest

from megatron_harpe.config import Config, TrainConfig, load_config
from megatron_harpe.planner.memory import PRECISIONS, trainer_precision
from megatron_harpe.training.mixed_precision import training_precision


@pytest.mark.parametrize(
    "precision,params_dtype,gpu,cpu",
    [
        ("auto", "auto", "bf16", "fp32"),  # the default: bf16 params on a GPU, fp32 on the CPU
        ("bf16", "auto", "bf16", "bf16"),
        ("fp32", "auto", "fp32", "fp32"),
        ("auto", "bf16", "bf16", "bf16"),  # how the CPU tests select it
        ("bf16", "bf16", "bf16", "bf16"),
        ("auto", "fp32", "autocast", "fp32"),
        ("bf16", "fp32", "autocast", None),  # autocast over fp32 weights: GPU only, as before
        ("fp32", "fp32", "fp32", "fp32"),
    ],
)
def test_modes(precision, params_dtype, gpu, cpu) -> None:
    train = TrainConfig(precision=precision, params_dtype=params_dtype)
    assert training_precision(train, "cuda") == gpu
    if cpu is None:
        with pytest.raises(ValueError, match="needs a GPU; on CPU use train.params_dtype: bf16"):
            training_precision(train, "cpu")
    else:
        assert training_precision(train, "cpu") == cpu
    cfg = Config(train=train)
    assert trainer_precision(cfg, "gpu") == PRECISIONS[gpu]  # what the planner and the dry run count


def test_bf16_params_with_fp32_compute_is_refused_by_the_config() -> None:
    overrides = ["train.params_dtype=bf16", "train.precision=fp32", "data.demo_workdir=/tmp/x", "train.train_tokens=64"]
    with pytest.raises(ValueError, match="train.params_dtype=bf16 computes in bf16 but train.precision=fp32"):
        load_config(None, overrides).validate()
    with pytest.raises(ValueError, match="train.params_dtype='half' is not one of auto, fp32, bf16"):
        load_config(None, ["train.params_dtype=half", "data.demo_workdir=/tmp/x", "train.train_tokens=64"]).validate()
