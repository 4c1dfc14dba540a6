"""docs/config-reference.md is generated from the config dataclasses and cannot go stale: it must
equal a fresh rendering, and every config key must carry documentation."""

from __future__ import annotations

from pathlib import Path

from megatron_harpe.config import Config
from megatron_harpe.config_reference import REFERENCE_PATH, REGENERATE_COMMAND, config_keys, render_markdown

REPO = Path(__file__).resolve().parents[2]


def test_committed_reference_equals_a_fresh_rendering():
    committed = (REPO / REFERENCE_PATH).read_text(encoding="utf-8")
    assert committed == render_markdown(), f"{REFERENCE_PATH} is stale: regenerate it with `{REGENERATE_COMMAND}`"


def test_every_config_key_is_documented():
    undocumented = [key.key for key in config_keys() if not key.doc]
    assert not undocumented, (
        f"config fields without documentation: {undocumented}; write a string literal under each field "
        f"(an attribute docstring), then run `{REGENERATE_COMMAND}`"
    )


def test_reference_lists_every_key_the_config_accepts():
    reference = render_markdown()
    flat = Config().to_dict()
    for section, values in flat.items():
        if isinstance(values, dict):
            for key in values:
                assert f"`{section}.{key}`" in reference, f"{section}.{key} missing from the reference"
    assert "`stages[].tokens`" in reference and "`stages[].position`" in reference


def test_field_docs_reads_attribute_docstrings_and_nothing_else():
    from megatron_harpe.config import TrainConfig
    from megatron_harpe.config_reference import field_docs

    docs = field_docs(TrainConfig)
    assert docs["lr_schedule"] == "constant | cosine"
    assert "resolved_recompute_num_layers" not in docs  # methods are not fields


def test_the_script_writes_and_checks_the_reference(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_config_reference_tool", REPO / "tools" / "config_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    target = tmp_path / "reference.md"
    assert tool.main(["--check", "--output", str(target)]) == 1  # missing
    assert tool.main(["--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render_markdown()
    assert tool.main(["--check", "--output", str(target)]) == 0
    target.write_text("old\n", encoding="utf-8")
    assert tool.main(["--check", "--output", str(target)]) == 1
    assert REGENERATE_COMMAND in capsys.readouterr().err
