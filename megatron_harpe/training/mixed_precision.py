"""Which precision a run trains in, and the fp32 gradients of bf16 parameters.

    mode = training_precision(cfg.train, ctx.device.type)   # "fp32" | "autocast" | "bf16"
    model = build_model(..., params_dtype=PARAMS_DTYPE[mode])
    if mode == "bf16":
        attach_main_grads(model)                             # before the optimizer and the reducer

Three modes, chosen by `train.precision` (compute) and `train.params_dtype` (the weights):

- ``fp32``: fp32 weights, gradients and compute.
- ``autocast``: fp32 weights and gradients, bf16 compute under ``torch.autocast`` (a bf16 copy of
  each weight lives from forward to backward).
- ``bf16``: megatron's mixed precision. The model's parameters are bf16; each has an fp32
  ``main_grad`` into which every backward's bf16 gradient is added at once (so micro-batches
  accumulate in fp32) and which is what gets reduced over DP x CP / TP, norm-measured and
  clipped; the optimizer (`sharded_optimizer.ShardedAdamW` with ``fp32_main_weights``) keeps
  fp32 main weights for the parameters it owns, updates them from the fp32 gradients and
  copies them into the bf16 parameters. Checkpoints hold the fp32 main weights.

The default (``params_dtype: auto``) is ``bf16`` wherever the compute is bf16 (``precision: bf16``,
or ``auto`` on a GPU); ``params_dtype: bf16`` selects it on the CPU too. The trainer
(`loop.py`), the dry run (`plan.py`) and the memory planner (`memory.trainer_precision`) all
ask `training_precision`, so what they print is what runs.
"""

from __future__ import annotations

import torch

from megatron_harpe.config import TrainConfig

MODES = ("fp32", "autocast", "bf16")
PARAMS_DTYPE = {"fp32": torch.float32, "autocast": torch.float32, "bf16": torch.bfloat16}
DESCRIPTIONS = {
    "fp32": "fp32 weights, gradients and compute",
    "autocast": "fp32 weights and gradients under bf16 autocast",
    "bf16": "bf16 params with fp32 main weights and fp32 main gradients (accumulated, reduced and clipped in fp32)",
}


def training_precision(train: TrainConfig, device_type: str) -> str:
    """The mode (one of MODES) `train` asks for on a device of type `device_type` ("cuda", "cpu")."""
    gpu = device_type == "cuda"
    compute_bf16 = train.precision == "bf16" or (train.precision == "auto" and gpu)
    if train.params_dtype == "bf16":
        if train.precision == "fp32":
            raise ValueError("train.params_dtype=bf16 computes in bf16 but train.precision=fp32: set train.precision "
                             "to bf16 or auto, or train.params_dtype to fp32")  # fmt: skip
        return "bf16"
    if not compute_bf16:
        return "fp32"
    if train.params_dtype == "auto":
        return "bf16"
    if not gpu:
        raise ValueError("train.precision=bf16 with train.params_dtype=fp32 (bf16 autocast over fp32 weights) needs a "
                         "GPU; on CPU use train.params_dtype: bf16 (or auto), or train.precision: fp32")  # fmt: skip
    return "autocast"


def attach_main_grads(model: torch.nn.Module) -> None:
    """Give every trainable parameter an fp32 ``main_grad`` (zeros) and a hook that adds each
    backward's gradient into it and frees ``.grad``.

    Why this design (megatron-core's, without its contiguous buffers): accumulating in ``.grad``
    across micro-batches would round every partial sum to bf16, and casting only after the last
    backward keeps that rounding. Adding in the post-accumulate hook keeps one fp32 buffer per
    parameter and only one transient bf16 gradient at a time; the reductions, the norm and the
    clipping (grads.py, grad_overlap.py) then work on ``main_grad``, which the optimizer's fp32
    main weights take as their ``.grad``. Register the hooks before `OverlappedGradientReduction`:
    hooks run in registration order, so a bucket's reduction sees the accumulated gradient."""
    for param in model.parameters():
        if not param.requires_grad or hasattr(param, "main_grad"):
            continue
        param.main_grad = torch.zeros_like(param, dtype=torch.float32)
        param.register_post_accumulate_grad_hook(_accumulate_in_fp32)


def _accumulate_in_fp32(param: torch.nn.Parameter) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None


def gradient_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The tensor holding `param`'s gradient: its fp32 ``main_grad`` under bf16 params, else ``.grad``."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad
