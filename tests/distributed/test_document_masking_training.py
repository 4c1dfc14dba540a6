"""The trainer with document masking on (data.reset_attention_mask + reset_position_ids +
eod_mask_loss): the same updates under context and data parallelism, on the sharding engine
(FSDP2) and with megatron-core's full and selective recomputation, as in one process; and other
updates than with the same positions but attention across documents.

    python -m pytest tests/distributed/test_document_masking_training.py -q

Runs `training.loop.train` (its loader, `prepare_documents`, `forward_micro_batch`) on a dataset
of short documents (10 to 60 tokens of the demo tokenizer, each ending in its EOS), so every
sequence packs several; test_document_masking.py checks what the masked model computes.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_training import assert_same_history, run, tiny_config

from megatron_harpe.data.indexed import DatasetWriter
from megatron_harpe.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.distributed

MASKED = {"reset_attention_mask": True, "reset_position_ids": True, "eod_mask_loss": True}


@pytest.fixture(scope="module")
def short_documents(demo_data, tmp_path_factory) -> dict:
    """tiny_config's data section for a dataset of short documents."""
    eos = load_tokenizer(str(demo_data.tokenizer)).eos_id
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 60, size=400)
    documents = [np.append(rng.integers(eos + 1, 4096, size=n - 1), eos) for n in lengths]
    prefix = str(tmp_path_factory.mktemp("short_documents") / "short")
    with DatasetWriter(prefix, vocab_size=4096) as writer:
        writer.add_documents(np.concatenate(documents), lengths)
    return {"prefixes": [prefix]}


def config(demo_data, short_documents, masked: bool = True, **sections) -> dict:
    tree = tiny_config(demo_data, **sections)
    tree["data"].update(short_documents, **{**MASKED, "reset_attention_mask": masked})
    return tree


@pytest.fixture(scope="module")
def masked_reference(demo_data, short_documents):
    return run(1, config(demo_data, short_documents))  # random tokens: nothing to learn, only to compare


@pytest.mark.parametrize("parallel, recompute", [({"context": 2}, "full"), ({"context": 2}, "selective"),
                                                ({}, "none")], ids=["cp2-full", "cp2-selective", "dp2"])  # fmt: skip
def test_two_ranks_equal_single_process(demo_data, short_documents, masked_reference, parallel, recompute):
    """The engine shards the weights over the two ranks (CP2: the CP ranks hold one replica's
    shards); recompute reruns the layers with the micro-batch's per-token table and documents."""
    tree = config(demo_data, short_documents, parallel=parallel, train={"recompute": recompute})
    assert_same_history(run(2, tree), masked_reference)


def test_the_mask_changes_the_updates(demo_data, short_documents, masked_reference):
    unmasked = run(1, config(demo_data, short_documents, masked=False))  # positions still restart
    assert abs(unmasked[-1]["loss"] - masked_reference[-1]["loss"]) > 1e-3
