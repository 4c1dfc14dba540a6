"""Faults: where a config's paths point, blend weights, and where megatron's cache goes
(issue 27 cases 10, 13 and 14).

    python -m pytest tests/faults/test_config_paths.py -q        (add -m slow for a read-only mount)

Before: a relative `checkpoint.save` launched from another directory silently started a new run
at step 0 after the previous run had printed "the next launch resumes"; blend weights
`[.nan, 1]` reached a bare AssertionError in megatron; a dataset in a read-only directory failed
on megatron's cache write (EROFS) and no config key moved the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from cli_support import REPO, environment, error_lines, run, unshare_works
from data_support import copy_dataset, tiny_training_config

from megatron_harpe import parallel
from megatron_harpe.config import load_config


def test_relative_paths_in_a_config_follow_its_directory_and_overrides_the_current_one(tmp_path, monkeypatch) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "configs" / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {"data": {"demo_workdir": "../runs/data", "tokenizer": "~/tok.model"}, "checkpoint": {"save": "ckpt"}}
        )
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(config, ["logging.tensorboard_dir=tb"])
    assert cfg.checkpoint.save == str(tmp_path / "configs" / "ckpt")
    assert cfg.data.demo_workdir == str(tmp_path / "runs" / "data")
    assert cfg.data.tokenizer == os.path.expanduser("~/tok.model")
    assert cfg.logging.tensorboard_dir == str(tmp_path / "elsewhere" / "tb")  # typed here, relative to here


def test_a_relative_path_whose_meaning_changed_is_refused_naming_both_places(tmp_path, monkeypatch) -> None:
    """A config written for paths relative to the current directory, whose checkpoints live there."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "runs" / "x" / "iter_0000004").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "latest_checkpointed_iteration.txt").write_text("4\n")
    config = tmp_path / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump({"checkpoint": {"save": "runs/x"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"checkpoint.save: 'runs/x' in {config} means {tmp_path}/configs/runs/x .* "
        rf"but {tmp_path}/runs/x .* holds checkpoints of an earlier run",
    ):
        load_config(config)
    assert load_config(config, ["checkpoint.save=runs/x"]).checkpoint.save == str(tmp_path / "runs" / "x")


def test_nan_blend_weights_are_one_line(demo_data, tmp_path) -> None:
    config = tiny_training_config(tmp_path / "run.yaml", demo_data.prefix, str(demo_data.tokenizer))
    tree = yaml.safe_load(config.read_text())
    tree["data"]["prefixes"] = [demo_data.prefix, demo_data.prefix]
    config.write_text(yaml.safe_dump(tree).replace("prefixes:", "weights: [.nan, 1.0]\n  prefixes:", 1))
    completed = run("pretrain_harpe.py", "--config", str(config), "--dry-run")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "data.weights=[nan, 1.0] must be finite, non-negative numbers with a positive sum" in line


def _train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "pretrain_harpe.py"), "--config", str(config), *overrides]


def test_a_relative_checkpoint_save_resumes_from_another_directory(demo_data, tmp_path) -> None:
    (tmp_path / "configs").mkdir()
    config = tiny_training_config(
        tmp_path / "configs" / "run.yaml",
        demo_data.prefix,
        str(demo_data.tokenizer),
        checkpoint={"save": "ckpt"},
        train={"train_tokens": 4 * 2 * 64},
    )
    for directory, steps in (("first", "1"), ("second", "0")):
        (tmp_path / directory).mkdir()
        completed = subprocess.run(
            _train_command(config, "--train.exit_after_steps", steps),
            cwd=tmp_path / directory,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stderr
    assert f"resumed from {tmp_path / 'configs' / 'ckpt' / 'iter_0000001'} at step 1" in completed.stdout
    assert f"save: {tmp_path / 'configs' / 'ckpt'}" in completed.stdout  # the resolved path, printed and recorded
    assert not (tmp_path / "second" / "ckpt").exists()


def test_the_index_cache_moves_out_of_an_unwritable_data_directory_said_aloud(demo_data, tmp_path, monkeypatch) -> None:
    from megatron_harpe.data import index_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    data_dir = Path(demo_data.prefix).parent
    real = index_cache.writable
    monkeypatch.setattr(index_cache, "writable", lambda directory: directory.parent != data_dir and real(directory))
    said = []
    chosen = index_cache.cache_directory(None, [demo_data.prefix], say=said.append)
    assert chosen == tmp_path / "user" / "megatron_harpe" / "index_cache"
    (line,) = said
    assert line.startswith(f"note: {data_dir} is not writable: megatron's sample-index cache goes to {chosen}")
    assert index_cache.cache_directory(str(tmp_path / "mine"), [demo_data.prefix]) == tmp_path / "mine"


def _train(tree: dict) -> str:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training.loop import train

    try:
        train(from_dict(Config, tree))
    except (ValueError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    return "trained"


@pytest.mark.distributed
def test_rank_zero_failing_to_cache_stops_every_rank_at_once(demo_data, tmp_path) -> None:
    """An unwritable cache (data.cache_dir under a file): rank 0 fails while building the indices
    alone, and rank 1 hears it at once instead of waiting in megatron's barrier for the timeout."""
    (tmp_path / "a_file").write_text("")
    tree = yaml.safe_load(
        tiny_training_config(
            tmp_path / "run.yaml",
            demo_data.prefix,
            str(demo_data.tokenizer),
            data={"cache_dir": str(tmp_path / "a_file" / "cache")},
            parallel={"timeout_minutes": 10},
        ).read_text()
    )
    first, second = parallel.run_on_ranks(_train, 2, tree, timeout=300)
    assert first.startswith("NotADirectoryError") and "a_file" in first
    assert second == "ValueError: the training data could not be prepared (rank 0 says why)"


@pytest.mark.slow
@pytest.mark.skipif(not unshare_works(), reason="needs user+mount namespaces for a read-only mount")
def test_training_on_a_dataset_in_a_read_only_directory(demo_data, tmp_path) -> None:
    """The real case: the data on a read-only filesystem, two ranks under torchrun."""
    from megatron_harpe.parallel import free_port

    source = tmp_path / "source"
    prefix = copy_dataset(demo_data.prefix, source, "demo_text_document")
    shutil.copy2(demo_data.tokenizer, source / "tokenizer.model")
    mount = tmp_path / "ro"
    mount.mkdir()
    config = tiny_training_config(
        tmp_path / "run.yaml",
        str(mount / "demo_text_document"),
        str(mount / "tokenizer.model"),
        parallel={"timeout_minutes": 2},
    )
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size=64m tmpfs {mount} && cp {prefix}.* {source / "tokenizer.model"} {mount}/ &&
        mount -o remount,ro {mount} &&
        {sys.executable} -m torch.distributed.run --nproc-per-node 2 --master-port {free_port()} pretrain_harpe.py \\
            --config {config}; echo "exit=$?"
    """)
    completed = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO,
        env=environment(XDG_CACHE_HOME=str(tmp_path / "user")),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "exit=0" in completed.stdout, completed.stdout[-2000:] + completed.stderr[-3000:]
    assert (
        f"note: {mount} is not writable: megatron's sample-index cache goes to {tmp_path / 'user'}" in completed.stderr
    )
    assert "step 2/2" in completed.stdout and "Traceback" not in completed.stderr
    assert list((tmp_path / "user" / "megatron_harpe" / "index_cache").glob("*-description.txt"))
