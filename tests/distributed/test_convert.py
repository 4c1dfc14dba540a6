"""HF -> megatron -> HF on tiny random Llama models built by transformers (MHA and GQA).

    python -m pytest tests/distributed/test_convert.py -q

Checks: weights come back bitwise identical (also through a TP=2 load and re-save); megatron
and HF logits agree to 1e-5 in fp32 for ABF, PI, YaRN and HARPE with distinct bases; the
HARPE export loads through `trust_remote_code` and its cached greedy decoding gives the
megatron model's tokens; a HARPE export with all bases equal computes exactly stock Llama.
Conversions run in spawned one-process worlds (megatron needs a process group).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron_harpe import parallel
from megatron_harpe.checkpointing.checkpoint import load_checkpoint, save_checkpoint
from megatron_harpe.convert.hf_config import hf_config_for, model_config_from_hf, read_hf_config
from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_harpe.convert.megatron_side import (
    load_megatron_model,
    megatron_greedy,
    megatron_logits,
    read_checkpoint_spec,
)
from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_harpe.convert.verify import hf_greedy, load_hf_model
from megatron_harpe.model import build_model
from megatron_harpe.position.config import PositionConfig

pytestmark = pytest.mark.distributed
ATOL = 1e-5
NEW_TOKENS = 6


def make_hf_model(path: Path, kv_heads: int) -> Path:
    """A random Llama with O(1) logits (wider init, perturbed norms), sharded on disk."""
    torch.manual_seed(kv_heads)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, initializer_range=0.15, rms_norm_eps=1e-5, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(path, max_shard_size="60KB")
    return path


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _assert_same_weights(exported: Path, source: Path) -> None:
    expected, actual = _weights(source), _weights(exported)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------ rank functions


def _convert_and_run(hf_dir: str, out: str, overrides: list[str], tokens: torch.Tensor) -> tuple:
    convert_hf_to_megatron(hf_dir, out, overrides=overrides, tensor_parallel=2)
    model, _ = load_megatron_model(out)
    return megatron_logits(model, tokens), megatron_greedy(model, tokens[:1], NEW_TOKENS)


def _load_at_tp2_and_resave(checkpoint: str, out: str, tokens: torch.Tensor) -> torch.Tensor:
    ctx = parallel.initialize(2, 1)
    spec = read_checkpoint_spec(checkpoint)
    gpt = build_model(spec.model, spec.position, initialize=False)
    load_checkpoint(checkpoint, model=gpt, weights_only=True, load_rng=False)
    local = megatron_logits(gpt.eval(), tokens)  # [b, s, vocab / 2]
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local, group=ctx.tp_group)
    save_checkpoint(out, 5, model=gpt, config=spec.config.to_dict(), train_state={"stage": 0})
    return torch.cat(parts, dim=-1)


def _export(checkpoint: str, out: str) -> None:
    convert_megatron_to_hf(checkpoint, out)


def _convert_export_each(hf_dir: str, root: str, cases: dict[str, list[str]], tokens: torch.Tensor) -> dict:
    logits = {}
    for name, overrides in cases.items():
        convert_hf_to_megatron(hf_dir, f"{root}/{name}/megatron", overrides=overrides)
        convert_megatron_to_hf(f"{root}/{name}/megatron", f"{root}/{name}/hf")
        model, _ = load_megatron_model(f"{root}/{name}/megatron")
        logits[name] = megatron_logits(model, tokens)
    return logits


# ------------------------------------------------------------------------------------- tests


GQA_BASES = [300.0, 30000.0]  # one per k/v group, far apart
GQA_OVERRIDES = ["position.type=harpe", f"position.bases={GQA_BASES}"]


PER_QUERY_HEAD = ["position.type=harpe", "position.gqa_bases=per_query_head", "position.bases=[1e2, 1e3, 1e4, 1e5]"]


def _convert_run_export(hf_dir: str, root: str, tokens: torch.Tensor) -> tuple:
    logits, greedy = _convert_and_run(hf_dir, f"{root}/megatron", GQA_OVERRIDES, tokens)
    convert_megatron_to_hf(f"{root}/megatron", f"{root}/hf")
    # keys rotated per query head (k/v expanded): megatron's KeyExpandingSelfAttention vs our HF model
    per_query_head = _convert_export_each(hf_dir, root, {"per_query_head": PER_QUERY_HEAD}, tokens)
    return logits, greedy, per_query_head["per_query_head"]


def test_gqa_harpe_round_trip(tmp_path: Path) -> None:
    source = make_hf_model(tmp_path / "source", kv_heads=2)
    tokens = _tokens(96)
    ((megatron, megatron_tokens, per_query_head),) = parallel.run_on_ranks(
        _convert_run_export, 1, str(source), str(tmp_path), tokens
    )

    model_config = model_config_from_hf(read_hf_config(source))
    reference = load_hf_model(source, hf_config_for(model_config, PositionConfig(type="harpe", bases=GQA_BASES)))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert expected.abs().max() > 1.0  # logits large enough for the tolerance to mean something
    assert (megatron - expected).abs().max() < ATOL

    _assert_same_weights(tmp_path / "hf", source)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(exported).__name__ == "HarpeLlamaForCausalLM"
    assert exported.config.rope_bases == [300.0, 300.0, 30000.0, 30000.0]
    with torch.no_grad():
        assert (exported(tokens).logits - megatron).abs().max() < ATOL
    assert hf_greedy(exported, tokens[:1], NEW_TOKENS) == megatron_tokens

    expanded = AutoModelForCausalLM.from_pretrained(tmp_path / "per_query_head" / "hf", trust_remote_code=True).eval()
    assert expanded.model.layers[0].self_attn.keys_per_query_head
    with torch.no_grad():
        assert (expanded(tokens).logits - per_query_head).abs().max() < ATOL


@pytest.mark.slow
def test_gqa_harpe_loads_and_resaves_at_tp2(tmp_path: Path) -> None:
    source = make_hf_model(tmp_path / "source", kv_heads=2)
    tokens = _tokens(96)
    tp1 = str(tmp_path / "tp1")
    ((megatron, _),) = parallel.run_on_ranks(_convert_and_run, 1, str(source), tp1, GQA_OVERRIDES, tokens)
    tp2 = parallel.run_on_ranks(_load_at_tp2_and_resave, 2, tp1, str(tmp_path / "tp2"), tokens)[0]
    assert (tp2 - megatron).abs().max() < ATOL
    parallel.run_on_ranks(_export, 1, str(tmp_path / "tp2"), str(tmp_path / "hf"))
    _assert_same_weights(tmp_path / "hf", source)


def test_mha_abf_pi_yarn_and_constant_harpe_exports(tmp_path: Path) -> None:
    source = make_hf_model(tmp_path / "source", kv_heads=4)
    tokens = _tokens(96)
    cases = {
        "abf": ["position.type=abf", "position.base=500000"],
        "pi": ["position.type=pi", "position.scaling_factor=4"],
        "yarn": ["position.type=yarn", "position.scaling_factor=8", "position.original_max_position=16"],
        "harpe_constant": ["position.type=harpe", "position.strategy=constant", "position.base=70000"],
    }
    (logits,) = parallel.run_on_ranks(_convert_export_each, 1, str(source), str(tmp_path), cases, tokens)
    expected_rope = {
        "abf": {"rope_type": "default", "rope_theta": 500000.0},
        "pi": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    }
    for name in cases:
        export = tmp_path / name / "hf"
        _assert_same_weights(export, source)
        hf_model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
        with torch.no_grad():
            hf_logits = hf_model(tokens).logits
        assert (hf_logits - logits[name]).abs().max() < ATOL, name
        if name in expected_rope:
            assert type(hf_model) is LlamaForCausalLM and not (export / "modeling_harpe_llama.py").exists()
            assert expected_rope[name].items() <= hf_model.config.rope_parameters.items()

    harpe = tmp_path / "harpe_constant" / "hf"
    model_config = model_config_from_hf(read_hf_config(source))
    stock = load_hf_model(harpe, hf_config_for(model_config, PositionConfig(type="abf", base=70000.0)))
    assert type(stock) is LlamaForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(harpe, trust_remote_code=True).eval()
    assert exported.config.rope_bases == [70000.0] * 4
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, stock(tokens).logits)
