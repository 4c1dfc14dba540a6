"""The `parallel` keys of the CUDA plan: sequence parallelism and the CP communication type,
each validated strictly; the retired switches of the replaced sharding engine are refused.

    python -m pytest tests/unit/test_config_parallel.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_harpe.config import load_config

LLAMA = Path(__file__).resolve().parents[2] / "configs" / "llama2_7b_128k_harpe.yaml"
SDPA = ["model.attention_backend=sdpa", "parallel.sequence_parallel=false", "parallel.cp_comm_type=auto"]


def _validate(overrides: list[str]):
    return load_config(LLAMA, overrides).validate(world_size=32, require_backend=False)


def test_the_preset_asks_for_the_cuda_plan():
    parallel = _validate([]).parallel
    assert parallel.sequence_parallel
    assert parallel.cp_comm_type == "p2p"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.cp_comm_type=ring"], "parallel.cp_comm_type='ring' is not one of"),
        ([*SDPA, "parallel.cp_comm_type=p2p"], "is Transformer Engine's"),
        ([*SDPA, "parallel.sequence_parallel=true"], "sequence_parallel needs model.attention_backend: te"),
        (["parallel.tensor=1", "parallel.context=4"], "parallel.sequence_parallel splits over tensor-parallel ranks"),
        (["parallel.cp_comm_type=a2a", "parallel.context=16"], "a2a splits the 8 k/v heads"),
        (
            ["parallel.distributed_optimizer=true"],
            "parallel.distributed_optimizer is no longer a setting: weights, "
            "gradients and AdamW states are always sharded",
        ),
        (
            ["parallel.overlap_grad_reduce=false"],
            "parallel.overlap_grad_reduce is no longer a setting: .* always overlaps its gradient reduce-scatter",
        ),
        (["data.seq_length=131064"], "131064 .stage 0. / parallel.context=4 is not divisible by parallel.tensor=4"),
    ],
)
def test_impossible_parallel_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        _validate(overrides)


def test_cp_comm_type_auto_follows_the_backend():
    assert _validate([*SDPA]).parallel.resolved_cp_comm_type(_validate([*SDPA]).model) == "all_gather"
    cfg = _validate(["parallel.cp_comm_type=auto"])
    assert cfg.parallel.resolved_cp_comm_type(cfg.model) == "p2p"
    _validate([*SDPA, "parallel.cp_comm_type=all_gather"])


def test_a_saved_config_with_retired_keys_still_reads(tmp_path):
    """Checkpoints written before the FSDP2 engine carry the retired keys in config.yaml."""
    from megatron_harpe.config import Config, drop_retired_keys, from_dict

    tree = load_config(LLAMA).to_dict()
    tree["parallel"].update(distributed_optimizer=True, overlap_grad_reduce=True)
    with pytest.raises(ValueError, match="no longer a setting"):
        from_dict(Config, tree)
    cleaned = drop_retired_keys(tree)
    assert from_dict(Config, cleaned).parallel.tensor == 4
    assert "distributed_optimizer" in tree["parallel"]  # the caller's tree is left as it was
