"""Watching a training run: periodic log lines, TensorBoard scalars and the NaN/inf policy.

`TrainingMonitor` is driven by the loop once per optimizer step. It measures the wall time
between consecutive calls itself, and every `log_every` steps (and at the last step) prints (one line, wrapped here)::

    step 120/5000 | loss 2.3456 | lr 1.50e-05 | grad norm 0.812 | 12,345 tok/s | MFU 41.2% |
    peak mem 61.3 GiB | elapsed 0:12:34 | left 8:19:10

tokens/s covers the steps since the previous line; "left" (ETA) is the mean duration of the
last `eta_window` steps times the steps remaining, so a slow first step (warm-up, allocator)
fades out. MFU (model FLOPs utilisation) is tokens/s x the model's FLOPs per token (forward and
backward, no recompute: training/memory.model_flops_per_token) / (devices x peak FLOP/s); it
shows when a peak is known (logging.peak_tflops, or the GPU's name in PEAK_TFLOPS), so not on
CPU unless given. "peak mem" is this rank's torch.cuda.max_memory_allocated on a GPU; on CPU the
line says "peak RSS", the process's peak resident memory (getrusage), which also counts Python
and the libraries. With a `log_dir` it also writes TensorBoard scalars (``train/loss``,
``train/lr``, ``train/grad_norm`` every step; ``train/tokens_per_second``, ``train/mfu`` and
``train/peak_memory_gib`` (or ``train/peak_rss_gib``) at each log line) and `add_scalars` records
anything else (eval results). Only the main rank should log: build it
with ``enabled=ctx.is_main``; a disabled monitor does nothing.

`check_loss_finite` implements ``train.on_nonfinite``: ``"skip"`` logs a warning and returns
False (the loop skips that optimizer step), ``"stop"`` raises `NonFiniteLossError`. Pass the
loss reduced over all ranks, so every rank takes the same decision. `check_skip_limit` stops a
run whose steps are all skipped (``train.max_consecutive_skips`` in a row), and
`check_weights_finite` keeps non-finite weights out of checkpoints.

Usage::

    monitor = TrainingMonitor(total_steps=5000, log_every=cfg.logging.log_interval,
                              log_dir=cfg.logging.tensorboard_dir, enabled=ctx.is_main)
    for step in range(start, total):
        ...
        if check_loss_finite(loss, step + 1, cfg.train.on_nonfinite):
            lr = schedule.step(optimizer); optimizer.step()
        monitor.log_step(step + 1, loss=loss, lr=lr, grad_norm=norm, tokens=tokens_per_step)
    monitor.close()

Read the scalars with ``tensorboard --logdir <log_dir>``.
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
import time
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}
"""Dense bf16 tensor-core peak TFLOP/s by GPU name (vendor data sheets; SXM unless named), first match wins."""


def peak_tflops(configured: float | None) -> float | None:
    """The peak TFLOP/s of one device: `configured` (logging.peak_tflops), else the table entry for
    the CUDA device's name, else None (CPU, or an unknown GPU: no MFU)."""
    if configured is not None:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def peak_memory() -> tuple[str, float]:
    """(label, bytes): this rank's peak CUDA memory allocated by tensors, or on CPU the process's
    peak resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "peak mem", float(torch.cuda.max_memory_allocated())
    import resource

    return "peak RSS", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class NonFiniteLossError(ValueError):
    """The loss (or gradient norm) became NaN or infinite and the policy is "stop", or it stayed
    so for train.max_consecutive_skips steps under "skip", or the weights to save are not finite.
    (A ValueError: the command line prints it as one line.)"""


def check_loss_finite(loss: float, step: int, policy: str, *, what: str = "loss") -> bool:
    """True if `loss` is finite. Otherwise apply `policy`: "skip" warns and returns False,
    "stop" raises NonFiniteLossError. `what` names the quantity ("loss", "gradient norm")."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"unknown non-finite policy {policy!r}: set train.on_nonfinite to one of {NONFINITE_POLICIES}")
    if math.isfinite(loss):
        return True
    if policy == "skip":
        logger.warning("step %d: %s is %s; skipping this optimizer step (train.on_nonfinite=skip)", step, what, loss)
        return False
    raise NonFiniteLossError(
        f"step {step}: {what} is {loss}. Training stopped (train.on_nonfinite=stop). Try a lower "
        "learning rate (train.lr) or longer warm-up (train.warmup_steps), check the data for "
        "corrupt or empty documents; for rare spikes only, train.on_nonfinite=skip skips such steps "
        "(and stops after train.max_consecutive_skips in a row)."
    )


def check_skip_limit(consecutive: int, limit: int, step: int, model) -> None:
    """Under train.on_nonfinite=skip: stop once `limit` steps in a row were skipped (a run that
    learns nothing must not run on and exit 0), saying whether the weights themselves are bad.
    Every rank sees the same reduced loss, so every rank stops at the same step."""
    if consecutive < limit:
        return
    from megatron_harpe.convert.finite import nonfinite_counts

    bad = nonfinite_counts(model.named_parameters())
    weights = (
        f" The weights themselves hold NaN/inf ({', '.join(list(bad)[:3])}{' ...' if len(bad) > 3 else ''}): "
        "start from finite weights (checkpoint.pretrained, or an earlier checkpoint)."
        if bad
        else ""
    )
    raise NonFiniteLossError(
        f"step {step}: {consecutive} optimizer steps in a row were skipped for a NaN/inf loss or gradient norm "
        f"(train.on_nonfinite=skip, train.max_consecutive_skips={limit}): the run is not learning.{weights} Try a "
        "lower train.lr or a longer warm-up, check the data, or raise train.max_consecutive_skips."
    )


def check_weights_finite(model, step: int) -> None:
    """Before a save: refuse to write weights holding NaN/inf (agreed by all ranks)."""
    from megatron_harpe.convert.finite import nonfinite_counts
    from megatron_harpe.rank_health import any_rank_failed

    bad = nonfinite_counts(model.named_parameters())
    if any_rank_failed(bool(bad)):
        listed = ", ".join(f"{name} ({count} of {total})" for name, (count, total) in list(bad.items())[:3])
        raise NonFiniteLossError(
            f"step {step}: the weights hold NaN/inf ({listed or 'on another rank'}), so they were not saved: the "
            "newest checkpoint is the last good one. Try a lower train.lr or a longer warm-up, or check the data."
        )


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS (days folded into hours); "?" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


class TrainingMonitor:
    """Rank-0 progress lines, TensorBoard scalars, throughput and ETA; see module docstring."""

    def __init__(
        self,
        *,
        total_steps: int,
        log_every: int = 10,
        log_dir: str | None = None,
        enabled: bool = True,
        start_step: int = 0,
        eta_window: int = 50,
        clock: Callable[[], float] = time.perf_counter,
        emit: Callable[[str], None] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        memory: Callable[[], tuple[str, float]] | None = peak_memory,
    ) -> None:
        """`start_step`: steps already done (resume). `clock` and `emit` (default: print) are
        injectable for tests and custom sinks. `flops_per_token` (model FLOPs, set per stage)
        and `peak_flops` (FLOP/s of all devices together) give the MFU; `memory` returns
        (label, bytes) of the peak memory (None: not shown)."""
        if log_every < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {log_every}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if eta_window < 1:
            raise ValueError(f"eta_window must be >= 1, got {eta_window}")
        self.total_steps = total_steps
        self.log_every = log_every
        self.enabled = enabled
        self._clock = clock
        self._emit = emit or (lambda line: print(line, flush=True))
        self._start_time = clock()
        self._last_time = self._start_time
        self._recent_step_seconds: collections.deque[float] = collections.deque(maxlen=eta_window)
        self._tokens_since_line = 0
        self._seconds_since_line = 0.0
        self._skipped_steps = 0
        self._last_step = start_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._memory = memory
        self._writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)

    def reset_clock(self) -> None:
        """Restart step timing now (call after setup work that should not count as a step)."""
        self._start_time = self._last_time = self._clock()

    def eta_seconds(self, step: int) -> float:
        """Estimated seconds until `total_steps`, from the recent measured step times."""
        if not self._recent_step_seconds:
            return math.nan
        mean_step = sum(self._recent_step_seconds) / len(self._recent_step_seconds)
        return mean_step * max(0, self.total_steps - step)

    def log_step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        skipped: bool = False,
    ) -> str | None:
        """Record the step just finished (`step` counts from 1; `tokens`: processed by the whole
        job in this step). Returns the log line when one is printed, else None."""
        now = self._clock()
        step_seconds = now - self._last_time
        self._last_time = now
        # steps since the previous call (normally 1) share the measured time
        steps_done = max(1, step - self._last_step)
        self._last_step = step
        self._recent_step_seconds.extend([step_seconds / steps_done] * steps_done)
        self._tokens_since_line += tokens
        self._seconds_since_line += step_seconds
        self._skipped_steps += int(skipped)
        if not self.enabled:
            return None
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)
            self._writer.add_scalar("train/grad_norm", grad_norm, step)
        if step % self.log_every and step != self.total_steps:
            return None
        tokens_per_second = (
            self._tokens_since_line / self._seconds_since_line if self._seconds_since_line > 0 else math.nan
        )
        fields = [
            f"step {step}/{self.total_steps}",
            f"loss {loss:.4f}",
            f"lr {lr:.2e}",
            f"grad norm {grad_norm:.3f}",
            f"{tokens_per_second:,.0f} tok/s" if math.isfinite(tokens_per_second) else "? tok/s",
        ]
        mfu = None
        if self.flops_per_token and self.peak_flops and math.isfinite(tokens_per_second):
            mfu = tokens_per_second * self.flops_per_token / self.peak_flops
            fields.append(f"MFU {100 * mfu:.1f}%")
        memory = self._memory() if self._memory is not None else None
        if memory is not None:
            fields.append(f"{memory[0]} {memory[1] / 2**30:.2f} GiB")
        fields += [
            f"elapsed {format_duration(now - self._start_time)}",
            f"left {format_duration(self.eta_seconds(step))}",
        ]
        if self._skipped_steps:
            fields.append(f"skipped {self._skipped_steps}")
        line = " | ".join(fields)
        self._emit(line)
        if self._writer is not None:
            if math.isfinite(tokens_per_second):
                self._writer.add_scalar("train/tokens_per_second", tokens_per_second, step)
            if mfu is not None:
                self._writer.add_scalar("train/mfu", mfu, step)
            if memory is not None:
                tag = "train/peak_memory_gib" if memory[0] == "peak mem" else "train/peak_rss_gib"
                self._writer.add_scalar(tag, memory[1] / 2**30, step)
            self._writer.flush()
        self._tokens_since_line = 0
        self._seconds_since_line = 0.0
        return line

    def add_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "eval") -> None:
        """Write `scalars` (e.g. eval results) to TensorBoard as ``prefix/name`` and log them."""
        if not self.enabled:
            return
        self._emit(f"step {step} {prefix}: " + ", ".join(f"{name} {value:.4g}" for name, value in scalars.items()))
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(f"{prefix}/{name}", float(value), step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
