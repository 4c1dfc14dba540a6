"""`convert_checkpoint.py verify` (the demo's step 4) checks the export's KV-cache path, not only
its full forward: with a cache that keeps nothing (what transformers 5.24 did to the old HARPE
code: every decoding step attended to itself only) the report fails, on the cached logits even
where the full-forward logits still agree; with the real cache it passes.

    python -m pytest tests/distributed/test_verify_cache.py -q
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from megatron_harpe import parallel
from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_harpe.convert.verify import VerifyReport, verify_conversion

pytestmark = pytest.mark.distributed
TOLERANCE = 1e-4


def _forgetful_update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    return key_states, value_states  # nothing stored: the next step sees only itself


def _export_and_verify(hf_dir: str, root: str) -> tuple[VerifyReport, VerifyReport]:
    convert_hf_to_megatron(hf_dir, f"{root}/megatron", overrides=["position.type=harpe", "position.bases=[300, 30000]"])
    convert_megatron_to_hf(f"{root}/megatron", f"{root}/hf")
    working = verify_conversion(f"{root}/megatron", f"{root}/hf", prompt_length=12, new_tokens=8)
    with mock.patch.object(DynamicLayer, "update", _forgetful_update):
        broken = verify_conversion(f"{root}/megatron", f"{root}/hf", prompt_length=12, new_tokens=8)
    return working, broken


def test_verify_fails_when_the_exports_kv_cache_is_broken(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "source")
    ((working, broken),) = parallel.run_on_ranks(_export_and_verify, 1, str(tmp_path / "source"), str(tmp_path))

    assert working.ok(TOLERANCE), working.summary()
    assert working.max_abs_logit > 1.0  # logits large enough for the tolerance to mean something
    assert broken.max_abs_logit_diff <= TOLERANCE  # the full forward cannot see the cache bug
    assert broken.max_abs_cached_logit_diff > 100 * TOLERANCE, broken.summary()  # the cached steps do
    assert not broken.ok(TOLERANCE)
