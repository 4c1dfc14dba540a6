"""Process groups, device and seeding for tensor (TP), context (CP) and data (DP) parallelism.

One place decides the backend: NCCL when CUDA is available, gloo otherwise, so the same
training and test code runs on a GPU cluster and on a CPU laptop. Groups are created by
megatron-core's `parallel_state` (its layers read them from there) with pipeline size 1.

`run_on_ranks` starts N local processes wired as one gloo world; tests and the CPU demo use it
to exercise TP/CP/DP without torchrun.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import random
import socket
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

from megatron_harpe.rank_health import EXIT_WITH_PARENT_ENV, exit_when_launcher_dies

DEFAULT_TIMEOUT_MINUTES = 10.0
"""How long a collective waits for the other ranks before it fails (parallel.timeout_minutes)."""


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """What a rank needs to know about its place in the TP x CP x DP grid."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_context_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        """Ranks holding identical weights: gradients are averaged over this group."""
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_parallel_indices(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Sequence positions a CP rank holds, in megatron's load-balanced layout: chunks r and
    2*CP-1-r of 2*CP equal chunks, in that order (all positions when CP is 1)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is outside [0, {cp_size})")
    if cp_size == 1:
        return torch.arange(seq_length)
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x parallel.context = {2 * cp_size}: "
            "change the sequence length or parallel.context"
        )
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(
    tensor_parallel: int = 1, context_parallel: int = 1, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
) -> ParallelContext:
    """Join (or create) the process group and build megatron's TP/CP/DP groups.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT as set by torchrun; a plain
    `python script.py` becomes a world of one. A collective that waits longer than
    `timeout_minutes` for the other ranks fails; a worker of torchrun exits when torchrun dies.
    """
    exit_when_launcher_dies()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    device = default_device()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    world_size = dist.get_world_size()
    model_parallel = tensor_parallel * context_parallel
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel x context_parallel = "
            f"{tensor_parallel} x {context_parallel}: launch a multiple of {model_parallel} processes "
            "or change parallel.tensor / parallel.context"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        context_parallel_size=context_parallel,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=timeout_minutes,
    )
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=tensor_parallel,
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=context_parallel,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank (weights are then replicated
    before TP sharding, which keeps a TP run comparable to the TP=1 run)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        **{EXIT_WITH_PARENT_ENV: "1"},
    )
    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensors by value; the queue's own pickler would share them through
        # file descriptors that vanish when this process exits before the parent reads them.
        result = pickle.dumps(fn(*args))
        queue.put((rank, "ok", result))
    except BaseException:  # report any failure to the parent, including SystemExit
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        shutdown()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600) -> list:
    """Run `fn(*args)` in `world_size` fresh processes forming one gloo world.

    `fn` must be importable (module level). Returns the per-rank results ordered by rank;
    raises RuntimeError with the failing rank's traceback if any rank fails.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(rank, world_size, port, fn, args, queue)) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        if queue._reader.poll(1.0):  # SimpleQueue has no timeout of its own
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
        elif any(proc.exitcode not in (None, 0) for proc in procs):
            dead = [rank for rank, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
            errors.append(f"rank(s) {dead} died without reporting (exit codes {[procs[r].exitcode for r in dead]})")
        elif time.monotonic() > deadline:
            errors.append(f"no result from ranks {sorted(set(range(world_size)) - set(results))} in {timeout:.0f} s")
    for proc in procs:
        proc.join(timeout=5 if errors else timeout)
        if proc.is_alive():
            proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
