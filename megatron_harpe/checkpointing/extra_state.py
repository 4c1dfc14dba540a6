"""Load a checkpoint whether or not it and the model carry Transformer Engine's `_extra_state`.

TE modules (the norms and linears of the TE layer spec, the final norm whenever TE is installed)
put an `_extra_state` entry (FP8 metadata) in their state dict; torch modules have none. So a
checkpoint converted on a machine without TE lacks keys the GPU image's model asks for, and a
checkpoint trained with TE has keys a torch-only model never asks for. Neither holds weights:
a missing one keeps the module's fresh extra state, an extra one is not read. Every other key
must still match exactly.

    loaded = load_sharded(model_and_optimizer_sharded_state, "ckpt/iter_0000100/dist")
"""

from __future__ import annotations

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import StrictHandling

EXTRA_STATE_SUFFIX = "_extra_state"


def is_extra_state_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(EXTRA_STATE_SUFFIX)


def load_sharded(sharded_state_dict: dict, checkpoint_dir: str) -> dict:
    """`dist_checkpointing.load` that drops requested `_extra_state` keys the checkpoint lacks
    (megatron calls them "unexpected") and raises ValueError for any other absent key. Keys
    the checkpoint has and the model does not ask for (TE's extra state) are never read."""
    loaded, _, unexpected = dist_checkpointing.load(
        sharded_state_dict, checkpoint_dir, strict=StrictHandling.RETURN_UNEXPECTED
    )
    absent = sorted(key for key in unexpected if not is_extra_state_key(key))
    if absent:
        raise ValueError(f"the checkpoint has no {', '.join(absent)}")
    return loaded
