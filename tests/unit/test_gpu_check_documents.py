"""The document-masking rows of scripts/gpu_check.sh, as far as a CPU can run them.

    python -m pytest tests/unit/test_gpu_check_documents.py -q       (-m slow: the CPU row itself)

The GPU rows gather THD streams from context-parallel ranks back into sequence order; that
reordering is checked here with token ids standing in for logits.
"""

from __future__ import annotations

import pytest

from megatron_harpe import gpu_check_documents as documents_check
from megatron_harpe.documents import document_ids
from megatron_harpe.gpu_check import parse_args
from megatron_harpe.thd import pack_thd


@pytest.mark.parametrize("cp", [1, 2])
def test_thd_streams_of_all_ranks_come_back_in_sequence_order(cp):
    batch = documents_check.packed_batch()
    ids = document_ids(batch["tokens"], documents_check.EOD)
    locals_ = [pack_thd(batch, ids, cp_rank=rank, cp_size=cp) for rank in range(cp)]
    parts = [local["tokens"][0, :, None].float() for local in locals_]  # one "logit": the token id
    ordered = documents_check._sequence_order(parts, locals_[0], cp)
    assert ordered[:, 0].long().tolist() == batch["tokens"][0].tolist()


def test_documents_is_a_check_of_its_own():
    assert parse_args(["--device", "cpu", "--only", "documents"])[0].only == ["documents"]
    assert sum(documents_check.LENGTHS) % 8 == 0 and min(documents_check.LENGTHS) < sum(documents_check.LENGTHS) // 4


@pytest.mark.slow
def test_cpu_row_passes_and_gpu_rows_skip(tmp_path):
    results = documents_check.check_document_masking(parse_args(["--device", "cpu"])[0], tmp_path)
    assert [r.status for r in results] == ["PASS", "SKIP"], results
