"""Activation recomputation: same gradients, and the recomputed parts really run twice."""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel

pytestmark = pytest.mark.distributed


def _gradients_and_attention_calls(mode: str):
    from megatron_harpe.config import ModelConfig
    from megatron_harpe.model import build_model
    from megatron_harpe.position.config import PositionConfig

    parallel.initialize(1, 1)
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=100)
    position = PositionConfig(type="harpe", bases=[100.0, 1e4]).resolve(model_cfg)
    parallel.seed_everything(0)
    model = build_model(model_cfg, position, recompute=mode)
    calls = []
    for layer in model.decoder.layers:
        layer.self_attention.linear_qkv.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens, torch.arange(16)[None], None, labels=tokens).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), len(calls)


def test_recompute_modes_give_identical_gradients():
    reference, calls = parallel.run_on_ranks(_gradients_and_attention_calls, 1, "none")[0]
    assert calls == 2
    full, full_calls = parallel.run_on_ranks(_gradients_and_attention_calls, 1, "full")[0]
    torch.testing.assert_close(full, reference)
    assert full_calls == 4  # every layer ran again in backward
    selective, selective_calls = parallel.run_on_ranks(_gradients_and_attention_calls, 1, "selective")[0]
    torch.testing.assert_close(selective, reference)
    assert selective_calls == 2  # only core attention is recomputed
