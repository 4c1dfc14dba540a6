"""Self-Extend (eval/self_extend/core.py and its Hugging Face adapter) against a per-token reference
written here from the formulas of Self-Extend (Jin et al. 2024, arXiv 2401.01325), and against the plain model.

Run: pytest tests/unit/test_self_extend.py
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from megatron_harpe.convert.hf_harpe import HarpeLlamaConfig, HarpeLlamaForCausalLM
from megatron_harpe.eval.self_extend.core import SelfExtendSettings, self_extend_attention
from megatron_harpe.eval.self_extend.hf import install_self_extend

# ------------------------------------------------------------------ the reference, from the formulas


def rope_vector(x: torch.Tensor, base: float, position: int, divisor: float = 1.0) -> torch.Tensor:
    """Rotate one [d] vector: channel pair (t, t + d/2) by position * base ** (-2t/d) / divisor."""
    half = x.numel() // 2
    out = torch.empty_like(x)
    for t in range(half):
        angle = torch.tensor(position * base ** (-2.0 * t / x.numel()) / divisor, dtype=torch.float64)
        out[t] = x[t] * angle.cos() - x[t + half] * angle.sin()
        out[t + half] = x[t + half] * angle.cos() + x[t] * angle.sin()
    return out


def reference_self_extend(query, key, value, query_bases, key_bases, window, group, scale, divisor=1.0):
    """query [hq, s, d], key/value [hk, s, d] unrotated at positions 0..s-1 -> [hq, s, d] float64.
    Query head h reads k/v head h // (hq / hk); `divisor` is PI's position factor."""
    query, key, value = query.double(), key.double(), value.double()
    query_heads, length, _ = query.shape
    per_group = query_heads // key.size(0)
    out = torch.zeros_like(query)
    for head in range(query_heads):
        kv = head // per_group
        for i in range(length):
            scores = []
            for j in range(i + 1):
                if i - j < window:
                    query_position, key_position = i, j
                else:
                    query_position, key_position = i // group + window - window // group, j // group
                q = rope_vector(query[head, i], query_bases[head], query_position, divisor)
                k = rope_vector(key[kv, j], key_bases[kv], key_position, divisor)
                scores.append(float(q @ k) * scale)
            weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
            out[head, i] = weights @ value[kv, : i + 1]
    return out


def inverse_frequencies(bases: list[float], head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return torch.stack([base ** (-exponents) for base in bases])


# ------------------------------------------------------------------ settings


def test_settings_parse_and_record():
    settings = SelfExtendSettings.parse("window=1024,group=32")
    assert settings == SelfExtendSettings(window=1024, group=32)
    assert settings.as_dict() == {"window": 1024, "group": 32}
    assert SelfExtendSettings.parse(" group = 4 , window=16 ") == SelfExtendSettings(16, 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("window=1024", "needs group"),
        ("window=0,group=32", "positive integer"),
        ("window=1024,group=-2", "positive integer"),
        ("window=1k,group=32", "positive integer"),
        ("window=1024,group=32,scale=2", "unknown self-extend setting 'scale'"),
        ("window=1024,window=512,group=32", "given twice"),
        ("1024,32", "not key=value"),
        ("", "not key=value"),
    ],
)
def test_settings_reject_bad_values(text, message):
    with pytest.raises(ValueError, match=message):
        SelfExtendSettings.parse(text)


def test_grouped_positions_continue_where_the_window_ends():
    settings = SelfExtendSettings(window=8, group=4)
    i, j = torch.tensor(20), torch.tensor(12)  # distance exactly W: grouped distance is W too
    assert int(settings.grouped_query_positions(i) - settings.grouped_key_positions(j)) == 8


# ------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("window, group, rows", [(5, 3, 7), (4, 4, None), (1, 2, 3), (64, 8, 5)])
def test_kernel_matches_per_token_reference_with_per_head_bases_and_gqa(window, group, rows, monkeypatch):
    if rows is not None:  # also rotate positions in several chunks
        monkeypatch.setattr("megatron_harpe.eval.self_extend.core.ROTATION_CHUNK", 5)
    generator = torch.Generator().manual_seed(window * 10 + group)
    heads, kv_heads, length, dim = 4, 2, 21, 8
    query, key, value = (torch.randn(1, h, length, dim, generator=generator) * 2 for h in (heads, kv_heads, kv_heads))
    query_bases, key_bases = [10.0, 300.0, 1000.0, 5e4], [10.0, 1000.0]
    settings = SelfExtendSettings(window, group)
    out = self_extend_attention(
        query, key, value, query_inv_freq=inverse_frequencies(query_bases, dim),
        key_inv_freq=inverse_frequencies(key_bases, dim), query_positions=torch.arange(length),
        settings=settings, softmax_scale=dim**-0.5, rows_per_block=rows,
    )  # fmt: skip
    expected = reference_self_extend(query[0], key[0], value[0], query_bases, key_bases, window, group, dim**-0.5)
    torch.testing.assert_close(out[0].double(), expected, atol=2e-5, rtol=1e-4)


def test_kernel_takes_queries_at_scattered_positions_like_context_parallel_chunks():
    generator = torch.Generator().manual_seed(5)
    length, dim = 24, 8
    query, key, value = (torch.randn(1, 2, length, dim, generator=generator) for _ in range(3))
    rows = torch.cat([torch.arange(3, 6), torch.arange(18, 24)])  # two chunks, as a CP rank holds
    settings = SelfExtendSettings(window=4, group=3)
    frequencies = inverse_frequencies([100.0, 1e4], dim)
    full = self_extend_attention(
        query,
        key,
        value,
        query_inv_freq=frequencies,
        key_inv_freq=frequencies,
        query_positions=torch.arange(length),
        settings=settings,
        softmax_scale=0.3,
    )
    part = self_extend_attention(
        query[:, :, rows],
        key,
        value,
        query_inv_freq=frequencies,
        key_inv_freq=frequencies,
        query_positions=rows,
        settings=settings,
        softmax_scale=0.3,
        rows_per_block=4,
    )
    torch.testing.assert_close(part, full[:, :, rows], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ Hugging Face models

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.3,
    max_position_embeddings=64,
)
MODELS = {
    "llama_abf": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "llama_pi": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 4.0})),
    "llama_yarn": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    "harpe_per_group": lambda: HarpeLlamaForCausalLM(HarpeLlamaConfig(
        **COMMON, rope_bases=[10.0, 10.0, 3000.0, 3000.0])),
    "harpe_per_query_head": lambda: HarpeLlamaForCausalLM(HarpeLlamaConfig(
        **COMMON, rope_bases=[10.0, 200.0, 3000.0, 9e4])),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None)),
}  # fmt: skip
IDS = torch.randint(0, 64, (1, 18), generator=torch.Generator().manual_seed(11))


def make_model(name: str):
    torch.manual_seed(len(name))
    return MODELS[name]().eval()


@torch.no_grad()
def logits(model, ids=IDS) -> torch.Tensor:
    return model(ids, use_cache=False).logits[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_window_covering_the_sequence_equals_the_plain_model(name):
    model = make_model(name)
    plain = logits(model)
    install_self_extend(model, SelfExtendSettings(window=IDS.size(1), group=4))
    torch.testing.assert_close(logits(model), plain, atol=2e-5, rtol=1e-5)
    install_self_extend(model, SelfExtendSettings(window=3, group=4))
    assert (logits(model) - plain).abs().max() > 1e-3  # a short window really changes the model


def reference_forward(settings, query_bases, key_bases, divisor):
    """An attention forward computing Self-Extend with `reference_self_extend` (batch 1, no cache)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        length = hidden_states.size(1)
        # the plain matmuls: the HARPE export's q/k projections rotate inside their forward
        q, k, v = (torch.nn.functional.linear(hidden_states, p.weight, p.bias)[0].view(length, -1, self.head_dim)
                   .transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        if len(key_bases) == q.size(0):  # keys rotated per query head
            k, v = k.repeat_interleave(q.size(0) // k.size(0), 0), v.repeat_interleave(q.size(0) // v.size(0), 0)
        out = reference_self_extend(
            q, k, v, query_bases, key_bases, settings.window, settings.group, self.scaling, divisor
        )
        return self.o_proj(out.transpose(0, 1).reshape(1, length, -1).float()), None

    return forward


@pytest.mark.parametrize(
    "name, query_bases, key_bases, divisor",
    [
        ("llama_abf", [500.0] * 4, [500.0] * 2, 1.0),
        ("llama_pi", [100.0] * 4, [100.0] * 2, 4.0),
        ("harpe_per_group", [10.0, 10.0, 3000.0, 3000.0], [10.0, 3000.0], 1.0),
        ("harpe_per_query_head", [10.0, 200.0, 3000.0, 9e4], [10.0, 200.0, 3000.0, 9e4], 1.0),
    ],
)
def test_model_logits_match_the_per_token_reference(name, query_bases, key_bases, divisor):
    settings = SelfExtendSettings(window=5, group=3)
    model = make_model(name)
    reference = copy.deepcopy(model)
    install_self_extend(model, settings)
    for layer in reference.model.layers:
        layer.self_attn.forward = types.MethodType(
            reference_forward(settings, query_bases, key_bases, divisor), layer.self_attn
        )
    torch.testing.assert_close(logits(model), logits(reference), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama_yarn", "harpe_per_query_head"])
def test_cached_generation_equals_full_recomputation(name):
    model = make_model(name)
    install_self_extend(model, SelfExtendSettings(window=4, group=3))
    runs = [
        model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False, use_cache=cached,
                       output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        for cached in (True, False)
    ]  # fmt: skip
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores), atol=1e-5, rtol=1e-5)


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="sliding-window"):
        install_self_extend(MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)), SelfExtendSettings(8, 2))
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="Llama-family"):
        install_self_extend(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), SelfExtendSettings(8, 2))


def test_cli_rejects_bad_settings_and_the_synthetic_backends(tmp_path, capsys):
    import importlib

    module = importlib.import_module("megatron_harpe.commands.evaluate")
    with pytest.raises(SystemExit) as exit_info:
        module.main(
            ["--model", "oracle", "--task", "passkey", "--lengths", "512", "--self-extend", "window=32,group=0"]
        )
    assert exit_info.value.code == 2
    assert "self-extend group must be a positive integer" in capsys.readouterr().err
    assert (
        module.main(
            [
                "--model",
                "oracle",
                "--tokenizer",
                str(tmp_path),
                "--task",
                "passkey",
                "--lengths",
                "512",
                "--self-extend",
                "window=32,group=4",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--self-extend needs a model" in capsys.readouterr().err
