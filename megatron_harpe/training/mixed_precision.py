"""Which precision a run trains in.

    mode = training_precision(cfg.train, ctx.device.type)   # "fp32" | "autocast" | "bf16"
    shard_model(model, ctx, mode)                            # training/sharding.py applies it

Three modes, chosen by `train.precision` (compute) and `train.params_dtype` (the weights the
layers compute with):

- ``fp32``: fp32 weights, gradients and compute.
- ``autocast``: fp32 weights and gradients, bf16 compute under ``torch.autocast`` (a bf16 copy of
  each weight lives from forward to backward). GPU only.
- ``bf16``: mixed precision through the sharding engine (FSDP2's `MixedPrecisionPolicy(
  param_dtype=bf16, reduce_dtype=fp32)`): the stored, sharded parameters are fp32 (the fp32
  main weights the optimizer updates and checkpoints hold); each forward and backward gathers
  them as bf16 and computes in bf16; each backward's bf16 gradient is reduce-scattered in fp32
  and accumulated into the fp32 gradient shards, which are norm-measured and clipped.

The default (``params_dtype: auto``) is ``bf16`` wherever the compute is bf16 (``precision: bf16``,
or ``auto`` on a GPU); ``params_dtype: bf16`` selects it on the CPU too. The trainer
(`loop.py`), the dry run (`planner/plan.py`) and the memory planner (`planner/memory.trainer_precision`) all
ask `training_precision`, so what they print is what runs.
"""

from __future__ import annotations

from megatron_harpe.config import TrainConfig

MODES = ("fp32", "autocast", "bf16")
DESCRIPTIONS = {
    "fp32": "fp32 weights, gradients and compute",
    "autocast": "fp32 weights and gradients under bf16 autocast",
    "bf16": "bf16 compute weights gathered from fp32 sharded main weights; fp32 gradient reduction, "
    "accumulation and clipping",
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
