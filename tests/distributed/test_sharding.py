"""The sharding engine (training/sharding.py, PyTorch FSDP2) against one unsharded process.

    python -m pytest tests/distributed/test_sharding.py -q

The same weights and the same global batch (4 sequences whose loss masks give each rank a
different token count) are trained for three optimizer steps by `loop.train_step`:
- in one process on a plain, unsharded megatron model (no FSDP2 at all: gradients accumulate
  in `.grad`, plain AdamW), the reference;
- by the engine at DP2, TP2 and CP2 on spawned gloo ranks: fp32, bf16, and fp32 with every
  layer recomputed in backward (`train.recompute: full`, inside the layer's FSDP2 unit).
Losses, gradient norms, the clipped gradients handed to AdamW at every step and the weights
after the last step are compared in TP=1 shapes. Clipping is active (clip 0.5 against norms of
about 1.5), so a gradient summed the wrong way (FSDP2's default average) changes the norm and
fails. Tolerances: fp32 2e-5 absolute (reduction order only; measured 4e-6 at most). bf16
compute (the engine's MixedPrecisionPolicy) against the fp32 reference: loss 5e-3, gradient
norm 2%, each gradient tensor 15% in relative L2, the three steps' weight updates 10% in
relative L2 (measured at most: 6.4e-4, 0.6%, 7.8% of a tensor's largest entry with 3.2% over
all gradients, 4.9%).

The memory test counts every tensor storage Python can reach (gc) while the engine trains at
DP2 and fails if anything beyond the parameter, gradient and optimizer shards holds as much
as half of one full fp32 gradient copy, after each micro-batch's backward and, sampled
whenever a layer's backward starts or ends, during the last one (activations count too). The same measurement on FSDP2's
no-sync accumulation (unsharded gradients kept until the last micro-batch) finds the full copy,
which shows the test can fail.
"""

from __future__ import annotations

import gc

import pytest
import torch
from model_parity import make_full_weights, shard, unshard

from megatron_harpe import parallel
from megatron_harpe.config import Config, ModelConfig, ParallelConfig, StageConfig, TrainConfig
from megatron_harpe.position.config import PositionConfig

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    vocab_size=128)  # fmt: skip
POSITION = PositionConfig(type="harpe", bases=[300.0, 30000.0])
SEQ, SEQUENCES, STEPS = 32, 4, 3
FP32_TOL = 2e-5
BF16_TOL = {"loss": 5e-3, "norm": 2e-2, "tensor_grad": 0.15, "update": 0.1}


def _global_batch(seed: int, seq: int = SEQ) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (SEQUENCES, seq + 1), generator=generator)
    mask = (torch.rand(SEQUENCES, seq, generator=generator) > 0.3).float()
    mask[1, : seq // 2] = 0.0  # ranks and CP halves see different token counts
    positions = torch.arange(seq).expand(SEQUENCES, -1)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask, "position_ids": positions}


def _rank_batches(ctx, seq: int = SEQ):
    """This rank's micro-batches of one sequence (megatron's sample order), the same global
    batch at every step (so that three steps visibly learn)."""
    from megatron_harpe.data.loader import slice_for_context_parallel

    batch = _global_batch(0, seq)
    while True:
        for index in range(ctx.dp_rank, SEQUENCES, ctx.dp_size):
            one = {key: value[index : index + 1] for key, value in batch.items()}
            yield slice_for_context_parallel(one, ctx.cp_rank, ctx.cp_size)


def _config(tp: int, cp: int, params_dtype: str) -> tuple[Config, StageConfig]:
    POSITION.resolve(MODEL)
    train = TrainConfig(
        micro_batch_size=1, global_batch_size=SEQUENCES, lr=3e-3, clip_grad=0.5, params_dtype=params_dtype
    )
    cfg = Config(model=MODEL, position=POSITION, parallel=ParallelConfig(tensor=tp, context=cp), train=train)
    return cfg, StageConfig(
        seq_length=SEQ, tokens=STEPS * SEQUENCES * SEQ, position=POSITION, global_batch_size=SEQUENCES
    )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().float().clone()


def _train(tp: int, cp: int, params_dtype: str, sharded: bool, weights: dict, recompute: str = "none") -> dict:
    from megatron_harpe.model import build_model
    from megatron_harpe.training import loop
    from megatron_harpe.training.optimizer import build_optimizer
    from megatron_harpe.training.schedule import LearningRateSchedule
    from megatron_harpe.training.sharding import shard_model

    cfg, stage = _config(tp, cp, params_dtype)
    ctx = parallel.initialize(tp, cp)
    model = build_model(
        MODEL, POSITION, recompute=recompute
    )  # initialize=False would leave megatron's TP attributes unset
    local = {name: shard(name, full, ctx.tp_rank, tp) for name, full in weights.items()}
    model.load_state_dict(local, strict=False)
    if sharded:
        shard_model(model, ctx, loop.training_precision(cfg.train, "cpu"))
    optimizer = build_optimizer(model, lr=cfg.train.lr, weight_decay=0.1)
    clipped = []
    step = optimizer.step

    def recording_step():  # the gradients AdamW receives: reduced, SP-summed and clipped
        clipped.append({name: _full(param.grad) for name, param in model.named_parameters()})
        step()

    optimizer.step = recording_step
    schedule = LearningRateSchedule(peak_lr=cfg.train.lr, warmup_steps=0, total_steps=STEPS)
    batches = _rank_batches(ctx)
    history = [
        loop.train_step(cfg, ctx, stage, model, optimizer, schedule, batches, step)[:2] for step in range(1, STEPS + 1)
    ]
    return {"history": history, "grads": clipped, "weights": {name: _full(p) for name, p in model.named_parameters()},
            "tp_rank": ctx.tp_rank}  # fmt: skip


def _assemble(results: list[dict], key: str) -> dict:
    """Rank results of one DP x CP replica put back in TP=1 shapes."""
    by_tp = {r["tp_rank"]: r for r in results}
    parts = [by_tp[rank] for rank in sorted(by_tp)]
    if key == "weights":
        return {name: unshard(name, [p["weights"][name] for p in parts]) for name in parts[0]["weights"]}
    return [{name: unshard(name, [p["grads"][i][name] for p in parts]) for name in parts[0]["grads"][i]}
            for i in range(STEPS)]  # fmt: skip


@pytest.fixture(scope="module")
def weights():
    POSITION.resolve(MODEL)
    return make_full_weights(MODEL, POSITION, seed=5)


@pytest.fixture(scope="module")
def reference(weights):
    return parallel.run_on_ranks(_train, 1, 1, 1, "fp32", False, weights)[0]


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got, want = torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want])
    return float((got - want).norm() / want.norm())


def _assert_fp32_equal(got: dict, want: dict) -> None:
    for (loss, norm), (want_loss, want_norm) in zip(got["history"], want["history"], strict=True):
        assert loss == pytest.approx(want_loss, abs=FP32_TOL)
        assert norm == pytest.approx(want_norm, rel=1e-5)
    for step, (grads, want_grads) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=FP32_TOL, msg=f"step {step + 1}: {name}")
    for name, weight in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=FP32_TOL, msg=name)


def _assert_bf16_tracks(got: dict, want: dict, initial: dict) -> None:
    for (loss, norm), (want_loss, want_norm) in zip(got["history"], want["history"], strict=True):
        assert loss == pytest.approx(want_loss, abs=BF16_TOL["loss"])
        assert norm == pytest.approx(want_norm, rel=BF16_TOL["norm"])
    for step, (grads, want_grads) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        for name, grad in want_grads.items():
            assert _relative([grads[name]], [grad]) < BF16_TOL["tensor_grad"], f"step {step + 1}: {name}"
    names = list(want["weights"])
    updates = _relative(
        [got["weights"][n] - initial[n] for n in names], [want["weights"][n] - initial[n] for n in names]
    )
    assert updates < BF16_TOL["update"]


LAYOUTS = {"dp2": (1, 1), "tp2": (2, 1), "cp2": (1, 2)}


RUNS = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "fp32, full recompute": ("fp32", "full")}


def _train_all(tp: int, cp: int, weights: dict) -> dict:
    return {run: _train(tp, cp, precision, True, weights, recompute) for run, (precision, recompute) in RUNS.items()}


@pytest.fixture(scope="module")
def engine_runs(weights):
    """Each layout's two ranks, every run of RUNS, in TP=1 shapes (one spawn per layout)."""
    runs = {}

    def run(layout: str) -> dict:
        if layout not in runs:
            results = parallel.run_on_ranks(_train_all, 2, *LAYOUTS[layout], weights)
            runs[layout] = {run: {"history": results[0][run]["history"],
                                  "grads": _assemble([r[run] for r in results], "grads"),
                                  "weights": _assemble([r[run] for r in results], "weights")}
                            for run in RUNS}  # fmt: skip
        return runs[layout]

    return run


def test_reference_clips_and_learns(reference):
    assert all(norm > 1.0 for _, norm in reference["history"])  # clip 0.5 is active at every step
    assert reference["history"][-1][0] < reference["history"][0][0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_engine_equals_one_unsharded_process(layout, engine_runs, reference):
    _assert_fp32_equal(engine_runs(layout)["fp32"], reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_engine_with_full_recompute_equals_one_unsharded_process(layout, engine_runs, reference):
    """Layers recomputed in backward (train.recompute: full) inside their FSDP2 units."""
    _assert_fp32_equal(engine_runs(layout)["fp32, full recompute"], reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_engine_tracks_one_unsharded_fp32_process(layout, engine_runs, reference, weights):
    got = engine_runs(layout)["bf16"]
    assert got["history"] != reference["history"]  # really bf16 compute
    _assert_bf16_tracks(got, reference, weights)


# ------------------------------------------------------------------------------------- memory


MEMORY_MODEL = ModelConfig(num_layers=16, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=512, vocab_size=128)  # fmt: skip
"""A unit (one layer) is 1/16 of the weights: the transient unsharded weights and gradients of
a unit or two stay far below a full gradient copy."""


def _storage_bytes(tensors) -> dict[int, int]:
    from torch.distributed.tensor import DTensor

    found = {}
    for tensor in tensors:
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _live_storages() -> dict[int, int]:
    """Every tensor storage reachable from Python objects."""
    return _storage_bytes(obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not obj.is_meta)


def _memory_during_training(no_sync: bool) -> dict:
    from megatron_harpe.model import build_model
    from megatron_harpe.training.grads import gradient_bytes
    from megatron_harpe.training.optimizer import build_optimizer
    from megatron_harpe.training.sharding import shard_model

    ctx = parallel.initialize(1, 1)
    parallel.seed_everything(1)
    POSITION.resolve(MEMORY_MODEL)
    model = build_model(MEMORY_MODEL, POSITION)
    full_gradient = sum(p.numel() * 4 for p in model.parameters())
    shard_model(model, ctx, "fp32")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    batches = _rank_batches(ctx, seq=8)  # activations stay small beside the weights

    def extra() -> int:
        """Bytes held beyond the parameter, gradient and optimizer shards (and the model's buffers)."""
        persistent = _storage_bytes([*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                                     *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
                                     *model.buffers()])  # fmt: skip
        return sum(size for ptr, size in _live_storages().items() if ptr not in persistent)

    during: list[int] = []
    sampling = False
    sample = lambda _grad: during.append(extra()) if sampling else None  # noqa: E731

    def on_input(module, args, kwargs):  # its gradient is complete when the layer's backward ends
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and hidden.requires_grad:
            hidden.register_hook(sample)

    def on_output(module, args, kwargs, output):  # its gradient arrives when the layer's backward starts
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(sample)

    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(on_input, with_kwargs=True)
        layer.register_forward_hook(on_output, with_kwargs=True)
    after_backward, shards = [], 0
    for step in range(2):  # the second step runs with the optimizer's moments allocated
        micro = [next(batches) for _ in range(2)]
        n_tokens = sum(b["loss_mask"].sum() for b in micro)  # one rank's share; the scale is irrelevant here
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            if no_sync:
                model.set_requires_gradient_sync(last)
            sampling = last and step == 1
            loss = (
                model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]) * batch["loss_mask"]
            ).sum()
            (loss / n_tokens).backward()
            after_backward.append(extra())
        shards = gradient_bytes(model)
        optimizer.step()
        optimizer.zero_grad()
    return {
        "full_gradient": full_gradient,
        "gradient_shards": shards,
        "after_backward": after_backward,
        "during_last_backward": max(during),
        "samples": len(during),
    }


class _Column(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(1, 4, bias=False)  # weight [4, 1]: two rows per rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _bf16_accumulation() -> dict:
    """Two micro-batches whose gradients, summed over the two ranks, are 2 and 2^-9 per
    element: 2 + 2^-9 is no bf16 number (bf16 steps by 2^-6 there), so only reduction and
    accumulation in fp32 keep it."""
    from megatron_harpe.training.sharding import shard_modules

    ctx = parallel.initialize(1, 1)
    model = _Column()
    shard_modules(model, [model.inner], ctx.dp_cp_group, "bf16")
    for value in (1.0, 2.0**-10):
        model(torch.full((1, 1), value)).sum().backward()
    grad = model.inner.weight.grad
    return {"dtype": grad.dtype, "local": grad.to_local().tolist(), "compute_dtype": model(torch.ones(1, 1)).dtype}


def _engine_checks() -> dict:
    return {"engine": _memory_during_training(no_sync=False), "no_sync": _memory_during_training(no_sync=True),
            "bf16": _bf16_accumulation()}  # fmt: skip


@pytest.fixture(scope="module")
def memory_reports() -> list[dict]:
    return parallel.run_on_ranks(_engine_checks, 2)


def test_bf16_gradients_are_reduced_and_accumulated_in_fp32(memory_reports):
    for report in (reports["bf16"] for reports in memory_reports):
        assert report["compute_dtype"] == torch.bfloat16 and report["dtype"] == torch.float32
        assert report["local"] == [[2 + 2**-9], [2 + 2**-9]]


def test_no_full_gradient_copy_is_held(memory_reports):
    """DP2, 16 layers, 2 micro-batches per step: gradient shards are half a full copy; nothing
    else holds as much as half a full fp32 gradient, after any backward or during the last."""
    for report in (reports["engine"] for reports in memory_reports):
        full = report["full_gradient"]
        assert 0.45 * full < report["gradient_shards"] < 0.55 * full, report
        assert report["samples"] >= 16  # every layer's backward was sampled
        assert max(report["after_backward"]) < 0.05 * full, report
        assert report["during_last_backward"] < 0.5 * full, report


def test_the_memory_measurement_sees_unsharded_gradient_accumulation(memory_reports):
    """FSDP2's no-sync accumulation keeps unsharded gradients between micro-batches: the
    measurement finds a full copy after the first backward, as it would any such copy."""
    for report in (reports["no_sync"] for reports in memory_reports):
        assert max(report["after_backward"]) > 0.9 * report["full_gradient"], report


def _rotary_table_in_the_layers(params_dtype: str) -> list[tuple]:
    """(dtype, carries its cos/sin) of the rotary table each layer's attention receives when the
    engine trains in `params_dtype`."""
    from megatron_harpe.model import build_model
    from megatron_harpe.training import loop
    from megatron_harpe.training.sharding import shard_model

    cfg, _ = _config(1, 1, params_dtype)
    ctx = parallel.initialize(1, 1)
    model = build_model(MODEL, POSITION)
    shard_model(model, ctx, loop.training_precision(cfg.train, "cpu"))
    seen = []
    for layer in model.decoder.layers:
        layer.self_attention.register_forward_pre_hook(
            lambda _m, _args, kwargs: seen.append((kwargs["rotary_pos_emb"].dtype,
                                                   hasattr(kwargs["rotary_pos_emb"], "rotary_cos_sin"))),
            with_kwargs=True)  # fmt: skip
    batch = _global_batch(0)
    model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum().backward()
    return seen


def test_bf16_layers_rotate_with_the_fp32_angle_table():
    """FSDP2 casts a unit's float arguments to its compute dtype unless told not to: an angle
    table in bf16 puts position 1e5 up to 256 radians off (and loses its cached cos/sin)."""
    assert (
        parallel.run_on_ranks(_rotary_table_in_the_layers, 1, "bf16")[0] == [(torch.float32, True)] * MODEL.num_layers
    )
