"""What gpu_check (megatron_harpe/gpu_check.py) and its check modules (gpu_check_logits.py,
gpu_check_documents.py) share: a result row, the tolerance comparison, the PASS/FAIL table, and
which devices spawned ranks see.

    result = compare("logits sdpa", got, want, rtol=1e-2, atol=1e-3)   # CheckResult(name, "PASS", ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str
    """PASS | FAIL | SKIP"""
    detail: str


def compare(name: str, got, want, rtol: float, atol: float) -> CheckResult:
    """PASS when every |got - want| <= atol + rtol |want| (and the shapes agree)."""
    got_t, want_t = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    if got_t.shape != want_t.shape:
        return CheckResult(name, "FAIL", f"shapes differ: {tuple(got_t.shape)} vs {tuple(want_t.shape)}")
    if not torch.isfinite(got_t).all():
        return CheckResult(name, "FAIL", "non-finite values")
    difference = (got_t - want_t).abs()
    worst = float(difference.max()) if difference.numel() else 0.0
    ok = bool((difference <= atol + rtol * want_t.abs()).all())
    return CheckResult(name, "PASS" if ok else "FAIL", f"max |diff| {worst:.3g} (allowed {atol:g} + {rtol:g} x |ref|)")


def format_table(results: list[CheckResult]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'check':{width}s}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{r.name:{width}s}  {r.status:6s}  {r.detail}" for r in results]
    failed = sum(r.status == "FAIL" for r in results)
    lines.append(f"{'overall':{width}s}  {'FAIL' if failed else 'PASS':6s}  "
                 f"{failed} failed, {sum(r.status == 'PASS' for r in results)} passed, "
                 f"{sum(r.status == 'SKIP' for r in results)} skipped")  # fmt: skip
    return "\n".join(lines)


@contextlib.contextmanager
def visible_devices(device: str):
    """Spawned ranks see CUDA only when the run is meant for it (a CPU run hides it)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
