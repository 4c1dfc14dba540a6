"""Learning-rate schedule: warm-up, constant, cosine values at known steps; state round trip.

Run: pytest tests/unit/test_schedule.py
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from megatron_harpe.training.schedule import LearningRateSchedule


def test_linear_warmup_from_zero_reaches_peak_on_last_warmup_step() -> None:
    schedule = LearningRateSchedule(peak_lr=1e-3, warmup_steps=4, total_steps=10)
    assert [schedule.lr_at(s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_warmup_from_min_starts_above_min() -> None:
    schedule = LearningRateSchedule(peak_lr=1.0, warmup_steps=4, total_steps=10, min_lr=0.2, warmup_from="min")
    assert schedule.lr_at(0) == pytest.approx(0.2 + 0.8 * 1 / 4)
    assert schedule.lr_at(3) == pytest.approx(1.0)


def test_constant_after_warmup_ignores_min_lr() -> None:
    schedule = LearningRateSchedule(peak_lr=2e-5, warmup_steps=3, total_steps=100, min_lr=1e-6)
    assert {schedule.lr_at(s) for s in range(3, 150)} == {2e-5}


def test_cosine_endpoints_and_midpoint() -> None:
    peak, floor = 1e-3, 1e-4
    schedule = LearningRateSchedule(peak_lr=peak, warmup_steps=10, total_steps=110, style="cosine", min_lr=floor)
    assert schedule.lr_at(10) == pytest.approx(peak)
    assert schedule.lr_at(60) == pytest.approx((peak + floor) / 2)
    assert schedule.lr_at(35) == pytest.approx(floor + (peak - floor) * (1 + math.cos(math.pi / 4)) / 2)
    assert schedule.lr_at(110) == pytest.approx(floor)
    assert schedule.lr_at(500) == pytest.approx(floor)
    decaying = [schedule.lr_at(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decaying, decaying[1:]))


def test_cosine_without_warmup_starts_at_peak() -> None:
    schedule = LearningRateSchedule(peak_lr=1.0, warmup_steps=0, total_steps=4, style="cosine")
    assert [schedule.lr_at(s) for s in range(5)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])


def test_step_sets_every_group_and_advances() -> None:
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=123.0)
    schedule = LearningRateSchedule(peak_lr=1.0, warmup_steps=2, total_steps=5)
    assert schedule.step(optimizer) == pytest.approx(0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.5])
    assert schedule.completed_steps == 1
    assert schedule.current_lr() == pytest.approx(1.0)


def test_state_round_trip_resumes_same_sequence() -> None:
    settings = dict(peak_lr=1e-3, warmup_steps=5, total_steps=50, style="cosine", min_lr=1e-5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    original = LearningRateSchedule(**settings)
    for _ in range(17):
        original.step(optimizer)
    resumed = LearningRateSchedule(**settings)
    resumed.load_state_dict(original.state_dict())
    assert resumed.completed_steps == 17
    assert [resumed.step(optimizer) for _ in range(40)] == [original.step(optimizer) for _ in range(40)]


def test_load_with_changed_settings_keeps_new_settings_and_warns(caplog) -> None:
    old = LearningRateSchedule(peak_lr=1e-3, warmup_steps=5, total_steps=50)
    old.completed_steps = 20
    new = LearningRateSchedule(peak_lr=1e-3, warmup_steps=5, total_steps=80)
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(old.state_dict())
    assert new.completed_steps == 20 and new.total_steps == 80
    assert "total_steps: 50 -> 80" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(style="linear"), "train.lr_schedule"),
        (dict(min_lr=2.0), "train.min_lr"),
        (dict(warmup_steps=11), "train.warmup_steps"),
        (dict(total_steps=0), "at least one step"),
        (dict(warmup_from="peak"), "warm-up start"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, message: str) -> None:
    settings = dict(peak_lr=1.0, warmup_steps=2, total_steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        LearningRateSchedule(**settings)


def test_load_rejects_foreign_state() -> None:
    schedule = LearningRateSchedule(peak_lr=1.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="completed_steps"):
        schedule.load_state_dict({"last_epoch": 3})
