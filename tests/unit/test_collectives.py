"""Device-safe collectives: no module calls torch.distributed's collectives directly, the NCCL
device choice, and the wrappers' results on a 2-rank gloo world.

    python -m pytest tests/unit/test_collectives.py -q

NCCL takes CUDA tensors only and gloo takes both, so a CPU tensor handed to a collective passes
every CPU test and crashes the first GPU step (loss token counts, the per-step loss, the head
statistics' float64 accumulators did). The static scan below fails on any such direct call.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_harpe import collectives
from megatron_harpe.parallel import run_on_ranks

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_harpe"
TENSOR_COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_reduce_coalesced",
}


def _direct_collective_calls(source: str) -> list[int]:
    """Line numbers of `dist.<collective>(...)` / `torch.distributed.<collective>(...)` calls
    and of `from torch.distributed import <collective>`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TENSOR_COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed") or owner.startswith("torch.distributed."):
                lines.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            if any(alias.name in TENSOR_COLLECTIVES for alias in node.names):
                lines.append(node.lineno)
    return sorted(lines)


def test_scan_finds_the_call_patterns_it_guards_against():
    source = (
        "import torch.distributed as dist\nimport torch\n"
        "dist.all_reduce(x, group=g)\n"
        "torch.distributed.broadcast(x, 0)\n"
        "from torch.distributed import all_gather\n"
        "dist.barrier()\n"
    )
    assert _direct_collective_calls(source) == [3, 4, 5]


def test_no_module_calls_tensor_collectives_directly():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "collectives.py":
            continue
        for line in _direct_collective_calls(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert not offenders, (
        "call megatron_harpe.collectives instead (it moves tensors to the group's device; NCCL "
        f"refuses CPU tensors): {offenders}"
    )


def test_nccl_groups_communicate_on_this_process_cuda_device(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cuda:gloo")
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.collective_device() == torch.device("cpu")


def test_tensors_reach_the_backend_on_its_device(monkeypatch):
    """A host tensor is copied to the group's device for the call and the result copied back
    in place (the device is faked as the host's 'meta' twin: the call sees only meta tensors)."""
    seen = []

    def fake_all_reduce(tensor, op=None, group=None):
        seen.append(tensor.device)

    monkeypatch.setattr(collectives, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    host = torch.ones(3, dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # meta holds no data to copy back: the copy was attempted
        collectives.all_reduce(host)
    assert seen == [torch.device("meta")]


def _exercise_wrappers() -> dict:
    from megatron_harpe import parallel

    ctx = parallel.initialize(1, 1)
    rank = ctx.rank
    summed = torch.arange(4, dtype=torch.float64)[::2] * (rank + 1)  # non-contiguous view
    returned = collectives.all_reduce(summed)
    maximum = collectives.all_reduce(torch.tensor(float(rank)), op=collectives.ReduceOp.MAX)
    sent = collectives.broadcast(torch.tensor([rank + 10]), src=1)
    gathered = collectives.all_gather(torch.full((2,), float(rank)))
    stacked = torch.stack([torch.full((2,), float(rank + 1) * (i + 1)) for i in range(2)])
    scattered = collectives.reduce_scatter_sum(stacked)
    return {
        "summed": summed,
        "same_object": returned is summed,
        "max": maximum,
        "sent": sent,
        "gathered": gathered,
        "scattered": scattered,
    }


@pytest.mark.distributed
def test_wrappers_on_two_gloo_ranks():
    results = run_on_ranks(_exercise_wrappers, 2)
    for rank, result in enumerate(results):
        assert result["same_object"]
        assert torch.equal(result["summed"], torch.tensor([0.0, 6.0], dtype=torch.float64))
        assert result["max"].item() == 1.0
        assert result["sent"].tolist() == [11]
        assert [part.tolist() for part in result["gathered"]] == [[0.0, 0.0], [1.0, 1.0]]
        # row i of rank r's stack is (r+1)*(i+1); the sum over ranks of row `rank` is 3*(rank+1)
        assert result["scattered"].tolist() == [3.0 * (rank + 1)] * 2
