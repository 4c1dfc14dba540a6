"""Checkpoints: reload under another tensor-parallel size, keep_last, and crash safety.

    python -m pytest tests/distributed/test_checkpoint_io.py -q            (add -m slow for TP=1 -> TP=2)

Ranks are spawned gloo processes (megatron_harpe.parallel.run_on_ranks); each rank returns its
weights and Adam moments, which the test puts back together in TP=1 shapes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from model_parity import unshard

from megatron_harpe import parallel
from megatron_harpe.checkpointing import checkpoint
from megatron_harpe.checkpointing.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    read_train_state,
    save_checkpoint,
)
from megatron_harpe.config import ModelConfig
from megatron_harpe.model import build_model
from megatron_harpe.position.config import PositionConfig

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=64
)
POSITION = PositionConfig(type="harpe", bases=[300.0, 30000.0])
CONFIG = {"model": {"num_layers": 2}, "position": {"type": "harpe", "bases": [300.0, 30000.0]}}


def _build(tp: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    parallel.initialize(tp, 1)
    parallel.seed_everything(seed)
    gpt = build_model(MODEL, POSITION)
    return gpt, torch.optim.AdamW(gpt.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _train(gpt: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    tokens = torch.randint(0, MODEL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(16).expand(2, -1)
    for _ in range(steps):
        gpt(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(gpt: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights and optimizer states of this rank, by parameter name."""
    snapshot = {name: param.detach().clone() for name, param in gpt.named_parameters()}
    for name, param in gpt.named_parameters():
        for key, value in optimizer.state[param].items():
            snapshot[f"{name}:{key}"] = value.detach().clone()
    return snapshot


def _draws() -> tuple:
    return (random.random(), float(np.random.rand()), torch.rand(3))


def _full(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    full = {}
    for key in per_rank[0]:
        name = key.split(":")[0]
        parts = [snapshot[key] for snapshot in per_rank]
        full[key] = parts[0] if parts[0].dim() == 0 else unshard(name, parts)
    return full


def _train_and_save(tp: int, save_dir: str) -> tuple:
    gpt, optimizer = _build(tp, seed=11)
    _train(gpt, optimizer, steps=2)
    train_state = {"consumed_samples": 4, "consumed_tokens": 64, "stage": 0, "scheduler": {"last_step": 2}}
    save_checkpoint(save_dir, 2, model=gpt, config=CONFIG, train_state=train_state, optimizer=optimizer)
    return _snapshot(gpt, optimizer), _draws()


def _load(tp: int, load_dir: str, resave_dir: str | None) -> tuple:
    gpt, optimizer = _build(tp, seed=99)  # different init: everything must come from the checkpoint
    state = load_checkpoint(load_dir, model=gpt, optimizer=optimizer)
    result = (_snapshot(gpt, optimizer), _draws(), state)
    if resave_dir is not None:
        save_checkpoint(resave_dir, 3, model=gpt, config=CONFIG, train_state=state, optimizer=optimizer)
    return result


def _assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert any(key.endswith(":exp_avg_sq") for key in expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def test_save_at_tp2_loads_at_tp1_with_optimizer_and_rng(tmp_path: Path) -> None:
    saved = parallel.run_on_ranks(_train_and_save, 2, 2, str(tmp_path))
    ((loaded, draws, state),) = parallel.run_on_ranks(_load, 1, 1, str(tmp_path), None)

    _assert_equal(loaded, _full([snapshot for snapshot, _ in saved]))
    assert draws[0] == saved[0][1][0] and draws[1] == saved[0][1][1]
    assert torch.equal(draws[2], saved[0][1][2])
    assert state["consumed_samples"] == 4 and state["scheduler"] == {"last_step": 2}
    assert state["iteration"] == 2 and state["has_optimizer"] and state["saved_world_size"] == 2
    assert read_checkpoint_config(tmp_path) == CONFIG
    assert read_train_state(tmp_path / "iter_0000002")["consumed_tokens"] == 64
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.slow
def test_save_at_tp1_loads_at_tp2(tmp_path: Path) -> None:
    first, resaved = tmp_path / "tp2", tmp_path / "tp1"
    saved = parallel.run_on_ranks(_train_and_save, 2, 2, str(first))
    parallel.run_on_ranks(_load, 1, 1, str(first), str(resaved))
    reloaded = parallel.run_on_ranks(_load, 2, 2, str(resaved), None)
    for rank in range(2):
        _assert_equal(reloaded[rank][0], saved[rank][0])


class SimulatedCrash(Exception):
    pass


def _crash(*args, **kwargs):
    raise SimulatedCrash()


def _lifecycle(save_dir: str) -> dict:
    """keep_last, re-saving an iteration, and a crash at each step of a save (world of one)."""
    root = Path(save_dir)
    gpt, optimizer = _build(1, seed=3)
    for iteration in (1, 2, 3, 4):
        _train(gpt, optimizer, steps=1)
        save_checkpoint(root, iteration, model=gpt, config=CONFIG, train_state={}, optimizer=optimizer, keep_last=2)
    report = {"after_keep_last": sorted(p.name for p in root.iterdir())}
    good = _snapshot(gpt, optimizer)

    crashes = {}
    for point in ("_save_rng_state", "_publish", "_write_latest", "replace"):
        original = getattr(checkpoint.os if point == "replace" else checkpoint, point)
        _train(gpt, optimizer, steps=1)  # weights now differ from the good checkpoint
        setattr(checkpoint.os if point == "replace" else checkpoint, point, _crash)
        try:
            save_checkpoint(root, 5, model=gpt, config=CONFIG, train_state={}, optimizer=optimizer, keep_last=2)
        except SimulatedCrash:
            pass
        finally:
            setattr(checkpoint.os if point == "replace" else checkpoint, point, original)
        fresh, fresh_optimizer = _build(1, seed=4)
        state = load_checkpoint(root, model=fresh, optimizer=fresh_optimizer)
        restored = _snapshot(fresh, fresh_optimizer)
        crashes[point] = {
            "latest": (root / checkpoint.LATEST_FILE).read_text().strip(),
            "loaded_iteration": state["iteration"],
            "weights_equal": all(torch.equal(restored[k], good[k]) for k in good),
        }
        shutil_state = sorted(p.name for p in root.iterdir() if p.name.startswith("iter_0000005"))
        crashes[point]["leftovers"] = shutil_state
        for leftover in root.glob("iter_0000005*"):  # as if the next run's save had cleaned up
            checkpoint.shutil.rmtree(leftover)
    report["crashes"] = crashes

    _train(gpt, optimizer, steps=1)
    save_checkpoint(root, 4, model=gpt, config=CONFIG, train_state={"again": True}, optimizer=optimizer)
    report["resaved"] = read_train_state(root).get("again")
    report["find_iter_dir"] = find_latest_checkpoint(root / "iter_0000003") == root / "iter_0000003"
    report["final"] = sorted(p.name for p in root.iterdir())
    return report


def test_keep_last_resave_and_crash_at_every_step_of_a_save(tmp_path: Path) -> None:
    (report,) = parallel.run_on_ranks(_lifecycle, 1, str(tmp_path))
    assert report["after_keep_last"] == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]
    for point, outcome in report["crashes"].items():
        assert outcome["latest"] == "4", point
        assert outcome["loaded_iteration"] == 4 and outcome["weights_equal"], point
    assert report["crashes"]["_save_rng_state"]["leftovers"] == ["iter_0000005.tmp"]
    assert report["crashes"]["_write_latest"]["leftovers"] == ["iter_0000005"]
    assert report["resaved"] is True and report["find_iter_dir"]
    assert report["final"] == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]
