"""HF -> megatron conversion that makes each weight only when the checkpoint writer reaches it
(convert/streaming_save.py) writes the checkpoint the in-memory conversion writes.

    python -m pytest tests/distributed/test_convert_streamed_save.py -q

The reference is the conversion as it was before streaming: a real TP=1 model filled by
`load_hf_weights_into` and saved by megatron-core's own torch_dist writer. Both checkpoints
are loaded with the normal load path (`load_checkpoint`, i.e. `dist_checkpointing.load`) at
TP=1 and TP=2 and compared tensor by tensor; their DCP metadata (keys, global shapes, dtypes,
chunks) and megatron's common.pt/metadata.json must be equal too.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_harpe import parallel
from megatron_harpe.checkpointing.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from megatron_harpe.convert.hf_config import read_hf_config
from megatron_harpe.convert.hf_files import HFWeights
from megatron_harpe.convert.hf_to_megatron import (
    StreamedHFWeights,
    build_conversion_config,
    convert_hf_to_megatron,
    load_hf_weights_into,
)
from megatron_harpe.convert.keymap import megatron_names
from megatron_harpe.convert.megatron_side import ensure_single_process, read_checkpoint_spec
from megatron_harpe.convert.streaming_save import StreamingSaveStrategy
from megatron_harpe.model import build_model

pytestmark = pytest.mark.distributed


def make_hf_model(path: Path, dtype: torch.dtype, tied: bool) -> Path:
    """A random GQA Llama (3 layers) in several small shards."""
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    LlamaForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


# ------------------------------------------------------------------------------ rank functions

CASES = {"fp32": (torch.float32, None, False), "bf16_to_fp32_tied": (torch.bfloat16, torch.float32, True)}
"""name -> (dtype of the HF weights, dtype asked of the converter (None keeps the source's),
tied input and output embeddings)"""


def _convert_both_ways(hf_dir: str, streamed: str, reference: str, dtype: torch.dtype | None) -> list[str]:
    """Streamed conversion (the converter) and the in-memory reference; returns the order in
    which a second streamed save made its weights."""
    convert_hf_to_megatron(hf_dir, streamed, dtype=dtype)
    config = build_conversion_config(read_hf_config(hf_dir))
    weights = HFWeights(hf_dir)
    position = config.resolved_stages()[0].position
    params_dtype = dtype or weights.dtype("model.embed_tokens.weight")
    real = build_model(config.model, position, params_dtype=params_dtype, initialize=False)
    load_hf_weights_into(real, weights, config.model)
    save_checkpoint(reference, 0, model=real, config=config.to_dict(), train_state={"weights_only": True})
    with pytest.raises(CheckpointWriteError, match="not on the meta device"):  # it would write stale weights
        save_checkpoint(
            f"{reference}-real",
            0,
            model=real,
            config=config.to_dict(),
            train_state={},
            sharded_strategy=StreamingSaveStrategy(StreamedHFWeights(real, weights, config.model)),
        )

    meta = build_model(config.model, position, params_dtype=params_dtype, initialize=False, on_meta_device=True)
    maker = StreamedHFWeights(meta, weights, config.model)
    save_checkpoint(
        f"{reference}-again",
        0,
        model=meta,
        config=config.to_dict(),
        train_state={},
        sharded_strategy=StreamingSaveStrategy(maker),
    )
    return maker.made


def _load_both(streamed: str, reference: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """This rank's shard of every weight, loaded from each checkpoint by the normal load path."""
    spec = read_checkpoint_spec(streamed)
    loaded = []
    for path in (streamed, reference):
        model = build_model(spec.model, spec.position, params_dtype=torch.float32, initialize=False)
        for param in model.parameters():
            torch.nn.init.constant_(param, float("nan"))  # a weight the load skips cannot pass as equal
        load_checkpoint(path, model=model, weights_only=True, load_rng=False)
        loaded.append({name: param.detach().clone() for name, param in model.named_parameters()})
    return [(name, tensor, loaded[1][name]) for name, tensor in loaded[0].items()]


def _convert_and_load_at_tp1(root: str) -> dict:
    ensure_single_process()
    results = {}
    for case, (_, dtype, _) in CASES.items():
        made = _convert_both_ways(f"{root}/{case}/hf", f"{root}/{case}/streamed", f"{root}/{case}/reference", dtype)
        results[case] = (made, _load_both(f"{root}/{case}/streamed", f"{root}/{case}/reference"))
    return results


def _load_at_tp2(root: str) -> dict:
    parallel.initialize(2, 1)
    return {case: _load_both(f"{root}/{case}/streamed", f"{root}/{case}/reference") for case in CASES}


# ------------------------------------------------------------------------------------- tests


def _dcp_metadata(checkpoint: Path):
    with open(checkpoint / "iter_0000000" / "dist" / ".metadata", "rb") as handle:
        return pickle.load(handle).state_dict_metadata


def _assert_same_tensors(pairs: list, count: int, label: str) -> None:
    assert len(pairs) == count, label
    for name, actual, expected in pairs:
        assert not expected.isnan().any(), (label, name)
        assert torch.equal(actual, expected), (label, name)


def test_streamed_checkpoint_equals_in_memory_conversion(tmp_path: Path) -> None:
    for case, (source_dtype, _, tied) in CASES.items():
        make_hf_model(tmp_path / case / "hf", source_dtype, tied)
    at_tp1 = parallel.run_on_ranks(_convert_and_load_at_tp1, 1, str(tmp_path))[0]
    at_tp2 = parallel.run_on_ranks(_load_at_tp2, 2, str(tmp_path))

    for case in CASES:
        streamed, reference = tmp_path / case / "streamed", tmp_path / case / "reference"
        # every weight made exactly once, one at a time, in the order the writer reached it
        names = megatron_names(build_conversion_config(read_hf_config(tmp_path / case / "hf")).model)
        made, tp1_pairs = at_tp1[case]
        assert sorted(made) == sorted(names) and len(made) == len(set(made)), case

        # the same files megatron writes, with the same tensor metadata
        dist_streamed, dist_reference = (path / "iter_0000000" / "dist" for path in (streamed, reference))
        assert sorted(p.name for p in dist_streamed.iterdir()) == sorted(p.name for p in dist_reference.iterdir())
        assert json.loads((dist_streamed / "metadata.json").read_text()) == json.loads(
            (dist_reference / "metadata.json").read_text()
        )
        assert torch.load(dist_streamed / "common.pt", weights_only=False) == torch.load(
            dist_reference / "common.pt", weights_only=False
        )
        streamed_meta, reference_meta = _dcp_metadata(streamed), _dcp_metadata(reference)
        assert streamed_meta.keys() == reference_meta.keys(), case
        for key, expected in reference_meta.items():
            assert streamed_meta[key] == expected, (case, key)
        assert read_checkpoint_spec(streamed).train_state["weights_only"] is True

        # the normal load path reads both to the same tensors at TP=1 and TP=2
        _assert_same_tensors(tp1_pairs, len(names), f"{case} TP=1")
        for rank, rank_results in enumerate(at_tp2):
            _assert_same_tensors(rank_results[case], len(names), f"{case} TP=2 rank {rank}")
