"""Choosing the Transformer Engine attention backend without Transformer Engine fails at config
time, with a message that names the problem and the way out.

    python -m pytest tests/unit/test_te_backend.py -q

This machine has no TE (it needs CUDA); "installed but unusable" (TE present, CUDA driver
missing) and "installed" are simulated with stand-in `transformer_engine` packages on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_harpe import te_backend
from megatron_harpe.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"
LLAMA = REPO / "configs" / "llama2_7b_128k_harpe.yaml"


def _stand_in_transformer_engine(directory: Path, body: str, monkeypatch) -> None:
    package = directory / "transformer_engine"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    monkeypatch.syspath_prepend(str(directory))


@pytest.fixture()
def without_transformer_engine(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError


@pytest.mark.parametrize("config", [DEMO, LLAMA])
def test_te_without_transformer_engine_fails_at_validation(config: Path, without_transformer_engine) -> None:
    cfg = load_config(config, ["model.attention_backend=te"])
    with pytest.raises(ValueError) as error:
        cfg.validate(world_size=32 if config == LLAMA else 2)
    message = str(error.value)
    assert "model.attention_backend=te" in message
    assert "Transformer Engine" in message
    assert "attention_backend: sdpa" in message, "the message names the alternative"
    assert "Dockerfile" in message, "the message says where TE is available"


@pytest.mark.parametrize("config", [DEMO, LLAMA])
def test_sdpa_backend_validates_without_transformer_engine(config: Path, without_transformer_engine) -> None:
    te_only = ["parallel.sequence_parallel=false", "parallel.cp_comm_type=auto"] if config == LLAMA else []
    cfg = load_config(config, ["model.attention_backend=sdpa", *te_only])
    cfg.validate(world_size=32 if config == LLAMA else 2)  # the same config passes with sdpa


def test_an_installed_but_unusable_transformer_engine_counts_as_missing(tmp_path: Path, monkeypatch) -> None:
    _stand_in_transformer_engine(
        tmp_path, 'raise OSError("libcuda.so.1: cannot open shared object file")\n', monkeypatch
    )
    assert not te_backend.transformer_engine_available()
    with pytest.raises(ValueError, match="Transformer Engine"):
        load_config(DEMO, ["model.attention_backend=te"]).validate(world_size=2)


def test_te_validates_when_transformer_engine_imports(tmp_path: Path, monkeypatch) -> None:
    _stand_in_transformer_engine(tmp_path, "", monkeypatch)
    assert te_backend.transformer_engine_available()
    cfg = load_config(LLAMA, ["model.attention_backend=te"]).validate(world_size=32)
    assert cfg.model.attention_backend == "te"


def test_dry_run_plans_te_without_transformer_engine(capsys, without_transformer_engine) -> None:
    import pretrain_harpe

    assert pretrain_harpe.main(["--config", str(LLAMA), "--dry-run", "--world-size", "32"]) == 0
    assert "Transformer Engine is not installed here" in capsys.readouterr().out


def test_entry_point_reports_the_error_before_starting(capsys, without_transformer_engine, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    import pretrain_harpe

    code = pretrain_harpe.main(["--config", str(DEMO), "--model.attention_backend", "te"])  # a training launch
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and "Transformer Engine" in err
    assert "Traceback" not in err


def test_unknown_backend_is_rejected(without_transformer_engine) -> None:
    with pytest.raises(ValueError, match="choose 'sdpa' or 'te'"):
        load_config(DEMO, ["model.attention_backend=flash"]).validate(world_size=2)


def test_te_refuses_keys_expanded_per_query_head(tmp_path: Path, monkeypatch) -> None:
    """TE's attention is built for num_query_groups k/v heads; keys expanded to one per query
    head (gqa_bases: per_query_head) would not fit it, so the config says so up front."""
    _stand_in_transformer_engine(tmp_path, "", monkeypatch)
    gqa = ["model.num_query_groups=8", "position.strategy=uniform", "position.base_min=1e6", "position.base_max=5e6"]
    with pytest.raises(ValueError, match="per_query_head with model.attention_backend=te.*gqa_bases: per_group"):
        load_config(LLAMA, [*gqa, "model.attention_backend=te", "position.gqa_bases=per_query_head"]).validate(
            world_size=32
        )
    load_config(LLAMA, [*gqa, "model.attention_backend=te", "position.gqa_bases=per_group"]).validate(world_size=32)
    sdpa = ["model.attention_backend=sdpa", "parallel.sequence_parallel=false", "parallel.cp_comm_type=auto"]
    load_config(LLAMA, [*gqa, *sdpa, "position.gqa_bases=per_query_head"]).validate(world_size=32)
