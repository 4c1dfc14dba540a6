"""Activation recomputation through megatron-core's own checkpointing (`train.recompute*`):
the same loss and gradients as without it, and exactly the chosen layers / modules run twice.

    python -m pytest tests/distributed/test_recompute.py -q
"""

from __future__ import annotations

import collections

import pytest
import torch

from megatron_harpe import parallel

pytestmark = pytest.mark.distributed

LAYERS = 4
SETTINGS = {  # name: (train.recompute* keys, {layer: forward calls of what is counted})
    "none": ({}, None),
    "full uniform 1": ({"recompute": "full"}, "all layers"),
    "full uniform 2": ({"recompute": "full", "recompute_num_layers": 2}, "all layers"),
    "full block 1": ({"recompute": "full", "recompute_method": "block", "recompute_num_layers": 1}, "layer 0"),
    "full block 3": ({"recompute": "full", "recompute_method": "block", "recompute_num_layers": 3}, "layers 0-2"),
    "selective core_attn": ({"recompute": "selective"}, "core_attention"),
    "selective mlp": ({"recompute": "selective", "recompute_modules": ["mlp"]}, "linear_fc1"),
    "selective both": (
        {"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]},
        "core_attention+linear_fc1",
    ),
}
COUNTED = ("linear_qkv", "core_attention", "input_layernorm", "pre_mlp_layernorm", "linear_fc1")


def _step(settings: dict, gqa_bases: str, tp: int = 1, cp: int = 1, documents: bool = False) -> dict:
    """One forward and backward; `documents`: packed documents (per-token rotary table and
    document ids, through the trainer's `forward_micro_batch`), counting the rotations that fell
    back to megatron's own apply (a table whose tags the recompute lost)."""
    from megatron_harpe.config import ModelConfig, TrainConfig
    from megatron_harpe.documents import document_ids, document_positions
    from megatron_harpe.model import build_model, forward_micro_batch
    from megatron_harpe.position import rotary
    from megatron_harpe.position.config import PositionConfig

    ctx = parallel.initialize(tp, cp)
    model_cfg = ModelConfig(num_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=128)  # fmt: skip
    bases = [100.0, 1e4] if gqa_bases == "per_group" else [100.0, 1e3, 1e4, 1e5]
    position = PositionConfig(type="harpe", bases=bases, gqa_bases=gqa_bases).resolve(model_cfg)
    parallel.seed_everything(0)
    model = build_model(model_cfg, position, recompute=TrainConfig(**settings))
    calls: collections.Counter = collections.Counter()
    for index, layer in enumerate(model.decoder.layers):
        modules = {"linear_qkv": layer.self_attention.linear_qkv, "core_attention": layer.self_attention.core_attention,
                   "input_layernorm": layer.input_layernorm, "pre_mlp_layernorm": layer.pre_mlp_layernorm,
                   "linear_fc1": layer.mlp.linear_fc1}  # fmt: skip
        for name, module in modules.items():
            module.register_forward_hook(lambda *_, key=(index, name): calls.update([key]))
    fallbacks = collections.Counter()
    megatron_apply = rotary._megatron_apply_rotary_pos_emb

    def counted_megatron_apply(*args, **kwargs):
        fallbacks.update(["megatron's apply"])
        return megatron_apply(*args, **kwargs)

    rotary._megatron_apply_rotary_pos_emb = counted_megatron_apply
    seq = 16
    tokens = torch.randint(1, 128, (2, seq), generator=torch.Generator().manual_seed(1))
    local = parallel.context_parallel_indices(seq, ctx.cp_rank, cp)
    if documents:  # EOD (0) ends documents of 3, 6 and 7 tokens, and of 1, 10 and 5
        tokens[0, [2, 8]] = tokens[1, [0, 10]] = 0
        ids = document_ids(tokens, 0)
        batch = {"tokens": tokens[:, local], "position_ids": document_positions(ids)[:, local],
                 "labels": tokens[:, local], "document_ids": ids}  # fmt: skip
        losses = forward_micro_batch(model, batch, per_token_positions=True)
    else:
        losses = model(tokens[:, local], local[None].expand(2, -1), None, labels=tokens[:, local])
    loss = losses.sum()
    loss.backward()
    rotary._megatron_apply_rotary_pos_emb = megatron_apply
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "calls": dict(calls), "fallbacks": sum(fallbacks.values())}


def _run_all(gqa_bases: str, documents: bool = False) -> dict:
    return {name: _step(settings, gqa_bases, documents=documents) for name, (settings, _) in SETTINGS.items()}


def _expected_calls(counted: str | None) -> dict:
    expected = {(layer, name): 1 for layer in range(LAYERS) for name in COUNTED}
    rerun = {"all layers": range(LAYERS), "layer 0": range(1), "layers 0-2": range(3)}
    if counted in rerun:
        for layer in rerun[counted]:
            for name in COUNTED:
                expected[layer, name] = 2
    elif counted is not None:
        for layer in range(LAYERS):
            for name in counted.split("+"):
                expected[layer, name] = 2
    return expected


@pytest.mark.parametrize("gqa_bases, documents", [("per_group", False), ("per_query_head", False),
                                                 ("per_group", True), ("per_query_head", True)])  # fmt: skip
def test_each_recompute_setting_gives_the_same_gradients_and_reruns_what_it_names(gqa_bases, documents):
    """With packed documents too: the recomputed layers rotate with the micro-batch's per-token
    table (its cached cos/sin, never megatron's own apply) and attend within the documents."""
    results = parallel.run_on_ranks(_run_all, 1, gqa_bases, documents)[0]  # megatron state is process-global
    reference = results["none"]
    for name, (_, counted) in SETTINGS.items():
        result = results[name]
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=0, atol=0, msg=name)
        for param, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][param], grad, rtol=1e-6, atol=1e-7, msg=f"{name}: {param}")
        assert result["calls"] == _expected_calls(counted), name
        assert result["fallbacks"] == 0, name


def _context_parallel(settings: dict, documents: bool = False) -> dict:
    result = _step(settings, "per_group", cp=2, documents=documents)
    return {"loss": result["loss"], "grads": result["grads"], "fallbacks": result["fallbacks"]}


@pytest.mark.parametrize("documents", [False, True])
def test_block_recompute_under_context_parallelism(documents):
    """The recomputed layers' attention all-gathers keys/values over CP again in backward (with
    packed documents: their runs across the CP chunks again)."""
    plain = parallel.run_on_ranks(_context_parallel, 2, {}, documents)
    recomputed = parallel.run_on_ranks(_context_parallel, 2, {"recompute": "full", "recompute_method": "block",
                                                              "recompute_num_layers": 2}, documents)  # fmt: skip
    for rank in range(2):
        assert recomputed[rank]["fallbacks"] == 0
        torch.testing.assert_close(recomputed[rank]["loss"], plain[rank]["loss"], rtol=0, atol=0)
        for name, grad in plain[rank]["grads"].items():
            torch.testing.assert_close(recomputed[rank]["grads"][name], grad, rtol=1e-6, atol=1e-7, msg=name)
