"""Fault: `checkpoint.pretrained` holding another model than the config builds (issue 27 cases 2, 10).

    python -m pytest tests/faults/test_pretrained_shapes.py -q

Before: a vocab-8000 checkpoint loaded into a vocab-4096 model kept the first 4096 embedding and
output rows without a word (a larger model got zero rows); another hidden size ended in about
270 lines of CheckpointException tracebacks. Now the shapes are compared before any tensor is
read and a mismatch is one line naming both values and, for the vocabulary, the resize tool,
which adds rows as megatron initialises them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from cli_support import error_lines, run
from data_support import tiny_training_config

from megatron_harpe import parallel

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=4096,
    max_position_embeddings=64,
)


def _save_pretrained(models: dict[str, dict]) -> None:
    from megatron_harpe.checkpointing.checkpoint import save_checkpoint
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.model import build_model

    parallel.initialize(1, 1)
    for save_dir, model in models.items():
        config = from_dict(Config, {"model": model, "position": {"type": "harpe", "bases": [300.0, 30000.0]}})
        config.position.resolve(config.model)
        parallel.seed_everything(7)
        gpt = build_model(config.model, config.position)
        save_checkpoint(save_dir, 0, model=gpt, config=config.to_dict(), train_state={"weights_only": True})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the tiny model: as configured, with vocabulary 8000, with hidden size 96."""
    root = tmp_path_factory.mktemp("pretrained")
    changes = {"same": {}, "vocab8000": {"vocab_size": 8000}, "hidden96": {"hidden_size": 96}}
    parallel.run_on_ranks(
        _save_pretrained, 1, {str(root / name): {**TINY, **change} for name, change in changes.items()}
    )
    return {name: root / name for name in changes}


def _dry_run(tmp_path: Path, demo_data, pretrained: Path):
    config = tiny_training_config(
        tmp_path / "run.yaml", demo_data.prefix, str(demo_data.tokenizer), checkpoint={"pretrained": str(pretrained)}
    )
    return run("pretrain_harpe.py", "--config", str(config), "--dry-run")


def test_another_vocabulary_is_refused_naming_both_sizes_and_the_resize_tool(demo_data, pretrained, tmp_path) -> None:
    completed = _dry_run(tmp_path, demo_data, pretrained["vocab8000"])
    assert completed.returncode == 2, completed.stdout + completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "model.vocab_size: checkpoint 8000, config 4096" in line
    assert "tools/convert_checkpoint.py resize-vocab" in line and "--vocab-size 4096" in line
    assert "Traceback" not in completed.stderr
    assert _dry_run(tmp_path, demo_data, pretrained["same"]).returncode == 0


def test_another_hidden_size_is_one_line_not_a_page_of_tracebacks(demo_data, pretrained, tmp_path) -> None:
    completed = _dry_run(tmp_path, demo_data, pretrained["hidden96"])
    assert completed.returncode == 2
    assert completed.stderr.count("\n") <= 3, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "model.hidden_size: checkpoint 96, config 64" in line and "set these model keys" in line


def _train(tree: dict) -> str:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training.loop import train

    try:
        history = train(from_dict(Config, tree))
    except ValueError as error:
        return str(error)
    return f"trained {len(history)} steps"


@pytest.mark.distributed
def test_a_config_that_lies_about_the_shapes_still_fails_in_one_line(demo_data, pretrained, tmp_path) -> None:
    """The tensors say hidden 96, the saved config 64: megatron's CheckpointException (a
    BaseException) becomes one ValueError."""
    lying = tmp_path / "lying"
    import shutil

    shutil.copytree(pretrained["hidden96"], lying)
    config_file = lying / "iter_0000000" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    saved["model"]["hidden_size"] = 64
    config_file.write_text(yaml.safe_dump(saved))
    tree = yaml.safe_load(
        tiny_training_config(
            tmp_path / "run.yaml", demo_data.prefix, str(demo_data.tokenizer), checkpoint={"pretrained": str(lying)}
        ).read_text()
    )
    (message,) = parallel.run_on_ranks(_train, 1, tree)
    assert message.startswith(f"checkpoint.pretrained={lying} could not be loaded into the model built here: ")
    assert "\n" not in message


def _rows(save_dir: str) -> dict[str, torch.Tensor]:
    from megatron_harpe.convert.megatron_side import load_megatron_model

    model, _ = load_megatron_model(save_dir)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _resize(source: Path, output: Path, size: int) -> None:
    completed = run(
        "tools/convert_checkpoint.py",
        "resize-vocab",
        "--input",
        str(source),
        "--output",
        str(output),
        "--vocab-size",
        str(size),
    )
    assert completed.returncode == 0, completed.stderr


def _rows_of(*save_dirs: str) -> list[dict[str, torch.Tensor]]:
    return [_rows(save_dir) for save_dir in save_dirs]


@pytest.mark.distributed
def test_resize_vocab_keeps_rows_and_initialises_new_ones_as_megatron_does(pretrained, tmp_path) -> None:
    grown = tmp_path / "grown"
    _resize(pretrained["same"], grown, 4160)
    ((before, after),) = parallel.run_on_ranks(_rows_of, 1, str(pretrained["same"]), str(grown))
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(after[name][:4096], before[name])  # bit for bit
        added = after[name][4096:]
        assert added.shape == (64, 64) and bool((added != 0).all())
        assert added.std().item() == pytest.approx(0.02, rel=0.15)  # model.init_method_std, as megatron draws them
    assert all(
        torch.equal(after[name], before[name])
        for name in before
        if "word_embeddings" not in name and "output_layer" not in name
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_training_starts_from_a_checkpoint_resized_to_the_config(demo_data, pretrained, tmp_path) -> None:
    cut = tmp_path / "cut"
    _resize(pretrained["vocab8000"], cut, 4096)
    assert _dry_run(tmp_path, demo_data, cut).returncode == 0  # the resized checkpoint is what the config builds
    tree = yaml.safe_load(
        tiny_training_config(
            tmp_path / "run.yaml", demo_data.prefix, str(demo_data.tokenizer), checkpoint={"pretrained": str(cut)}
        ).read_text()
    )
    assert parallel.run_on_ranks(_train, 1, tree) == ["trained 2 steps"]
