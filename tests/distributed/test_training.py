"""The trainer gives the same updates for any DP / CP / TP split, and resumes exactly.

Every case trains a tiny GQA HARPE model on the demo dataset through `training.loop.train`
on spawned gloo ranks, and compares per-step losses and gradient norms with one process
that accumulates the same global batch. Equal losses after the first step mean equal updates.
"""

from __future__ import annotations

import pytest

from megatron_harpe import parallel
from megatron_harpe.config import Config, from_dict

pytestmark = pytest.mark.distributed

STEPS = 6


def tiny_config(demo_data, **sections) -> dict:
    tree = {
        "model": dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=4096,
            max_position_embeddings=64,
        ),
        "position": {"type": "harpe", "bases": [300.0, 30000.0]},
        "data": {"prefixes": [demo_data.prefix], "tokenizer": str(demo_data.tokenizer), "seq_length": 64},
        "train": {
            "micro_batch_size": 1,
            "global_batch_size": 4,
            "train_tokens": STEPS * 4 * 64,
            "lr": 3e-3,
            "warmup_steps": 2,
            "lr_schedule": "cosine",
            "clip_grad": 1.0,
        },
        "logging": {"log_interval": 100},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


def _train(tree: dict) -> list[dict]:
    from megatron_harpe.training.loop import train

    return train(from_dict(Config, tree))


def run(world_size: int, tree: dict) -> list[dict]:
    return parallel.run_on_ranks(_train, world_size, tree)[0]


@pytest.fixture(scope="module")
def reference(demo_data):
    """One process, four accumulated micro-batches per step."""
    history = run(1, tiny_config(demo_data))
    assert len(history) == STEPS
    assert history[-1]["loss"] < history[0]["loss"]  # it learns
    return history


def assert_same_history(history, reference, tol=2e-5):
    assert [h["step"] for h in history] == [r["step"] for r in reference]
    for got, want in zip(history, reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=tol), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=tol), (got, want)
        assert got["lr"] == pytest.approx(want["lr"])


def test_data_parallel_equals_accumulation(demo_data, reference):
    assert_same_history(run(2, tiny_config(demo_data)), reference)  # DP=2, 2 micro-batches each


def test_context_parallel_equals_single_process(demo_data, reference):
    assert_same_history(run(2, tiny_config(demo_data, parallel={"context": 2})), reference)


def test_tensor_parallel_equals_single_process(demo_data, reference):
    assert_same_history(run(2, tiny_config(demo_data, parallel={"tensor": 2})), reference)


def test_different_bases_train_differently(demo_data, reference):
    other = run(1, tiny_config(demo_data, position={"bases": [30000.0, 300.0]}))
    assert abs(other[-1]["loss"] - reference[-1]["loss"]) > 1e-4


def test_resume_continues_exactly(demo_data, reference, tmp_path):
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    first = run(1, tiny_config(demo_data, checkpoint=save, train={"exit_after_steps": 3}))
    assert [h["step"] for h in first] == [1, 2, 3]
    second = run(1, tiny_config(demo_data, checkpoint=save))
    assert [h["step"] for h in second] == [4, 5, 6]
    assert_same_history(first + second, reference)
    import yaml

    saved = yaml.safe_load((tmp_path / "ckpt" / "iter_0000006" / "config.yaml").read_text())
    assert saved["position"]["bases"] == [300.0, 30000.0]  # the bases travel with the checkpoint


@pytest.mark.slow  # CI time; the stop file is exercised by the Slurm USR1 tests and preemption tests
def test_stop_file_saves_and_exits_then_the_next_launch_continues(demo_data, reference, tmp_path):
    stop_file = tmp_path / "STOP"
    stop_file.touch()  # as if the Slurm script had seen USR1 before the first step ended
    save = {"save": str(tmp_path / "ckpt"), "save_interval": 0, "stop_file": str(stop_file)}
    first = run(2, tiny_config(demo_data, checkpoint=save))
    assert [h["step"] for h in first] == [1]
    assert (tmp_path / "ckpt" / "iter_0000001").is_dir() and not stop_file.exists()
    second = run(2, tiny_config(demo_data, checkpoint=save))
    assert [h["step"] for h in second] == [2, 3, 4, 5, 6]
    assert_same_history(first + second, reference)


LAYOUTS = {"dp2": {}, "tp2": {"tensor": 2}, "cp2": {"context": 2}}


@pytest.mark.parametrize(
    "saved,resumed",
    [("dp2", "tp2"), *(pytest.param(*pair, marks=pytest.mark.slow) for pair in [("tp2", "dp2"), ("cp2", "dp2")])],
)
def test_checkpoints_reshard_between_layouts(demo_data, reference, tmp_path, saved, resumed):
    """Saved by the sharding engine at one layout, resumed at another: weights and AdamW moments
    travel as the same global tensors, so the run continues exactly."""
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    first = run(2, tiny_config(demo_data, checkpoint=save, train={"exit_after_steps": 3}, parallel=LAYOUTS[saved]))
    second = run(2, tiny_config(demo_data, checkpoint=save, parallel=LAYOUTS[resumed]))
    assert [h["step"] for h in first + second] == [1, 2, 3, 4, 5, 6]
    assert_same_history(first + second, reference)


def _resave_unsharded(tree: dict, path: str) -> int:
    """Load the latest checkpoint into an unsharded model and plain AdamW at this TP size and
    save it again in their layout (megatron's own description: what the converter writes and
    what the trainer wrote before the sharding engine)."""
    from megatron_harpe.checkpointing.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
    from megatron_harpe.model import build_model
    from megatron_harpe.training.optimizer import build_optimizer

    cfg = from_dict(Config, tree)
    parallel.initialize(cfg.parallel.tensor, 1)
    cfg.validate()
    model = build_model(cfg.model, cfg.position)
    assert not hasattr(model, "set_gradient_divide_factor")  # really unsharded
    optimizer = build_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    state = load_checkpoint(path, model=model, optimizer=optimizer)
    save_checkpoint(path, state["iteration"], model=model, config=read_checkpoint_config(path), train_state=state,
                    optimizer=optimizer)  # fmt: skip
    return state["iteration"]


@pytest.mark.slow  # CI time; checkpoints of the pre-FSDP2 layout
def test_resume_from_a_checkpoint_in_the_unsharded_layout(demo_data, reference, tmp_path):
    """Three steps on the engine at DP2; the checkpoint rewritten by an unsharded TP2 model in
    megatron's own layout (regular TP shards, no DP split); three more steps at DP2 from it."""
    save = {"save": str(tmp_path / "ckpt"), "keep_last": 2}
    first = run(2, tiny_config(demo_data, checkpoint=save, train={"exit_after_steps": 3}))
    tp2 = tiny_config(demo_data, parallel={"tensor": 2})
    assert parallel.run_on_ranks(_resave_unsharded, 2, tp2, save["save"]) == [3, 3]
    second = run(2, tiny_config(demo_data, checkpoint=save))
    assert_same_history(first + second, reference)
