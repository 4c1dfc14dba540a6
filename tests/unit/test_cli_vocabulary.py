"""One command-line vocabulary across pretrain_harpe.py and the tools (megatron_harpe/commands/):
help on every flag, intact examples in every --help, the same names and choices for the same
things, console scripts that reach the same `main`, --print-config, and the user errors a
newcomer meets first (a non-empty --output-dir; a sentencepiece --tokenizer beside an HF model).

    python -m pytest tests/unit/test_cli_vocabulary.py -q
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("prepare_data", "convert_checkpoint", "evaluate", "plan_memory", "select_bases", "analyze_heads")
RETIRED_FLAGS = {
    "--text-field",
    "--source-field",
    "--ppl-text-key",
    "--output-prefix",
    "--workdir",
    "--tensor",
    "--context",
}


def _pretrain():
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("pretrain_harpe")
    finally:
        sys.path.remove(str(REPO))


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every tool and every subcommand."""
    found = [("pretrain_harpe", _pretrain().build_parser())]
    found += [(name, importlib.import_module(f"megatron_harpe.commands.{name}").build_parser()) for name in COMMANDS]
    expanded = []
    for name, parser in found:
        expanded.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                expanded += [(f"{name} {sub}", subparser) for sub, subparser in action.choices.items()]
    return expanded


def _flags(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action


def test_every_flag_has_help():
    missing = [
        f"{name}: {'/'.join(action.option_strings)}"
        for name, parser in _parsers()
        for action in _flags(parser)
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing, "flags without help text:\n" + "\n".join(missing)


def test_help_examples_stay_on_their_lines():
    for name, parser in _parsers():
        text = parser.format_help()
        joined = [line for line in text.splitlines() if line.rstrip().endswith("\\")]
        assert not joined, f"{name} --help joins example lines with a trailing backslash: {joined}"
        assert "SPEC" not in text, name
    for name in COMMANDS:
        described = importlib.import_module(f"megatron_harpe.commands.{name}").build_parser().format_help()
        script = "harpe-" + {"convert_checkpoint": "convert"}.get(name, name).replace("_", "-")
        assert f"    {script} " in described, f"{name} --help shows no runnable {script} example"


def test_one_name_and_one_choice_list_per_thing():
    seen: dict[str, set] = {}
    for name, parser in _parsers():
        for action in _flags(parser):
            for flag in action.option_strings:
                assert flag not in RETIRED_FLAGS, f"{name} still has {flag}"
                if flag == "--dtype":
                    assert tuple(action.choices) == ("fp32", "bf16", "fp16"), name
                if flag in ("--tensor-parallel", "--context-parallel", "--no-progress", "--overwrite", "--text-key"):
                    seen.setdefault(flag, set()).add(name.split()[0])
    assert {"evaluate", "analyze_heads", "plan_memory", "convert_checkpoint"} <= seen["--tensor-parallel"]
    assert {"evaluate", "analyze_heads", "plan_memory"} <= seen["--context-parallel"]
    assert {"prepare_data", "convert_checkpoint", "evaluate", "analyze_heads"} <= seen["--no-progress"]
    assert {"prepare_data", "convert_checkpoint", "evaluate", "analyze_heads", "select_bases"} <= seen["--overwrite"]
    assert {"prepare_data", "evaluate", "analyze_heads"} <= seen["--text-key"]


def test_console_scripts_reach_the_tools():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == len(COMMANDS)
    for script, target in scripts.items():
        module_name, function = target.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, function)) and callable(module.main), script
        wrapper = REPO / "tools" / f"{module_name.rsplit('.', 1)[1]}.py"
        assert wrapper.is_file() and module_name in wrapper.read_text(), wrapper


def test_plan_memory_takes_overrides_like_pretrain():
    from megatron_harpe.commands import plan_memory

    args, overrides = plan_memory.parse_args(
        ["--config", "c.yaml", "--gpus", "8", "--tensor-parallel", "2", "--train.lr", "1e-5", "parallel.context=2"]
    )
    assert args.tensor_parallel == 2 and overrides == ["train.lr=1e-5", "parallel.context=2"]
    with pytest.raises(SystemExit):
        plan_memory.parse_args(["--config", "c.yaml", "--gpus", "8", "--train.lr"])  # a value is missing


def test_pretrain_help_lists_config_keys_and_print_config_resolves(tmp_path):
    help_text = _pretrain().build_parser().format_help()
    for expected in (
        "config keys",
        "  model:",
        "    num_layers (int, default 2)",
        "  position:",
        "  train:",
        "    micro_batch_size",
    ):
        assert expected in help_text, expected
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "pretrain_harpe.py"),
            "--config",
            str(REPO / "configs" / "demo_cpu.yaml"),
            "--train.seed",
            "7",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    printed = yaml.safe_load(completed.stdout)
    assert printed["train"]["seed"] == 7 and printed["position"]["bases"], printed["position"]


def test_evaluate_refuses_a_non_empty_output_dir(tmp_path, capsys):
    from megatron_harpe.commands import evaluate
    from megatron_harpe.eval.testing import save_tiny_tokenizer

    save_tiny_tokenizer(str(tmp_path / "tok"))
    output = tmp_path / "eval"
    output.mkdir()
    (output / "results.json").write_text("{}")
    argv = [
        "--model",
        "oracle",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--task",
        "passkey",
        "--lengths",
        "256",
        "--samples",
        "1",
        "--output-dir",
        str(output),
        "--no-progress",
    ]
    assert evaluate.main(argv) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert (output / "results.json").read_text() == "{}"
    assert evaluate.main([*argv, "--overwrite"]) == 0
    assert (output / "results.json").read_text() != "{}"


def test_evaluate_hf_model_with_a_sentencepiece_tokenizer(tmp_path):
    from megatron_harpe.data.tokenizer import train_sentencepiece
    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    model = tmp_path / "hf"
    save_tiny_tokenizer(str(model))
    save_tiny_llama(str(model))
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(300)]
    sentencepiece = train_sentencepiece(iter(texts), str(tmp_path / "sp"), 320)  # ids < the model's 512 rows
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "evaluate.py"),
            "--model",
            str(model),
            "--tokenizer",
            str(sentencepiece),
            "--task",
            "passkey",
            "--lengths",
            "256",
            "--samples",
            "1",
            "--output-dir",
            str(tmp_path / "eval"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr and (tmp_path / "eval" / "results.json").is_file()


def test_conversion_overwrite_replaces_only_a_model(tmp_path):
    from megatron_harpe.convert.hf_files import staging_directory

    output = tmp_path / "export"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty: pass --overwrite"):
        with staging_directory(output):
            pass
    with pytest.raises(ValueError, match="holds neither a model nor a checkpoint"):
        with staging_directory(output, overwrite=True):
            pass
    (output / "config.json").write_text("{}")  # an earlier export: replaced once the new one is complete
    with staging_directory(output, overwrite=True) as staging:
        (staging / "config.json").write_text('{"new": true}')
    assert sorted(path.name for path in output.iterdir()) == ["config.json"]
    assert (output / "config.json").read_text() == '{"new": true}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]  # nothing left beside it
