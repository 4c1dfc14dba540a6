"""The megatron side of conversion: which model a checkpoint holds, building it in a
one-process world (TP=1: the checkpoint's own layout does not matter), and running it.

    model, spec = load_megatron_model("runs/demo_cpu/checkpoints")
    logits = megatron_logits(model, tokens)           # [b, s, vocab], float32
    continuation = megatron_greedy(model, tokens[:1], new_tokens=8)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_harpe import parallel
from megatron_harpe.checkpointing.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    read_train_state,
)
from megatron_harpe.config import Config, ModelConfig, from_dict
from megatron_harpe.model import build_model
from megatron_harpe.position.config import PositionConfig


@dataclasses.dataclass
class CheckpointSpec:
    """What a checkpoint holds: the model, the position encoding it was last trained with."""

    path: Path
    config: Config
    model: ModelConfig
    position: PositionConfig
    train_state: dict
    trained_length: int
    """The longest sequence length the config trains at (for the export's max_position_embeddings)."""


_ITERATION = re.compile(r"^iter_\d{7,}(\.tmp)?$")


def unfinished_iteration(path: str | Path) -> str | None:
    """Why `path`, named like an iteration dir, is not a complete checkpoint (a save in progress,
    or an iteration its run deleted), with the newest complete one of its directory; None if
    `path` is not such a name or is complete."""
    path = Path(path)
    if not _ITERATION.match(path.name):
        return None
    final = path.with_name(path.name.removesuffix(".tmp"))
    if final.is_dir() and not path.name.endswith(".tmp"):
        return None
    if path.name.endswith(".tmp") or final.with_name(final.name + ".tmp").is_dir():
        state = f"{final.name} is still being written by its run"
    else:
        state = f"{final.name} does not exist (deleted by its run's checkpoint.keep_last?)"
    try:
        latest = find_latest_checkpoint(path.parent)
    except ValueError:
        latest = None
    newest = (
        (
            f"the newest complete iteration in {path.parent} is {latest.name}: convert that one (--input {latest}) "
            "or wait for the save to finish"
        )
        if latest is not None
        else f"{path.parent} holds no complete iteration yet"
    )
    return f"{state}; {newest}"


def read_checkpoint_spec(path: str | Path) -> CheckpointSpec:
    unfinished = unfinished_iteration(path)
    if unfinished is not None:
        raise FileNotFoundError(unfinished)
    found = find_latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"no megatron_harpe checkpoint in {path} (no latest_checkpointed_iteration.txt or iter_*/)"
        )
    config = from_dict(Config, read_checkpoint_config(found))
    state = read_train_state(found)
    stages = config.resolved_stages()
    # a multi-stage schedule changes the encoding between stages: use the stage saved in
    stage = min(int(state.get("stage", len(stages) - 1)), len(stages) - 1)
    position = stages[stage].position
    position.resolve(config.model)
    trained = max(stage.seq_length for stage in stages)
    return CheckpointSpec(found, config, config.model, position, state, trained)


def ensure_single_process() -> None:
    """A world of one with TP=1, CP=1 (created if there is none)."""
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise ValueError(
            f"the converter runs as one process, but this is a world of {dist.get_world_size()}: "
            "run it with plain `python`, not torchrun (checkpoints load at TP=1 whatever their layout)"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize(1, 1)


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (its word embeddings')."""
    found = find_latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(unfinished_iteration(path) or f"no megatron_harpe checkpoint in {path}")
    metadata = dist_checkpointing.load_tensors_metadata(str(found / "dist"))
    return metadata["embedding.word_embeddings.weight"].dtype


def load_megatron_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, CheckpointSpec]:
    spec = read_checkpoint_spec(path)
    ensure_single_process()
    model = build_model(spec.model, spec.position, params_dtype=dtype, initialize=False)
    load_checkpoint(spec.path, model=model, weights_only=True, load_rng=False)
    return model.eval(), spec


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of a TP=1 model for token ids [b, s] at positions 0 .. s-1."""
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    return model(tokens, positions, None).float()


@torch.no_grad()
def megatron_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of prompt [1, s] (recomputes the whole sequence each step: no KV cache)."""
    tokens = prompt
    produced = []
    for _ in range(new_tokens):
        next_token = megatron_logits(model, tokens)[:, -1].argmax(-1, keepdim=True)
        produced.append(int(next_token))
        tokens = torch.cat([tokens, next_token], dim=1)
    return produced
