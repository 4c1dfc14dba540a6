"""An exported HARPE directory loaded as a user loads it (`trust_remote_code=True`): cached greedy
generation equals full recomputation, on whichever transformers is installed; outside the
supported range, loading fails with a message naming the installed version and the range.

    python -m pytest tests/unit/test_hf_harpe_remote_code.py -q
    python scripts/compat_matrix.py --versions 5.2.0 5.3.0 5.4.0 5.24.0   # the same tests per version

The export is built from a stock Llama's files (config.json edited, our two code files copied),
so this module also runs where our own HarpeLlamaConfig refuses the installed transformers.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import megatron_harpe.convert.hf_harpe as hf_harpe_package
from megatron_harpe.convert.hf_harpe.configuration_harpe_llama import (
    TRANSFORMERS_EXCLUDED,
    TRANSFORMERS_MINIMUM,
    TRANSFORMERS_TESTED_UP_TO,
    UnsupportedTransformersVersion,
    check_transformers_version,
    is_supported,
)

INSTALLED = transformers.__version__
PROMPT, NEW_TOKENS = 7, 12
CASES = {
    # 4 query heads, 2 k/v groups
    "gqa_per_group_bases": dict(rope_bases=[300.0, 300.0, 30000.0, 30000.0], tie_word_embeddings=False),
    "gqa_per_query_head": dict(rope_bases=[100.0, 1000.0, 10000.0, 100000.0], tie_word_embeddings=False),
    "gqa_tied_embeddings": dict(rope_bases=[300.0, 300.0, 30000.0, 30000.0], tie_word_embeddings=True),
}


def export_harpe(directory: Path, rope_bases: list[float], tie_word_embeddings: bool) -> Path:
    """What `convert_checkpoint.py megatron-to-hf` writes for a HARPE model, from stock Llama files."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    config_path = directory / "config.json"
    values = json.loads(config_path.read_text())
    values.update(
        model_type="harpe_llama",
        architectures=["HarpeLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_harpe_llama.HarpeLlamaConfig",
            "AutoModelForCausalLM": "modeling_harpe_llama.HarpeLlamaForCausalLM",
        },
        rope_bases=rope_bases,
    )
    config_path.write_text(json.dumps(values))
    for name in ("configuration_harpe_llama.py", "modeling_harpe_llama.py"):
        shutil.copy(Path(hf_harpe_package.__file__).parent / name, directory / name)
    return directory


@pytest.fixture(scope="module", params=list(CASES))
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_harpe(tmp_path_factory.mktemp(request.param), **CASES[request.param])


def _load(export: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.skipif(not is_supported(INSTALLED), reason=f"transformers {INSTALLED} is refused (tested below)")
def test_cached_greedy_equals_recomputation(export: Path) -> None:
    model = _load(export)
    assert type(model).__module__.startswith("transformers_modules"), "not the exported code"
    assert model.model.layers[0].self_attn.keys_per_query_head == ("per_query_head" in export.name)
    assert model.lm_head.weight.device.type == "cpu"
    prompt = torch.randint(0, 96, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    settings = dict(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
        attention_mask=torch.ones_like(prompt),  # else generate() would mask the prompt's 0s as padding
    )  # fmt: skip
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, return_dict_in_generate=True, output_logits=True, **settings)
        recomputed = model.generate(prompt, use_cache=False, **settings)
        full = model(cached.sequences[:, :-1]).logits[0, PROMPT - 1 :]
    tokens = cached.sequences[0, PROMPT:]
    assert len(set(tokens.tolist())) >= 3, "a degenerate continuation would not test the cache"
    assert torch.equal(cached.sequences, recomputed)
    assert torch.isfinite(full).all() and full.abs().max() > 1.0
    # each cached decoding step's logits equal the full forward's at that position
    torch.testing.assert_close(torch.cat(cached.logits), full, rtol=0, atol=1e-5)


def test_loading_outside_the_supported_range_is_refused_by_name(export: Path) -> None:
    """Runs on every transformers: in range it loads, outside it names the version and the range."""
    if is_supported(INSTALLED):
        assert _load(export).config.harpe_transformers_minimum == TRANSFORMERS_MINIMUM
        return
    with pytest.raises(RuntimeError, match=rf"transformers {re.escape(INSTALLED)}.*supported: transformers >= "):
        _load(export)


def test_version_policy() -> None:
    for refused in ("4.57.6", "5.2.0", "5.3.0", *TRANSFORMERS_EXCLUDED):  # the versions the matrix found broken
        with pytest.raises(UnsupportedTransformersVersion, match=rf"{re.escape(refused)}.*>= {TRANSFORMERS_MINIMUM}"):
            check_transformers_version(refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(TRANSFORMERS_MINIMUM)
        check_transformers_version(TRANSFORMERS_TESTED_UP_TO)
    with pytest.warns(UserWarning, match="tested with transformers"):
        check_transformers_version("99.0.0")
