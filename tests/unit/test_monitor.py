"""Training monitor: log line fields, throughput and ETA from measured step times, TensorBoard
events readable by tensorboard, non-finite loss policies.

Run: pytest tests/unit/test_monitor.py
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_harpe.training.monitor import (
    NonFiniteLossError,
    TrainingMonitor,
    check_loss_finite,
    format_duration,
)


class FakeClock:
    """A clock the test advances by hand, so step times are known exactly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_line_has_every_field_with_measured_throughput_and_eta() -> None:
    clock, lines = FakeClock(), []
    monitor = TrainingMonitor(
        total_steps=100,
        log_every=5,
        clock=clock,
        emit=lines.append,
        flops_per_token=1e6,
        peak_flops=1e10,
        memory=lambda: ("peak mem", 3 * 2**30),
    )
    for step in range(1, 11):
        clock.now += 2.0 if step <= 5 else 4.0
        monitor.log_step(step, loss=2.5 - step * 0.01, lr=1.5e-5, grad_norm=0.8125, tokens=4096)
    assert len(lines) == 2
    fields = lines[1].split(" | ")
    assert fields[:4] == ["step 10/100", "loss 2.4000", "lr 1.50e-05", "grad norm 0.812"]
    # steps 6..10 took 4 s each for 4096 tokens: 1024 tokens/s
    assert fields[4] == "1,024 tok/s"
    assert fields[5] == "MFU 10.2%"  # 1024 tok/s x 1e6 FLOPs per token / 1e10 FLOP/s
    assert fields[6] == "peak mem 3.00 GiB"
    assert fields[7] == "elapsed 0:00:30"
    # mean of the last 10 step times (5 x 2 s, 5 x 4 s) = 3 s, 90 steps left
    assert fields[8] == "left 0:04:30"
    assert monitor.eta_seconds(10) == pytest.approx(270.0)


def test_no_mfu_without_a_peak_and_cpu_memory_is_labelled_rss() -> None:
    lines = []
    monitor = TrainingMonitor(total_steps=1, log_every=1, emit=lines.append, flops_per_token=1e6)
    monitor.log_step(1, loss=1.0, lr=1.0, grad_norm=1.0, tokens=10)
    assert "MFU" not in lines[0] and " | peak RSS " in lines[0]  # the tests run on CPU


def test_eta_window_follows_recent_speed() -> None:
    clock = FakeClock()
    monitor = TrainingMonitor(total_steps=20, log_every=100, eta_window=3, clock=clock, emit=lambda _: None)
    for step, seconds in enumerate([60.0, 1.0, 1.0, 1.0], start=1):
        clock.now += seconds
        monitor.log_step(step, loss=1.0, lr=1.0, grad_norm=1.0, tokens=1)
    assert monitor.eta_seconds(4) == pytest.approx(16.0)  # the slow first step left the window


def test_last_step_always_logged_and_skips_counted() -> None:
    clock, lines = FakeClock(), []
    monitor = TrainingMonitor(total_steps=7, log_every=5, start_step=3, clock=clock, emit=lines.append)
    for step in range(4, 8):
        clock.now += 1.0
        monitor.log_step(
            step, loss=math.nan if step == 6 else 1.0, lr=1e-4, grad_norm=0.5, tokens=10, skipped=step == 6
        )
    assert [line.split(" | ")[0] for line in lines] == ["step 5/7", "step 7/7"]
    assert lines[-1].endswith("left 0:00:00 | skipped 1")


def test_disabled_monitor_is_silent(tmp_path: Path) -> None:
    lines: list[str] = []
    monitor = TrainingMonitor(
        total_steps=2, log_every=1, log_dir=str(tmp_path / "tb"), enabled=False, emit=lines.append
    )
    assert monitor.log_step(1, loss=1.0, lr=1.0, grad_norm=1.0, tokens=1) is None
    monitor.add_scalars(1, {"ppl": 3.0})
    monitor.close()
    assert lines == [] and not (tmp_path / "tb").exists()


def test_tensorboard_events_are_written_and_readable(tmp_path: Path) -> None:
    clock, lines = FakeClock(), []
    log_dir = tmp_path / "tb"
    with TrainingMonitor(total_steps=4, log_every=2, log_dir=str(log_dir), clock=clock, emit=lines.append) as monitor:
        for step in range(1, 5):
            clock.now += 0.5
            monitor.log_step(step, loss=3.0 / step, lr=1e-4 * step, grad_norm=0.25 * step, tokens=100)
        monitor.add_scalars(4, {"perplexity": 12.5, "passkey": 75.0})
    assert re.fullmatch(r"step 4 eval: perplexity 12\.5, passkey 75", lines[-1])
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_second",
        "eval/perplexity",
        "eval/passkey",
    } <= set(scalars)
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([3.0, 1.5, 1.0, 0.75])
    assert [e.value for e in events.Scalars("train/tokens_per_second")] == pytest.approx([200.0, 200.0])
    assert events.Scalars("eval/perplexity")[0].value == pytest.approx(12.5)


def test_finite_loss_passes_every_policy() -> None:
    assert check_loss_finite(2.3, 5, "skip") and check_loss_finite(2.3, 5, "stop")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_skip_policy_warns_and_returns_false(bad: float, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert check_loss_finite(bad, 42, "skip") is False
    assert "step 42" in caplog.text and "skipping" in caplog.text


def test_stop_policy_raises_with_advice() -> None:
    with pytest.raises(NonFiniteLossError) as error:
        check_loss_finite(math.nan, 17, "stop", what="gradient norm")
    message = str(error.value)
    assert "step 17" in message and "gradient norm is nan" in message
    assert "train.lr" in message and "data" in message and "train.on_nonfinite=skip" in message


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="train.on_nonfinite"):
        check_loss_finite(1.0, 1, "ignore")


def test_format_duration() -> None:
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(math.nan) == "?"
