"""The Slurm launch logic without Slurm: node lists, Slurm variables, the torchrun command.

python -m pytest tests/unit/test_launch.py -q
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from torch.distributed.run import get_args_parser

from megatron_harpe import launch
from megatron_harpe.launch import SlurmJob, expand_nodelist


@pytest.mark.parametrize(
    "nodelist, expected",
    [
        ("node7", ["node7"]),
        ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("a[09-11]", ["a09", "a10", "a11"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("dgx-[3,1]-ib", ["dgx-3-ib", "dgx-1-ib"]),
        ("x1,y[2-3],z", ["x1", "y2", "y3", "z"]),
    ],
)
def test_expand_nodelist(nodelist: str, expected: list[str]) -> None:
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu]1", "gpu[3-1]", "gpu[a-b]", "gpu[1,,2]", "", "gpu[1]x]"])
def test_expand_nodelist_rejects_malformed_lists(bad: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def _fake_scontrol(directory, script: str) -> None:
    path = directory / "scontrol"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_hostnames_prefers_scontrol(tmp_path, monkeypatch) -> None:
    _fake_scontrol(tmp_path, 'echo "alpha"\necho "beta"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert launch.hostnames("whatever[1-9]") == ["alpha", "beta"]


def test_hostnames_falls_back_to_the_parser_when_scontrol_fails(tmp_path, monkeypatch) -> None:
    _fake_scontrol(tmp_path, "exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert launch.hostnames("n[1-2]") == ["n1", "n2"]


def _env(**overrides: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "harpe",
        "SLURM_JOB_NODELIST": "gpu[001-004]",
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_GPUS_ON_NODE": "8",
    }
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def test_job_from_environment() -> None:
    job = SlurmJob.from_environment(_env(SLURM_RESTART_COUNT="3"), resolve_hosts=expand_nodelist)
    assert job.nodes == ("gpu001", "gpu002", "gpu003", "gpu004")
    assert (job.first_node, job.node_rank, job.num_nodes) == ("gpu001", 2, 4)
    assert (job.procs_per_node, job.world_size, job.restart_count) == (8, 32, 3)
    assert job.job_id == "4242" and job.job_name == "harpe"


def test_explicit_process_count_wins_over_slurm() -> None:
    job = SlurmJob.from_environment(_env(), procs_per_node=2, resolve_hosts=expand_nodelist)
    assert job.world_size == 8


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4(S:0-1)"}, 4),
        ({"SLURM_GPUS_PER_NODE": "h100:8(S:0,1),a100:2"}, 8),
        ({"SLURM_GPUS_PER_NODE": "2"}, 2),
        ({"SLURM_NTASKS_PER_NODE": "2(x3)"}, 2),
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}, 8),
    ],
)
def test_processes_per_node(variables: dict[str, str], expected: int) -> None:
    assert launch.processes_per_node(variables) == expected


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_NNODES": "2"}, "names 4 hosts"),
        ({"SLURM_NODEID": "4"}, "outside the job's 4 node"),
        ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
        ({"SLURM_GPUS_ON_NODE": None}, "--nproc-per-node"),
        ({"SLURM_GPUS_ON_NODE": None, "SLURM_GPUS_PER_NODE": "a100"}, "SLURM_GPUS_PER_NODE"),
        ({"SLURM_RESTART_COUNT": "often"}, "SLURM_RESTART_COUNT"),
    ],
)
def test_bad_environment_names_the_variable(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlurmJob.from_environment(_env(**overrides), resolve_hosts=expand_nodelist)


def test_single_node_needs_no_node_id() -> None:
    job = SlurmJob.from_environment(
        _env(SLURM_JOB_NODELIST="solo", SLURM_NNODES="1", SLURM_NODEID=None), resolve_hosts=expand_nodelist
    )
    assert job.node_rank == 0 and job.nodes == ("solo",)


def test_rendezvous_port_is_a_function_of_the_job() -> None:
    ports = {launch.rendezvous_port(str(job_id)) for job_id in range(1000, 1200)}
    assert all(launch.DEFAULT_PORT_BASE <= port < launch.DEFAULT_PORT_BASE + launch.PORT_SPAN for port in ports)
    assert len(ports) > 190  # different jobs on a shared node rarely collide
    assert launch.rendezvous_port("1234") == launch.rendezvous_port("1234")


def test_run_name() -> None:
    job = SlurmJob.from_environment(_env(), resolve_hosts=expand_nodelist)
    assert launch.run_name(["pretrain_harpe.py", "--config", "configs/llama2_7b_128k_harpe.yaml"], job) == (
        "llama2_7b_128k_harpe"
    )
    assert launch.run_name(["pretrain_harpe.py", "--config=configs/demo_cpu.yaml"], job) == "demo_cpu"
    assert launch.run_name(["other.py"], job) == "harpe"


def test_torchrun_command_is_understood_by_torchrun(tmp_path) -> None:
    job = SlurmJob.from_environment(_env(SLURM_RESTART_COUNT="1"), resolve_hosts=expand_nodelist)
    program = ["pretrain_harpe.py", "--config", "configs/x.yaml", "--train.lr", "1e-5"]
    command = launch.torchrun_command(job, program, port=23456, log_dir=tmp_path / "logs", python="python3")
    assert command[:3] == ["python3", "-m", "megatron_harpe.torchrun"]  # torchrun's main and arguments
    parsed = get_args_parser().parse_args(command[3:])
    assert parsed.nnodes == "4" and parsed.nproc_per_node == "8"
    assert (parsed.rdzv_backend, parsed.rdzv_endpoint, parsed.rdzv_id) == ("c10d", "gpu001:23456", "4242")
    assert parsed.max_restarts == 0
    assert parsed.shutdown_timeout == launch.DEFAULT_SHUTDOWN_TIMEOUT  # ranks get time to save on SIGTERM
    assert parsed.log_dir == str(tmp_path / "logs" / "restart-1" / "node-2")
    assert parsed.training_script == "pretrain_harpe.py"
    assert parsed.training_script_args == program[1:]


def test_torchrun_command_needs_a_program() -> None:
    job = SlurmJob.from_environment(_env(), resolve_hosts=expand_nodelist)
    with pytest.raises(ValueError, match="nothing to launch"):
        launch.torchrun_command(job, [], port=1, log_dir=None)


def test_launch_record_is_complete_json(tmp_path) -> None:
    job = SlurmJob.from_environment(_env(), resolve_hosts=expand_nodelist)
    path = launch.write_launch_record(tmp_path / "run", job, ["python", "x.py"])
    record = json.loads(path.read_text())
    assert path.name == "launch-restart0-node2.json"
    assert record["world_size"] == 32 and record["command"] == ["python", "x.py"]
    assert record["nodes"] == ["gpu001", "gpu002", "gpu003", "gpu004"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_main_print_only(capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the parser expands the list
    code = launch.main(
        ["--print-only", "--rdzv-port", "20001", "--", "pretrain_harpe.py", "--config", "c/demo.yaml"],
        env=_env(SLURM_NODEID="0"),
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "--rdzv-endpoint=gpu001:20001" in out and "--nnodes=4" in out
    assert "runs/demo/slurm-4242/restart-0/node-0" in out
    assert out.strip().endswith("pretrain_harpe.py --config c/demo.yaml")


def test_main_reports_errors_without_a_traceback(capsys) -> None:
    assert launch.main(["--", "x.py"], env={}) == 2
    assert "SLURM_JOB_ID is not set" in capsys.readouterr().err
