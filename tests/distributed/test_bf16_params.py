"""bf16 compute over fp32 sharded main weights (training/mixed_precision.py, sharding.py), on CPU.

`train.params_dtype: bf16` selects on the CPU the mode a GPU run with bf16 precision uses by
default: the engine gathers bf16 compute weights from fp32 shards and reduces fp32 gradients.
The tiny model and the launch helpers are test_training.py's.
"""

from __future__ import annotations

import pytest
import torch
from test_training import LAYOUTS, assert_same_history, run, tiny_config

from megatron_harpe import parallel
from megatron_harpe.config import Config, from_dict

pytestmark = pytest.mark.distributed

BF16 = {"params_dtype": "bf16"}
LONG_STEPS = 20
BF16_TOLERANCE = 1e-2
"""Loss difference allowed between runs whose bf16 compute may round differently (matmuls
split over TP or CP). Measured on CPU with the replaced engine: 2.0e-3 at most over 20 steps
against fp32 (gradient norms 0.4%)."""


@pytest.fixture(scope="module")
def bf16_reference(demo_data):
    """One process in bf16-params mode, four accumulated micro-batches per step."""
    return run(1, tiny_config(demo_data, train=BF16))


def test_bf16_params_track_the_fp32_run(demo_data):
    tokens = {"train_tokens": LONG_STEPS * 4 * 64}
    fp32 = run(1, tiny_config(demo_data, train=tokens))
    bf16 = run(1, tiny_config(demo_data, train={**tokens, **BF16}))
    assert [h["step"] for h in bf16] == list(range(1, LONG_STEPS + 1))
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(fp32, bf16)]
    assert max(differences) < BF16_TOLERANCE, differences
    assert max(differences) > 0  # really another precision
    for a, b in zip(fp32, bf16):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2)
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 1.0  # it learns


def _train_and_inspect(tree: dict, steps: int) -> dict:
    """Train `steps` steps with the trainer's own pieces and report dtypes and bytes."""
    from torch.distributed.tensor import DTensor

    from megatron_harpe.planner.parameters import parameters_per_rank
    from megatron_harpe.training import loop
    from megatron_harpe.training.grads import gradient_bytes
    from megatron_harpe.training.schedule import LearningRateSchedule

    cfg = from_dict(Config, tree)
    ctx = parallel.initialize(cfg.parallel.tensor, cfg.parallel.context)
    cfg.validate(world_size=ctx.world_size)
    parallel.seed_everything(cfg.train.seed)
    plans = loop.plan_stages(cfg)
    data = loop.prepare_training_data(cfg, ctx, total_samples=loop._samples_per_stage(cfg, plans))
    model, optimizer = loop.build_model_and_optimizer(cfg, ctx, plans[0].config.position)
    schedule = LearningRateSchedule(peak_lr=cfg.train.lr, warmup_steps=0, total_steps=steps)
    batches = data[0].micro_batches(consumed_steps=0)
    grads = {}
    step = optimizer.step

    def inspecting_step():
        grads.update(dtypes={p.grad.dtype for p in model.parameters()}, bytes=gradient_bytes(model))
        step()

    optimizer.step = inspecting_step
    for index in range(1, steps + 1):
        loop.train_step(cfg, ctx, plans[0].config, model, optimizer, schedule, batches, index)
    params = list(model.parameters())
    moments = [value for state in optimizer.state.values() for value in state.values() if value.dim() > 0]
    compute = model(torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None], None)

    def local_bytes(tensors):
        return sum(t.to_local().numel() * t.element_size() for t in tensors)

    return {
        "sharded": all(isinstance(p, DTensor) for p in params + moments),
        "param_dtypes": {p.dtype for p in params},
        "grad_dtypes": grads["dtypes"],
        "compute_dtype": compute.dtype,
        "bytes": {"weights": local_bytes(params), "gradients": grads["bytes"], "optimizer": local_bytes(moments)},
        "planned": planned_bytes(parameters_per_rank(cfg.model, ctx.tp_size), ctx.dp_size * ctx.cp_size),
        "parameters": parameters_per_rank(cfg.model, ctx.tp_size),
    }


def planned_bytes(parameters: int, replicas: int) -> dict[str, int]:
    """The planner's sharded state per rank, under this test's names."""
    from megatron_harpe.planner.engine_memory import sharded_states

    states = sharded_states(parameters, replicas)
    return {"weights": states["fp32 weights"], "gradients": states["fp32 gradients"],
            "optimizer": states["AdamW moments (2 x fp32)"]}  # fmt: skip


@pytest.mark.parametrize("world_size", [1, 2])
def test_bf16_mode_keeps_fp32_shards_and_computes_in_bf16(demo_data, world_size):
    """After steps: every weight, gradient and moment is an fp32 shard over DP (none at DP1), the
    forward computes in bf16, and each rank holds the bytes the memory planner counts
    (`engine_memory.sharded_states`), up to FSDP2's padding of uneven tensors."""
    reports = parallel.run_on_ranks(_train_and_inspect, world_size, tiny_config(demo_data, train=BF16), 2)
    for report in reports:
        assert report["sharded"]
        assert report["param_dtypes"] == report["grad_dtypes"] == {torch.float32}
        assert report["compute_dtype"] == torch.bfloat16
        for part, planned in report["planned"].items():
            assert planned - 4096 <= report["bytes"][part] <= planned + 4096, (part, report)
    assert sum(r["bytes"]["optimizer"] for r in reports) == 8 * reports[0]["parameters"]


@pytest.mark.parametrize(
    "layout", ["dp2", *(pytest.param(layout, marks=pytest.mark.slow) for layout in ("cp2", "tp2"))]
)
def test_parallel_splits_equal_single_process(demo_data, bf16_reference, layout):
    """The engine at DP2 (and, slow, CP2 and TP2) in bf16 mode: the single process's losses
    within bf16 rounding."""
    history = run(2, tiny_config(demo_data, parallel=LAYOUTS[layout], train=BF16))
    assert_same_history(history, bf16_reference, tol=BF16_TOLERANCE)


def test_resume_continues_exactly(demo_data, bf16_reference, tmp_path):
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    first = run(1, tiny_config(demo_data, checkpoint=save, train={**BF16, "exit_after_steps": 3}))
    second = run(1, tiny_config(demo_data, checkpoint=save, train=BF16))
    assert [h["step"] for h in first + second] == [1, 2, 3, 4, 5, 6]
    assert_same_history(first + second, bf16_reference)


def _load_weights(tree: dict, path: str, weights_only: bool = False) -> dict:
    """Build the trainer's model and optimizer for `tree`, load `path`, and return the full fp32
    weights and AdamW moments by parameter name (rank 0 of a TP=1 layout)."""
    from megatron_harpe.checkpointing.checkpoint import load_checkpoint
    from megatron_harpe.training import loop

    cfg = from_dict(Config, tree)
    ctx = parallel.initialize(cfg.parallel.tensor, cfg.parallel.context)
    cfg.validate(world_size=ctx.world_size)
    model, optimizer = loop.build_model_and_optimizer(cfg, ctx, cfg.resolved_stages()[0].position)
    load_checkpoint(path, model=model, optimizer=optimizer, weights_only=weights_only)
    report = {"fp32": {}, "moments": {}}
    for name, param in model.named_parameters():
        report["fp32"][name] = param.full_tensor()
        report["moments"][name] = {k: v.full_tensor() for k, v in optimizer.state.get(param, {}).items() if v.dim() > 0}
    return report


MODES = {"fp32": ({"params_dtype": "fp32"}, 1), "bf16": (BF16, 2)}
"""train keys, world size: the bf16 side shards over DP 2."""


@pytest.mark.parametrize("saved,loaded", [("fp32", "bf16"), pytest.param("bf16", "fp32", marks=pytest.mark.slow)])
def test_fp32_and_bf16_checkpoints_load_each_other(demo_data, tmp_path, saved, loaded):
    """Saved by one mode, loaded by the other at another DP size: the fp32 weights and moments
    arrive bit for bit, and a weights-only start (checkpoint.pretrained) sets the fp32 weights."""
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    path = str(tmp_path / "ckpt")
    train, world = MODES[saved]
    run(world, tiny_config(demo_data, checkpoint=save, train={**train, "exit_after_steps": 3}))
    as_saved = parallel.run_on_ranks(_load_weights, world, tiny_config(demo_data, train=train), path)[0]
    train, world = MODES[loaded]
    as_loaded = parallel.run_on_ranks(_load_weights, world, tiny_config(demo_data, train=train), path)[0]
    assert as_saved["fp32"].keys() == as_loaded["fp32"].keys() and as_saved["fp32"]
    for name, weight in as_saved["fp32"].items():
        assert weight.dtype == torch.float32 and torch.equal(as_loaded["fp32"][name], weight), name
        assert as_saved["moments"][name].keys() == as_loaded["moments"][name].keys() == {"exp_avg", "exp_avg_sq"}
        for key, moment in as_saved["moments"][name].items():
            assert torch.equal(as_loaded["moments"][name][key], moment), (name, key)
    assert any(not torch.equal(weight.to(torch.bfloat16).float(), weight) for weight in as_saved["fp32"].values())
    if loaded == "bf16":
        weights_only = parallel.run_on_ranks(_load_weights, 1, tiny_config(demo_data, train=BF16), path, True)[0]
        assert all(torch.equal(weights_only["fp32"][name], weight) for name, weight in as_saved["fp32"].items())
        assert all(not moments for moments in weights_only["moments"].values())  # a fresh optimizer


def test_an_fp32_run_resumes_in_bf16_params_mode(demo_data, bf16_reference, tmp_path):
    """The trainer's own resume across modes: three fp32 steps, three bf16-params steps; each
    within bf16 rounding of the bf16-params run."""
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    first = run(1, tiny_config(demo_data, checkpoint=save, train={"params_dtype": "fp32", "exit_after_steps": 3}))
    second = run(1, tiny_config(demo_data, checkpoint=save, train=BF16))
    assert [h["step"] for h in first + second] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(first + second, bf16_reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=BF16_TOLERANCE)
    assert any(got["loss"] != want["loss"] for got, want in zip(second, bf16_reference[3:]))  # fp32 steps came first
