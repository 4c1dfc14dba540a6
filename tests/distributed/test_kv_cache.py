"""KV-cached generation in the megatron backend equals full recomputation: step logits and
greedy tokens, for MHA, GQA (per-group bases), GQA with per-query-head bases, TP=2 and CP=2."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.config import ModelConfig
from megatron_harpe.model import build_model
from megatron_harpe.position.config import PositionConfig
from tests.distributed.model_parity import make_full_weights, shard

pytestmark = pytest.mark.distributed

VOCAB = 96
PROMPT_LENGTHS = (13, 30)  # 13 is not a multiple of 2*CP: the CP prefill carries padding
NEW_TOKENS = 6


def _model(heads: int, groups: int) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )


CASES = {
    "mha": (_model(4, 4), PositionConfig(type="harpe", bases=[10.0, 100.0, 1000.0, 10000.0])),
    "gqa_per_group": (_model(4, 2), PositionConfig(type="harpe", bases=[10.0, 5000.0])),
    "gqa_per_query_head": (
        _model(4, 2),
        PositionConfig(type="harpe", bases=[10.0, 100.0, 1000.0, 10000.0], gqa_bases="per_query_head"),
    ),
}


def _load(tp, cp, model, position, weights):
    ctx = parallel.initialize(tp, cp)
    gpt = build_model(model, position, initialize=False)
    gpt.load_state_dict({name: shard(name, full, ctx.tp_rank, tp) for name, full in weights.items()}, strict=False)
    return gpt


def _backend(gpt, kv_cache=True, eos_id=None):
    from megatron_harpe.eval.backends.megatron import MegatronBackend

    tokenizer = SimpleNamespace(vocab_size=VOCAB, eos_id=eos_id)
    return MegatronBackend(gpt, None, tokenizer, "tiny", generation=True, kv_cache=kv_cache)


def _cached_vs_full(gpt, prompts):
    from megatron_harpe.eval.backends.kv_cache import IncrementalDecoder

    cached, full = _backend(gpt), _backend(gpt, kv_cache=False)
    results = []
    for prompt in prompts:
        continuation = [(7 * i + 3) % VOCAB for i in range(NEW_TOKENS)]
        with IncrementalDecoder(cached) as decoder:
            step_logits = [decoder.prefill(prompt)] + [decoder.step(token) for token in continuation]
        full_logits = [full.logits(prompt + continuation[:i], last=1)[-1] for i in range(NEW_TOKENS + 1)]
        results.append(
            {
                "cached_logits": torch.stack(step_logits),
                "full_logits": torch.stack(full_logits),
                "cached_tokens": cached.generate(prompt, NEW_TOKENS),
                "full_tokens": full.generate(prompt, NEW_TOKENS),
            }
        )
    return results


def _check(results):
    for result in results:
        torch.testing.assert_close(result["cached_logits"], result["full_logits"], atol=1e-5, rtol=1e-5)
        # the logits really depend on the step (a cache that ignored the new tokens would not)
        assert not torch.allclose(result["full_logits"][1], result["full_logits"][2], atol=1e-3)
        assert result["cached_tokens"] == result["full_tokens"]
        assert len(result["cached_tokens"]) == NEW_TOKENS


def _resolved(case):
    model, position = CASES[case]
    position.resolve(model)
    return model, position


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _single_process_cases(prompts):
    parallel.initialize(1, 1)
    outcome = {}
    for case in CASES:
        model, position = _resolved(case)
        parallel.seed_everything(1)
        gpt = build_model(model, position)
        outcome[case] = _cached_vs_full(gpt, prompts)
        if case == "mha":  # EOS stops the cached generation before the EOS token
            first = _backend(gpt).generate(prompts[0], 3)
            outcome["eos"] = first, _backend(gpt, eos_id=first[1]).generate(prompts[0], 3)
    return outcome


def test_cached_generation_equals_full_recomputation_one_process(prompts):
    outcome = parallel.run_on_ranks(_single_process_cases, 1, prompts)[0]
    for case in CASES:
        _check(outcome[case])
    first, stopped = outcome["eos"]
    assert stopped == (first[:1] if first[0] != first[1] else [])


def _sharded(tp, cp, case, weights, prompts):
    model, position = _resolved(case)
    return _cached_vs_full(_load(tp, cp, model, position, weights), prompts)


@pytest.mark.parametrize("case,tp,cp", [("gqa_per_query_head", 2, 1), ("gqa_per_group", 1, 2)])
def test_cached_generation_equals_full_recomputation_sharded(case, tp, cp, prompts):
    weights = make_full_weights(*_resolved(case), seed=1)
    _check(parallel.run_on_ranks(_sharded, tp * cp, tp, cp, case, weights, prompts)[0])
