"""bf16 parameters with fp32 main weights and gradients (training/mixed_precision.py), on CPU.

`train.params_dtype: bf16` selects on the CPU the mode a GPU run with bf16 precision uses by
default. The tiny model and the launch helpers are test_training.py's.
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.config import Config, from_dict
from megatron_harpe.training.memory import PRECISIONS
from test_training import CUDA_PLAN, assert_same_history, run, tiny_config

pytestmark = pytest.mark.distributed

BF16 = {"params_dtype": "bf16"}
LONG_STEPS = 20
BF16_TOLERANCE = 1e-2
"""Loss difference allowed between runs whose bf16 weights may round differently. Measured on
CPU: 2.0e-3 at most over 20 steps against fp32 (gradient norms 0.4%); DP2 sharded and one
process gave equal losses and norms (the grad-norm check also fails, as it should, when the
reducer's hooks run before the fp32 accumulation)."""


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
    from megatron_harpe.training import loop
    from megatron_harpe.training.engine_memory import SHARDED_BYTES
    from megatron_harpe.training.memory import Layout, estimate_memory
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
    for step in range(1, steps + 1):
        loop.train_step(cfg, ctx, plans[0].config, model, optimizer, schedule, batches, step)
    params = list(model.parameters())
    mains = list(optimizer.main.values())
    moments = [value for state in optimizer.state.values() for value in state.values() if value.dim() > 0]
    planned = estimate_memory(cfg, Layout(data=ctx.dp_size), device="cpu")
    return {
        "param_dtypes": {p.dtype for p in params},
        "main_grad_dtypes": {p.main_grad.dtype for p in params},
        "main_dtypes": {m.dtype for m in mains},
        "params_are_rounded_main": all(torch.equal(p, optimizer.main[id(p)].to(p.dtype)) for p in params if id(p) in optimizer.main),
        "main_beyond_bf16": any(bool((m != m.to(torch.bfloat16).float()).any()) for m in mains),
        "owned": len(mains),
        "parameters": len(params),
        "bytes": {"weights": sum(p.numel() * p.element_size() for p in params),
                  "gradients": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params),
                  "optimizer": sum(t.numel() * t.element_size() for t in mains + moments)},
        # the fp32 main weights and AdamW's moments: 12 bytes per parameter over all ranks, as the planner counts
        "planned": {"optimizer": (SHARDED_BYTES["fp32 weights"] + SHARDED_BYTES["AdamW moments (2 x fp32)"]) * planned.parameters},
        "precision": planned.precision.name,
    }  # fmt: skip


@pytest.mark.parametrize("world_size", [1, 2])
def test_main_weights_are_fp32_and_params_bf16_as_the_planner_plans(demo_data, world_size):
    """After steps: bf16 parameters equal to their rounded fp32 main weights, fp32 main gradients,
    main weights only for owned parameters when sharded over DP 2, and the fp32 main weights and
    moments summed over the ranks equal to what the memory planner (and so the dry run) counts."""
    tree = tiny_config(demo_data, train=BF16, parallel={"distributed_optimizer": world_size > 1})
    reports = parallel.run_on_ranks(_train_and_inspect, world_size, tree, 2)
    for report in reports:
        assert report["param_dtypes"] == {torch.bfloat16}
        assert report["main_grad_dtypes"] == report["main_dtypes"] == {torch.float32}
        assert report["params_are_rounded_main"] and report["main_beyond_bf16"]
        assert report["precision"] == PRECISIONS["bf16"].name
    assert sum(report["owned"] for report in reports) == reports[0]["parameters"]
    if world_size > 1:
        assert all(0 < report["owned"] < report["parameters"] for report in reports)
    assert sum(report["bytes"]["optimizer"] for report in reports) == reports[0]["planned"]["optimizer"]


SLOW_SPLITS = [{}, {"context": 2, **CUDA_PLAN}, {"tensor": 2}]


@pytest.mark.parametrize("parallel_keys", [CUDA_PLAN, *(pytest.param(keys, marks=pytest.mark.slow) for keys in SLOW_SPLITS)],
                         ids=["dp2-sharded", "dp2-replicated", "cp2-sharded", "tp2"])  # fmt: skip
def test_parallel_splits_equal_single_process(demo_data, bf16_reference, parallel_keys):
    """DP2 with the CUDA plan (sharded optimizer, gradient buckets reduced during backward; and,
    slow, a replicated optimizer reducing after backward, CP2 with the CUDA plan, TP2) in
    bf16-params mode: the single process's losses within bf16 rounding."""
    history = run(2, tiny_config(demo_data, parallel=parallel_keys, train=BF16))
    assert_same_history(history, bf16_reference, tol=BF16_TOLERANCE)


def test_resume_continues_exactly(demo_data, bf16_reference, tmp_path):
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    first = run(1, tiny_config(demo_data, checkpoint=save, train={**BF16, "exit_after_steps": 3}))
    second = run(1, tiny_config(demo_data, checkpoint=save, train=BF16))
    assert [h["step"] for h in first + second] == [1, 2, 3, 4, 5, 6]
    assert_same_history(first + second, bf16_reference)


def _load_weights(tree: dict, path: str, weights_only: bool = False) -> dict:
    """Build the model and optimizer of `tree`'s precision, load `path`, and return the fp32
    weights the optimizer updates (main weights of the owned parameters, or the fp32 parameters),
    the bf16 parameters and the AdamW moments, by parameter name."""
    from megatron_harpe.training import loop
    from megatron_harpe.training.checkpoint import load_checkpoint

    cfg = from_dict(Config, tree)
    ctx = parallel.initialize(cfg.parallel.tensor, cfg.parallel.context)
    cfg.validate(world_size=ctx.world_size)
    model, optimizer = loop.build_model_and_optimizer(cfg, ctx, cfg.resolved_stages()[0].position)
    load_checkpoint(path, model=model, optimizer=optimizer, weights_only=weights_only)
    main = getattr(optimizer, "main", {})
    report = {"fp32": {}, "bf16": {}, "moments": {}}
    for name, param in model.named_parameters():
        optimized = main.get(id(param), param)
        if param.dtype == torch.bfloat16:
            report["bf16"][name] = param.detach().clone()
        if optimized.dtype == torch.float32 and (id(param) in main or not main):
            report["fp32"][name] = optimized.detach().clone()
            report["moments"][name] = {k: v.clone() for k, v in optimizer.state[optimized].items() if v.dim() > 0}
    return report


def _load_on_ranks(world: int, tree: dict, path: str, weights_only: bool = False) -> dict:
    """`_load_weights` on `world` ranks, the owned main weights of all ranks merged."""
    reports = parallel.run_on_ranks(_load_weights, world, tree, path, weights_only)
    merged = {"fp32": {}, "bf16": reports[0]["bf16"], "moments": {}}
    for report in reports:
        merged["fp32"].update(report["fp32"])
        merged["moments"].update(report["moments"])
    return merged


MODES = {"fp32": ({"params_dtype": "fp32"}, {}, 1), "bf16": (BF16, CUDA_PLAN, 2)}
"""train keys, parallel keys, world size: the bf16 side shards its optimizer over DP 2."""


@pytest.mark.parametrize("saved,loaded", [("fp32", "bf16"), pytest.param("bf16", "fp32", marks=pytest.mark.slow)])
def test_fp32_and_bf16_params_checkpoints_load_each_other(demo_data, tmp_path, saved, loaded):
    """Saved by one mode, loaded by the other: the fp32 weights and moments arrive bit for bit
    (the bf16 run's from its owners' fp32 main weights), the bf16 parameters are their rounding,
    and a weights-only start (checkpoint.pretrained) sets the fp32 main weights too."""
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    path = str(tmp_path / "ckpt")
    train, parallel_keys, world = MODES[saved]
    run(world, tiny_config(demo_data, checkpoint=save, train={**train, "exit_after_steps": 3}, parallel=parallel_keys))
    as_saved = _load_on_ranks(world, tiny_config(demo_data, train=train, parallel=parallel_keys), path)
    train, parallel_keys, world = MODES[loaded]
    as_loaded = _load_on_ranks(world, tiny_config(demo_data, train=train, parallel=parallel_keys), path)
    assert as_saved["fp32"].keys() == as_loaded["fp32"].keys() and as_saved["fp32"]
    for name, weight in as_saved["fp32"].items():
        assert torch.equal(as_loaded["fp32"][name], weight), name
        assert as_saved["moments"][name].keys() == as_loaded["moments"][name].keys() == {"exp_avg", "exp_avg_sq"}
        for key, moment in as_saved["moments"][name].items():
            assert torch.equal(as_loaded["moments"][name][key], moment), (name, key)
    bf16 = as_saved["bf16"] or as_loaded["bf16"]
    assert bf16.keys() == as_saved["fp32"].keys()
    assert all(torch.equal(bf16[name], weight.to(torch.bfloat16)) for name, weight in as_saved["fp32"].items())
    assert any(not torch.equal(weight.to(torch.bfloat16).float(), weight) for weight in as_saved["fp32"].values())
    if loaded == "bf16":
        weights_only = _load_on_ranks(1, tiny_config(demo_data, train=BF16), path, weights_only=True)
        assert all(torch.equal(weights_only["fp32"][name], weight) for name, weight in as_saved["fp32"].items())


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
