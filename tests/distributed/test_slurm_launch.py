"""The Slurm launcher wiring real gloo processes under fake Slurm variables.

    python -m pytest tests/distributed/test_slurm_launch.py -q

Two layouts run `python -m megatron_harpe.launch -- <this file> OUT` and check what the ranks
see: one node with 2 processes, and two "nodes" (two launchers on this machine, as srun would
start on two hosts) with one process each, meeting at the c10d rendezvous of the first node.
Run as a script, this file is the worker: it joins the process group through
`megatron_harpe.parallel.initialize` and writes what it saw to OUT/rank-<r>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_harpe.parallel import free_port

pytestmark = pytest.mark.distributed
THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parents[2]


def worker(out_dir: Path) -> None:
    import torch
    import torch.distributed as dist

    from megatron_harpe import parallel

    ctx = parallel.initialize(tensor_parallel=1, context_parallel=1)
    ranks = torch.tensor([float(ctx.rank)])
    dist.all_reduce(ranks)
    record = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "rank_sum": ranks.item(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
        "node_rank": int(os.environ["GROUP_RANK"]),
        "run_id": os.environ["TORCHELASTIC_RUN_ID"],
        "slurm_node": os.environ["SLURM_NODEID"],
    }
    parallel.shutdown()
    (out_dir / f"rank-{record['rank']}.json").write_text(json.dumps(record))


def _slurm_env(node_id: int, nodes: int, tasks_per_node: int, port: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TORCHELASTIC"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        SLURM_JOB_ID="9001",
        SLURM_JOB_NAME="fake",
        SLURM_JOB_NODELIST=",".join(["localhost"] * nodes),
        SLURM_NNODES=str(nodes),
        SLURM_NODEID=str(node_id),
        SLURM_NTASKS_PER_NODE=str(tasks_per_node),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
    )
    return env


def _launch(tmp_path: Path, nodes: int, tasks_per_node: int) -> tuple[list[dict], list[str]]:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    port = free_port()
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_harpe.launch",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--rdzv-port",
                str(port),
                "--",
                str(THIS_FILE),
                str(out_dir),
            ],
            env=_slurm_env(node, nodes, tasks_per_node, port),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(nodes)
    ]
    logs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    for launcher, log in zip(launchers, logs):
        assert launcher.returncode == 0, log
    records = [json.loads(path.read_text()) for path in sorted(out_dir.glob("rank-*.json"))]
    return records, logs


def test_one_node_two_processes(tmp_path: Path) -> None:
    records, logs = _launch(tmp_path, nodes=1, tasks_per_node=2)
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["rank_sum"] == 1.0 for r in records)
    assert sorted(r["local_rank"] for r in records) == [0, 1]
    assert all(r["local_world_size"] == 2 and r["run_id"] == "9001" for r in records)
    assert "world size 2" in logs[0]
    job_dir = tmp_path / "runs" / "fake" / "slurm-9001"
    record = json.loads((job_dir / "launch-restart0-node0.json").read_text())
    assert record["world_size"] == 2 and record["procs_per_node"] == 2
    assert list((job_dir / "restart-0" / "node-0").rglob("stdout.log")), "per-rank logs are written"


def test_two_nodes_one_process_each(tmp_path: Path) -> None:
    records, _ = _launch(tmp_path, nodes=2, tasks_per_node=1)
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["rank_sum"] == 1.0 for r in records)
    assert all(r["local_rank"] == 0 and r["local_world_size"] == 1 for r in records)
    # torchrun numbers the nodes itself; each node got one of the two node ranks.
    assert sorted(r["node_rank"] for r in records) == [0, 1]
    assert sorted(r["slurm_node"] for r in records) == ["0", "1"]
    job_dir = tmp_path / "runs" / "fake" / "slurm-9001"
    assert sorted(p.name for p in job_dir.glob("launch-*.json")) == [
        "launch-restart0-node0.json",
        "launch-restart0-node1.json",
    ]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
