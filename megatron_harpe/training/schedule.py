"""Learning-rate schedule: linear warm-up, then constant or cosine decay to a floor.

Steps are counted in optimizer updates. ``lr_at(step)`` is the rate used by update number
``step`` (0-based, i.e. the number of updates already applied before it):

- warm-up, ``step < warmup_steps``: linear from a start value to ``peak_lr``,
  ``start + (peak_lr - start) * (step + 1) / warmup_steps``, so the first update already
  moves the weights and update ``warmup_steps - 1`` runs at the peak. The start is 0
  (``warmup_from="zero"``, the usual choice) or ``min_lr`` (``warmup_from="min"``);
- ``"constant"``: ``peak_lr`` for every later step (the long-context data recipe this project
  follows trains at a constant rate);
- ``"cosine"``: half a cosine from ``peak_lr`` at ``warmup_steps`` down to ``min_lr`` at
  ``total_steps``, ``min_lr + (peak_lr - min_lr) * (1 + cos(pi * progress)) / 2`` with
  ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``; midway it is
  ``(peak_lr + min_lr) / 2``. Steps past ``total_steps`` stay at ``min_lr``.

The schedule owns one counter, ``completed_steps``. ``step(optimizer)`` writes the rate for
the next update into every parameter group, then advances the counter; call it right before
``optimizer.step()`` and skip both when an update is skipped (non-finite loss), so a skipped
step does not consume schedule. The counter is all a checkpoint needs (``state_dict``).

Usage::

    schedule = LearningRateSchedule(peak_lr=2e-5, warmup_steps=100, total_steps=5000,
                                    style="cosine", min_lr=2e-6)
    lr = schedule.step(optimizer)   # sets lr on all groups for this update
    optimizer.step()
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)

SCHEDULE_STYLES = ("constant", "cosine")
WARMUP_STARTS = ("zero", "min")


class LearningRateSchedule:
    """Warm-up then constant or cosine learning rate; see the module docstring for formulas."""

    def __init__(
        self,
        *,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        style: str = "constant",
        min_lr: float = 0.0,
        warmup_from: str = "zero",
    ) -> None:
        if style not in SCHEDULE_STYLES:
            raise ValueError(
                f"unknown learning-rate schedule {style!r}: set train.lr_schedule to one of {SCHEDULE_STYLES}"
            )
        if warmup_from not in WARMUP_STARTS:
            raise ValueError(f"unknown warm-up start {warmup_from!r}: use one of {WARMUP_STARTS}")
        if peak_lr < 0:
            raise ValueError(f"train.lr must be >= 0, got {peak_lr}")
        if not 0.0 <= min_lr <= peak_lr:
            raise ValueError(f"train.min_lr={min_lr} must lie in [0, train.lr={peak_lr}]: lower train.min_lr")
        if total_steps < 1:
            raise ValueError(
                f"the run has {total_steps} optimizer steps: raise train.train_tokens or lower "
                "train.global_batch_size so there is at least one step"
            )
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"train.warmup_steps={warmup_steps} must lie in [0, total steps={total_steps}]: "
                "lower train.warmup_steps"
            )
        self.peak_lr = float(peak_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.style = style
        self.warmup_from = warmup_from
        self.completed_steps = 0

    def lr_at(self, step: int) -> float:
        """Learning rate of update number `step` (0-based); pure, does not touch the counter."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            start = self.min_lr if self.warmup_from == "min" else 0.0
            return start + (self.peak_lr - start) * (step + 1) / self.warmup_steps
        if self.style == "constant":
            return self.peak_lr
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:  # warm-up fills the whole run: nothing left to decay
            return self.peak_lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def current_lr(self) -> float:
        """The rate the next update will use."""
        return self.lr_at(self.completed_steps)

    def step(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the next update's rate on every group of `optimizer`, advance, return the rate."""
        lr = self.current_lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.completed_steps += 1
        return lr

    def _settings(self) -> dict[str, Any]:
        return {
            "peak_lr": self.peak_lr,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "style": self.style,
            "warmup_from": self.warmup_from,
        }

    def state_dict(self) -> dict[str, Any]:
        """The step counter plus the settings it was produced with (for a resume-time check)."""
        return {"completed_steps": self.completed_steps, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter. The settings of the current run win over saved ones
        (changing e.g. total steps on resume is allowed); differences are logged."""
        if "completed_steps" not in state:
            raise ValueError(
                "learning-rate schedule state has no 'completed_steps': it was not produced by "
                f"LearningRateSchedule.state_dict() (keys: {sorted(state)})"
            )
        completed = int(state["completed_steps"])
        if completed < 0:
            raise ValueError(f"learning-rate schedule state has completed_steps={completed} < 0")
        changed = {
            key: (state[key], value) for key, value in self._settings().items() if key in state and state[key] != value
        }
        if changed:
            details = ", ".join(f"{key}: {old} -> {new}" for key, (old, new) in changed.items())
            logger.warning("learning-rate schedule changed since the checkpoint (%s)", details)
        self.completed_steps = completed
