"""The precision modes (training/mixed_precision.py): which one a config runs on each device,
the fp32 accumulation of bf16 gradients, and the reduction/norm code reading `main_grad`.

    python -m pytest tests/unit/test_mixed_precision.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe.config import Config, TrainConfig, load_config
from megatron_harpe.training.grads import allreduce_gradients, clip_grad_norm
from megatron_harpe.training.memory import PRECISIONS, trainer_precision
from megatron_harpe.training.mixed_precision import attach_main_grads, gradient_of, training_precision


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


def test_micro_batch_gradients_accumulate_in_fp32() -> None:
    """1 + 2^-10 is not a bf16 number: accumulating in .grad would lose the second gradient."""
    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.weight = weight
    attach_main_grads(model)
    weight.sum().backward()
    (weight * 2**-10).sum().backward()
    assert weight.grad is None and weight.main_grad.dtype == torch.float32
    assert torch.equal(weight.main_grad, torch.full((3,), 1 + 2**-10))
    assert gradient_of(weight) is weight.main_grad


def test_norm_and_clipping_use_the_fp32_main_grad() -> None:
    model = torch.nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    attach_main_grads(model)
    model(torch.ones(2, 4, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    expected = model.weight.main_grad.clone()
    allreduce_gradients(model, None)  # one rank: nothing to reduce
    norm = clip_grad_norm(model, 1e-3, None)
    assert norm == pytest.approx(float(expected.norm()))
    assert model.weight.grad is None
    assert float(model.weight.main_grad.norm()) == pytest.approx(1e-3, rel=1e-4)  # clipped in fp32
    assert torch.allclose(model.weight.main_grad, expected * (1e-3 / (norm + 1e-6)))
