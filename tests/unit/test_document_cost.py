"""The dry run and the memory planner account for document masking (planner/document_cost.py).

    pytest tests/unit/test_document_cost.py

On a dataset with known document lengths: documents per sequence and the attention work are
measured from its .idx, Transformer Engine's THD padding is planned into the activations, the
sdpa path adds its block mask and document ids, and the dry run says all of it (and says when
masking is off).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import pretrain_harpe
from megatron_harpe.config import load_config
from megatron_harpe.data.indexed import DatasetWriter
from megatron_harpe.documents import TILE
from megatron_harpe.planner.document_cost import document_cost, planned_sequence_length
from megatron_harpe.planner.memory import Layout, estimate_memory

DEMO = "configs/demo_cpu.yaml"
LENGTHS = [100, 300, 1000, 60] * 25  # 1460 tokens per 4 documents


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("documents") / "docs")
    with DatasetWriter(prefix, vocab_size=4096) as writer:
        writer.add_documents(np.ones(sum(LENGTHS), dtype=np.int64), np.array(LENGTHS))
    return prefix


def config(prefix: str, *overrides: str):
    return load_config(DEMO, [f"data.prefixes=[{prefix}]", "data.tokenizer=null", *overrides]).validate(
        require_backend=False
    )


def test_off_costs_nothing_and_the_dry_run_says_so(prefix, capsys):
    cfg = config(prefix)
    assert document_cost(cfg, cp=2, tp=1) is None
    assert planned_sequence_length(cfg, cfg.resolved_stages()[0], 2, 1, "te") == 512
    assert pretrain_harpe.main(["--config", DEMO, "--dry-run", "--world-size", "2"]) == 0
    assert "attention crosses them" in capsys.readouterr().out


def test_documents_and_attention_work_are_measured_on_the_data(prefix):
    cost = document_cost(config(prefix, "data.reset_attention_mask=true"), cp=2, tp=1)
    assert cost.pieces_per_sequence == pytest.approx(1 + 512 * 4 / 1460)
    clipped = (100 * 100 + 300 * 300 + 1000 * 512 + 60 * 60) / 1460 / 512
    assert cost.attention_fraction == pytest.approx(clipped)
    assert cost.padding_expected == 0 and cost.padding_worst == 0  # sdpa pads nothing


def test_thd_padding_enters_the_memory_plan(prefix):
    te = ["data.reset_attention_mask=true", "model.attention_backend=te", "parallel.context=4"]
    cfg = config(prefix, *te)
    cost = document_cost(cfg, cp=4, tp=1)
    pieces = 1 + 512 * 4 / 1460
    assert cost.padding_expected == pytest.approx(pieces * 7 / 2)
    assert cost.padding_worst == math.ceil(pieces) * 7
    planned = planned_sequence_length(cfg, cfg.resolved_stages()[0], 4, 1)
    assert planned % 8 == 0 and planned >= 512 + cost.padding_worst
    layout = Layout(context=4, cp_comm="p2p")
    masked = estimate_memory(cfg, layout, backend="te")
    unmasked = estimate_memory(config(prefix, *te[1:]), layout, backend="te")
    assert masked.activations == pytest.approx(unmasked.activations * planned / 512, rel=0.01)
    with_sp = document_cost(config(prefix, *te, "parallel.tensor=2", "parallel.sequence_parallel=true"), cp=4, tp=2)
    assert with_sp.padding_worst == cost.padding_worst + 8  # the stream must divide by TP too


def test_sdpa_plans_its_block_masks_and_document_ids(prefix):
    cfg = config(prefix, "data.reset_attention_mask=true", "data.reset_position_ids=true")
    memory = estimate_memory(cfg, Layout(context=2, micro_batch=4))
    assert memory.transient["document ids"] == 8 * 4 * 512
    plain = estimate_memory(config(prefix), Layout(context=2, micro_batch=4))
    assert memory.rotary_tables == 4 * plain.rotary_tables  # a per-token table per sequence
    short_share = (100 + 60) / 1460  # documents under TILE (256) tokens get merged, with a mask
    masks = int(4 * 256 * short_share * TILE * 4)  # per layer: micro-batch x tokens per rank x ...
    assert memory.activations - plain.activations == 4 * masks  # 4 layers
    masked, plain = (estimate_memory(c, Layout(micro_batch=4), device="cpu") for c in (cfg, config(prefix)))
    runs_output = 8 * 16 * 4  # heads x head dim x fp32: without CP the runs' outputs are concatenated
    assert masked.activations - plain.activations == 4 * (int(4 * 512 * short_share * TILE * 4) + 4 * 512 * runs_output)
    # core attention recomputed: its document runs' buffers go with it; full recompute keeps one layer's
    selective, plain = (estimate_memory(c, Layout(micro_batch=4, recompute="selective"), device="cpu")
                        for c in (cfg, config(prefix)))  # fmt: skip
    assert selective.activations == plain.activations
    full, plain = (
        estimate_memory(c, Layout(micro_batch=4, recompute="full"), device="cpu") for c in (cfg, config(prefix))
    )
    assert full.activations - plain.activations == int(4 * 512 * short_share * TILE * 4) + 4 * 512 * runs_output


def test_dry_run_shows_the_masking_and_its_padding(prefix, capsys):
    overrides = [
        f"--data.prefixes=[{prefix}]",
        "--data.reset_attention_mask",
        "true",
        "--data.reset_position_ids",
        "true",
        "--model.attention_backend",
        "te",
        "--parallel.context",
        "4",
        "--parallel.tensor",
        "2",
    ]
    assert pretrain_harpe.main(["--config", DEMO, "--dry-run", "--world-size", "8", *overrides]) == 0
    out = capsys.readouterr().out
    assert "document masking: on, Transformer Engine THD" in out and "padded to a multiple of 8" in out
    assert "THD padding about" in out and "positions restart per document" in out


@pytest.mark.parametrize("comm", ["all_gather", "a2a"])
def test_te_document_masking_needs_p2p_context_parallelism(prefix, comm):
    with pytest.raises(ValueError, match="set parallel.cp_comm_type: p2p"):
        config(
            prefix,
            "data.reset_attention_mask=true",
            "model.attention_backend=te",
            "parallel.context=2",
            f"parallel.cp_comm_type={comm}",
        )
    config(prefix, "data.reset_attention_mask=true", "model.attention_backend=te", "parallel.context=2")  # auto: p2p
