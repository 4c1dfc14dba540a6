"""Save and load training checkpoints that reload under any tensor/context-parallel layout.

Used by the trainer (resume), the converter (HF <-> megatron) and the evaluator. Layout:

    <dir>/latest_checkpointed_iteration.txt   the iteration number, updated only after the iteration dir is complete
    <dir>/iter_0000012/config.yaml            the full resolved config (the per-head bases travel with the weights)
    <dir>/iter_0000012/train_state.json       iteration, consumed samples/tokens, stage, scheduler, weights_only ...
    <dir>/iter_0000012/rng/rank_00003.pt      python / numpy / torch (/ cuda) RNG states of global rank 3
    <dir>/iter_0000012/dist/                  megatron.core.dist_checkpointing: {"model": ..., "optimizer": ...}

Weights and optimizer moments are saved as global (TP- and DP-agnostic) tensors, so a checkpoint
saved at TP=2 x DP=2 loads at TP=1 or TP=4, sharded or not. The trainer's model is sharded by the
engine (training/sharding.py): each rank writes its own rows of each tensor (fsdp_entries.py); an
unsharded model (converter, evaluator) writes megatron's own description. Weights are fp32 also
when the model computes in bf16 (the engine's fp32 shards are the main weights), so fp32 and
bf16 runs load each other's checkpoints. Every rank calls `save_checkpoint` / `load_checkpoint`:

    path = save_checkpoint("ckpt", 12, model=gpt, config=cfg.to_dict(), train_state={...}, optimizer=adamw)
    train_state = load_checkpoint("ckpt", model=gpt, optimizer=adamw)   # newest complete checkpoint

Crash safety: everything is written into `iter_0000012.tmp`, renamed to `iter_0000012` when
complete, and only then does the `latest` file (written to a temporary name and renamed) point to
it. Old iterations are renamed to `*.deleting` before removal, so a dir named `iter_*` is always
complete. A save that fails (disk full, no permission) raises CheckpointWriteError on every rank
and leaves no work dir behind; loading skips damaged iterations (see integrity.py) and
says so. Scripts that save need an `if __name__ == "__main__":` guard: dist_checkpointing's
writer starts a spawn-based helper process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.utils import _get_failure_dict

from megatron_harpe import collectives, files
from megatron_harpe.checkpointing import fsdp_entries
from megatron_harpe.checkpointing.extra_state import load_sharded
from megatron_harpe.checkpointing.integrity import CONFIG_FILE, TRAIN_STATE_FILE, checkpoint_problem
from megatron_harpe.checkpointing.run_lock import CheckpointDirLocked, check_not_locked_by_other
from megatron_harpe.rank_health import any_rank_failed
from megatron_harpe.sharded_params import is_sharded

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


# ---------------------------------------------------------------------------------------- save


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    *,
    model: torch.nn.Module,
    config: dict,
    train_state: dict,
    optimizer: torch.optim.Optimizer | None = None,
    keep_last: int | None = None,
    sharded_strategy: SaveShardedStrategy | None = None,
) -> Path:
    """Write `iter_<iteration>` under `save_dir` and make it the latest checkpoint (collective).

    Returns the final iteration directory. `keep_last=N` keeps the N newest iterations up to this
    one and deletes older ones (None keeps all). `sharded_strategy` replaces the torch_dist writer
    (the converter's streaming one, convert/streaming_save.py, writes the same format)."""
    _require_process_group()
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    state = {**train_state, "iteration": iteration, "format_version": FORMAT_VERSION}
    state.setdefault("weights_only", optimizer is None)
    state["has_optimizer"] = optimizer is not None
    state["saved_world_size"] = dist.get_world_size()
    try:
        state_text = json.dumps(state, indent=2)
        config_text = yaml.safe_dump(config, sort_keys=False)
    except (TypeError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"train_state and config must be plain JSON/YAML data: {error}") from error

    rank = dist.get_rank()
    final_dir = iteration_dir(save_dir, iteration)
    work_dir = final_dir.with_name(final_dir.name + ".tmp")
    error = None
    try:
        if rank == 0:
            check_not_locked_by_other(save_dir)
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            _remove_incomplete(Path(save_dir), final_dir)
            (work_dir / "dist").mkdir(parents=True)
            (work_dir / "rng").mkdir()
    except (OSError, CheckpointDirLocked) as caught:
        error = caught
    _raise_if_any_rank_failed(error, save_dir, iteration, work_dir)

    try:
        sharded = _checkpoint_entries(model, optimizer, placeholders=None)
        dist_checkpointing.save(
            sharded,
            str(work_dir / "dist"),
            sharded_strategy=sharded_strategy or _save_strategy(),
            async_sharded_save=False,
        )
        _save_rng_state(work_dir / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            files.write_text(work_dir / CONFIG_FILE, config_text)  # flushed before the directory is published
            files.write_text(work_dir / TRAIN_STATE_FILE, state_text)
    except (OSError, CheckpointException, RuntimeError) as caught:
        error = caught
    _raise_if_any_rank_failed(error, save_dir, iteration, work_dir)  # every rank's files are in work_dir

    if rank == 0:
        _publish(work_dir, final_dir)
        _write_latest(Path(save_dir), iteration)
        if keep_last is not None:
            _delete_old_iterations(Path(save_dir), iteration, keep_last)
    dist.barrier()
    return final_dir


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, no permission ...); nothing of it was kept."""


_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space there or point checkpoint.save to a larger filesystem",
    errno.EDQUOT: "the disk quota is exhausted: free space there or point checkpoint.save elsewhere",
    errno.EACCES: "no permission to write there: fix the directory's permissions or choose another checkpoint.save",
    errno.EPERM: "no permission to write there: fix the directory's permissions or choose another checkpoint.save",
    errno.EROFS: "the filesystem is read-only: choose another checkpoint.save",
}


def _raise_if_any_rank_failed(error: BaseException | None, save_dir, iteration: int, work_dir: Path) -> None:
    """Collective: if any rank failed, remove the half-written work dir and raise on every rank."""
    if not any_rank_failed(error is not None):
        return
    if isinstance(error, CheckpointDirLocked):  # the work dir may be the other run's
        raise error
    if dist.get_rank() == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    if error is None:
        raise CheckpointWriteError(
            f"another rank failed to write checkpoint iteration {iteration} to {save_dir} (see its log)"
        )
    raise CheckpointWriteError(_describe_write_error(error, Path(save_dir), iteration)) from error


def _describe_write_error(error: BaseException, save_dir: Path, iteration: int) -> str:
    """One line: where, why (the errno when one can be found) and the fix."""
    chain, seen = [error], set()
    while chain[-1].__cause__ or chain[-1].__context__:
        following = chain[-1].__cause__ or chain[-1].__context__
        if id(following) in seen:
            break
        seen.add(id(following))
        chain.append(following)
    if isinstance(error, CheckpointException):
        chain += [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
    codes = [e.errno for e in chain if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS]
    text = " ".join(str(e) for e in chain)
    for code, phrase in (
        (errno.ENOSPC, "No space left"),
        (errno.EACCES, "Permission denied"),
        (errno.EROFS, "Read-only"),
    ):
        if phrase in text:
            codes.append(code)
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError:
        free = None
    if not codes and free is not None and free < (64 << 20):  # torch.save reports ENOSPC as "enforce fail ..."
        codes.append(errno.ENOSPC)
    reason = _WRITE_ERRNOS[codes[0]] if codes else f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    space = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
    try:
        previous = find_latest_checkpoint(save_dir) if save_dir.is_dir() else None
        kept = f"the newest checkpoint is still {previous.name}" if previous else "no earlier checkpoint exists"
    except ValueError:  # every earlier iteration damaged: find_latest_checkpoint says so when loading
        kept = "no intact earlier checkpoint exists"
    return (
        f"cannot write checkpoint iteration {iteration} to {save_dir}{space}: {reason}. Nothing of it was kept; {kept}"
    )


class _HostSafeTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist saving, made to run without a GPU. Two steps of megatron-core 0.16.1
    assume CUDA: staging tensors to host memory (`non_blocking=True` then
    `torch.cuda.synchronize()`) and the final failure broadcast (a tensor on
    `torch.cuda.current_device()`). Without CUDA both are done on the host instead."""

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
        if torch.cuda.is_available():
            return request
        preload = partial(writer.preload_tensors, writer.write_buckets, False) if request.preload_fn else None
        return request._replace(preload_fn=preload, finalize_fns=[partial(_finalize_on_host, *save_state_dict_ret)])


def _finalize_on_host(storage_writer, global_metadata, dist_wrapper) -> None:
    """Gather every rank's write results, let the coordinator write the checkpoint metadata,
    and raise on every rank if any rank failed to write."""
    all_results = dist_wrapper.gather_object(storage_writer.retrieve_write_results())
    failures = {}
    if dist_wrapper.is_coordinator:
        failures = _get_failure_dict(all_results)
        if not failures:
            storage_writer.finish(global_metadata, all_results)
    failed = torch.tensor([int(bool(failures))], dtype=torch.int)
    collectives.broadcast(failed, src=dist_wrapper.coordinator_rank, group=dist_wrapper.group)
    if failed.item():
        raise CheckpointException("write", failures)


def _save_strategy() -> TorchDistSaveShardedStrategy:
    # one writer process per rank: the spare cores belong to the other ranks
    return _HostSafeTorchDistSaveStrategy("torch_dist", 1, thread_count=1)


def _save_rng_state(path: Path) -> None:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = get_cuda_rng_tracker().get_states()
    torch.save(state, path)


def _publish(work_dir: Path, final_dir: Path) -> None:
    """Rename the completed work dir to its final name (replacing an older save of the same
    iteration: the old one is renamed away first, then removed)."""
    if final_dir.exists():
        replaced = final_dir.with_name(final_dir.name + ".deleting")
        os.rename(final_dir, replaced)
        os.rename(work_dir, final_dir)
        shutil.rmtree(replaced)
    else:
        os.rename(work_dir, final_dir)


def _write_latest(save_dir: Path, iteration: int) -> None:
    files.write_text(save_dir / LATEST_FILE, f"{iteration}\n")


def _remove_incomplete(save_dir: Path, final_dir: Path) -> None:
    """Leftovers of crashed deletions (never complete) and of an earlier crashed save of this
    iteration. Other `iter_*.tmp` dirs may be another run's saves in progress: they are removed
    by the trainer once it holds the directory's lock (run_lock.remove_save_leftovers)."""
    for leftover in save_dir.iterdir():
        if leftover.is_dir() and leftover.name.startswith("iter_") and leftover.suffix == ".deleting":
            shutil.rmtree(leftover, ignore_errors=True)
    own = final_dir.with_name(final_dir.name + ".tmp")
    if own.exists():
        shutil.rmtree(own)


def _delete_old_iterations(save_dir: Path, current: int, keep_last: int) -> None:
    """Keep `keep_last` iterations up to `current`; newer dirs (an abandoned run) are left alone."""
    older = sorted(it for it in _complete_iterations(save_dir) if it < current)
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for iteration in doomed:
        path = iteration_dir(save_dir, iteration)
        deleting = path.with_name(path.name + ".deleting")
        os.rename(path, deleting)
        shutil.rmtree(deleting)


# ---------------------------------------------------------------------------------------- find


def _complete_iterations(save_dir: Path) -> list[int]:
    if not save_dir.is_dir():
        return []
    found = []
    for child in save_dir.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and child.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def find_latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The iteration dir `latest_checkpointed_iteration.txt` points to; `save_dir` itself if it
    is an iteration dir; None if there is no checkpoint. If the latest file is missing or names a
    dir that is gone, the newest complete `iter_*` dir is used. A damaged iteration (a file
    missing or truncated) is skipped, with a warning, for the newest intact older one; if every
    iteration is damaged, a ValueError says what is wrong with each."""
    path = Path(save_dir)
    if (path / TRAIN_STATE_FILE).is_file() or (path / "dist").is_dir():
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}; load an intact iteration instead")
        return path
    if not path.is_dir():
        return None
    candidates = sorted(_complete_iterations(path), reverse=True)
    latest_file = path / LATEST_FILE
    if latest_file.is_file():
        text = latest_file.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{latest_file} should hold an iteration number, found {text!r}")
        if iteration_dir(path, int(text)).is_dir():  # newer dirs than latest were never published
            candidates = [it for it in candidates if it <= int(text)]
        else:
            _warn(f"{latest_file} names iteration {text} but {iteration_dir(path, int(text))} is missing")
    damaged = []
    for iteration in candidates:
        candidate = iteration_dir(path, iteration)
        problem = checkpoint_problem(candidate)
        if problem is None:
            if damaged:
                _warn(
                    f"damaged checkpoint {'; '.join(damaged)} in {path}: falling back to {candidate.name}, "
                    "the newest intact one"
                )
            return candidate
        damaged.append(f"{candidate.name} ({problem})")
    if damaged:
        raise ValueError(
            f"no intact checkpoint in {path}: {'; '.join(damaged)}. Restore the files, or move the damaged "
            "iteration dirs away to start from scratch"
        )
    return None


def _warn(message: str) -> None:
    """Said once per job (on rank 0), not once per rank."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.warning(message)


def _resolve(path: str | Path) -> Path:
    found = find_latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint in {path}: expected {LATEST_FILE} or iter_XXXXXXX/ dirs written by save_checkpoint"
        )
    return found


def read_checkpoint_config(path: str | Path) -> dict:
    """The resolved config saved with a checkpoint (a save dir or an iteration dir), without the
    keys of earlier versions that no longer exist (config.RETIRED_KEYS)."""
    from megatron_harpe.config import drop_retired_keys

    return drop_retired_keys(yaml.safe_load((_resolve(path) / CONFIG_FILE).read_text()))


def read_train_state(path: str | Path) -> dict:
    """train_state.json of a checkpoint (a save dir or an iteration dir), without loading weights."""
    return json.loads((_resolve(path) / TRAIN_STATE_FILE).read_text())


# ---------------------------------------------------------------------------------------- load


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    load_rng: bool = True,
    weights_only: bool = False,
) -> dict:
    """Load weights (and optimizer moments and RNG states) into this rank's shard of `model`,
    whatever TP/CP layout the checkpoint was saved with (collective). Returns train_state.

    `weights_only=True` loads only the weights (continual pretraining from a converted model):
    the optimizer and the RNG are left as they are. A sharded model (training/sharding.py) gets its fp32
    shards filled in place, its optimizer's moments likewise."""
    _require_process_group()
    checkpoint = _resolve(path)
    train_state = json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
    load_optimizer = optimizer is not None and not weights_only
    if load_optimizer and not train_state.get("has_optimizer", False):
        raise ValueError(
            f"{checkpoint} holds weights only (no optimizer state): load it with weights_only=True "
            "(a fresh start from these weights), e.g. set checkpoint.pretrained instead of resuming"
        )
    dist_dir = str(checkpoint / "dist")
    saved = dist_checkpointing.load_common_state_dict(dist_dir)["optimizer"] if load_optimizer else None
    sharded = _checkpoint_entries(model, optimizer if load_optimizer else None, placeholders=saved)
    try:
        loaded = load_sharded(sharded, dist_dir)  # tolerates TE's _extra_state either way round
    except Exception as error:  # dist_checkpointing raises bare exceptions on shape/key mismatch
        raise ValueError(
            f"{checkpoint} does not match the model built here ({error}); build the model from "
            "read_checkpoint_config(path) so layer count, sizes and vocabulary agree"
        ) from error

    if is_sharded(model):  # the engine's shards were filled in place
        fsdp_entries.install_loaded(model, sharded, loaded, optimizer if load_optimizer else None, saved)
    else:
        missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
        real_missing = [key for key in missing if not key.endswith("_extra_state")]
        if real_missing or unexpected:
            raise ValueError(f"{checkpoint}: weights missing {real_missing}, unexpected {unexpected}")
        if load_optimizer:
            _load_optimizer_state(optimizer, loaded["optimizer"])
    if load_rng and not weights_only:
        _load_rng_state(checkpoint / "rng" / f"rank_{dist.get_rank():05d}.pt")
    return train_state


def _load_rng_state(path: Path) -> None:
    if not path.is_file():
        logger.warning("no RNG state %s (saved with fewer ranks?): keeping this rank's RNG", path)
        return
    state = torch.load(path, weights_only=False)  # our own file: python/numpy states are tuples
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


# ---------------------------------------------------------------------- sharded optimizer state


def _checkpoint_entries(model, optimizer, placeholders: dict | None) -> dict[str, Any]:
    """What this rank saves (or, with `placeholders`, the saved common optimizer part, loads):
    the engine's shards (fsdp_entries.py) or an unsharded model's own description, the
    same global tensors either way."""
    if is_sharded(model):
        sharded: dict[str, Any] = {"model": fsdp_entries.model_entries(model)}
        if optimizer is not None:
            sharded["optimizer"] = fsdp_entries.optimizer_entries(model, optimizer, placeholders)
        return sharded
    sharded = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = _optimizer_sharded_state(optimizer, sharded["model"], placeholders)
    return sharded


def _optimizer_sharded_state(optimizer: torch.optim.Optimizer, model_sharded: dict, placeholders: dict | None) -> dict:
    """The optimizer's state with each per-parameter tensor (Adam moments ...) described as a
    slice of a global tensor, sharded exactly like its parameter; scalars (Adam's step) and
    hyperparameters are kept as plain (common) values.

    For loading, `placeholders` is the saved common part: it says which parameters had which
    tensor states, and empty tensors of the right shape are made for them."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    param_to_sharded = get_param_id_to_sharded_param_map(model_sharded, params)
    state_dict = optimizer.state_dict()
    if placeholders is not None:
        state_dict["state"] = {
            param_id: {key: torch.empty_like(params[param_id]) for key in keys}
            for param_id, keys in placeholders["tensor_state_keys"].items()
        }
    tensor_state: dict[int, dict[str, Any]] = {}
    scalar_state: dict[int, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        param = params[param_id]
        if param_id not in param_to_sharded:
            raise ValueError(f"optimizer parameter {param_id} {tuple(param.shape)} is not a parameter of the model")
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                tensor_state.setdefault(param_id, {})[key] = make_sharded_optimizer_tensor(
                    param_to_sharded[param_id], value, prefix=f"optimizer.state.{key}"
                )
            else:
                scalar_state.setdefault(param_id, {})[key] = value
    # hyperparameters come back from the checkpoint, the parameter ids from this process
    groups = [{**group, "params": LocalNonpersistentObject(group["params"])} for group in state_dict["param_groups"]]
    sharded = {"tensor_state": tensor_state, "param_groups": groups}
    if placeholders is None:  # saving: what loading needs to know before it can ask for tensors
        sharded["tensor_state_keys"] = {param_id: sorted(keys) for param_id, keys in tensor_state.items()}
        sharded["scalar_state"] = scalar_state
    return sharded


def _load_optimizer_state(optimizer: torch.optim.Optimizer, loaded: dict) -> None:
    current_groups = optimizer.state_dict()["param_groups"]
    saved_groups = loaded["param_groups"]
    if len(saved_groups) != len(current_groups) or any(
        len(saved["params"]) != len(current["params"]) for saved, current in zip(saved_groups, current_groups)
    ):
        raise ValueError(
            "the optimizer's parameter groups differ from the checkpoint's: build the optimizer the "
            "same way as when saving (same parameter grouping)"
        )
    state = {param_id: dict(tensors) for param_id, tensors in loaded["tensor_state"].items()}
    for param_id, scalars in loaded["scalar_state"].items():
        state.setdefault(param_id, {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


def _require_process_group() -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            "checkpoints are saved and loaded collectively: call megatron_harpe.parallel.initialize() first"
        )
