"""Checkpoints load across "converted without Transformer Engine" and "trained with it".

    python -m pytest tests/distributed/test_checkpoint_extra_state.py -q

TE modules add an `_extra_state` entry to their state dict; inside the GPU image the final norm
is TE's. A stand-in gives the final norm such an entry (as TE's modules do, a uint8 tensor), so
this CPU test sees the same keys: a checkpoint without them loads into a model that has them
(the strict load raised "Unexpected keys ... final_layernorm._extra_state" before), and the other
way round. Any other absent key still fails.
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.checkpointing.checkpoint import load_checkpoint, save_checkpoint
from megatron_harpe.checkpointing.extra_state import is_extra_state_key
from megatron_harpe.config import ModelConfig
from megatron_harpe.model import build_model
from megatron_harpe.position.config import PositionConfig

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=48, vocab_size=32)
POSITION = PositionConfig(type="harpe", bases=[500.0, 50000.0])


def _with_te_style_extra_state(module: torch.nn.Module) -> None:
    """Make `module` carry `_extra_state` like a Transformer Engine module."""

    class TeStyle(type(module)):
        def get_extra_state(self):
            return torch.frombuffer(bytearray(b"fp8-meta"), dtype=torch.uint8).clone()

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    module.__class__ = TeStyle


def _build(te_style: bool, seed: int):
    parallel.initialize(1, 1)
    parallel.seed_everything(seed)
    gpt = build_model(MODEL, POSITION)
    if te_style:
        _with_te_style_extra_state(gpt.decoder.final_layernorm)
    return gpt


def _save_then_load(save_te_style: bool, load_te_style: bool, save_dir: str) -> dict:
    saved = _build(save_te_style, seed=1)
    assert ("decoder.final_layernorm._extra_state" in saved.state_dict()) == save_te_style
    save_checkpoint(save_dir, 1, model=saved, config={}, train_state={})
    loaded = _build(load_te_style, seed=2)
    load_checkpoint(save_dir, model=loaded, weights_only=True)
    same = all(torch.equal(a, b) for a, b in zip(saved.parameters(), loaded.parameters()))
    return {"same_weights": same, "extra": getattr(loaded.decoder.final_layernorm, "loaded_extra_state", None)}


def _load_untied_from_tied(save_dir: str) -> None:
    parallel.initialize(1, 1)
    tied = build_model(ModelConfig(**{**MODEL.__dict__, "tie_word_embeddings": True}), POSITION)
    save_checkpoint(save_dir, 1, model=tied, config={}, train_state={})
    load_checkpoint(save_dir, model=build_model(MODEL, POSITION), weights_only=True)  # asks for output_layer.weight


@pytest.mark.parametrize("save_te_style,load_te_style", [(False, True), (True, False), (True, True)])
def test_extra_state_either_way_round(tmp_path, save_te_style, load_te_style):
    (result,) = parallel.run_on_ranks(_save_then_load, 1, save_te_style, load_te_style, str(tmp_path))
    assert result["same_weights"]
    if save_te_style and load_te_style:
        assert bytes(result["extra"].tolist()) == b"fp8-meta"  # present on both sides: restored


def test_other_absent_keys_still_fail(tmp_path):
    with pytest.raises(RuntimeError, match="does not match the model built here.*has no output_layer.weight"):
        parallel.run_on_ranks(_load_untied_from_tied, 1, str(tmp_path))


def test_extra_state_key_names():
    assert is_extra_state_key("decoder.final_layernorm._extra_state")
    assert is_extra_state_key("decoder.layers.self_attention.linear_qkv._extra_state/shard_0_4")
    assert not is_extra_state_key("decoder.final_layernorm.weight")
