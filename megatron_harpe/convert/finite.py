"""Weights that hold NaN or inf are refused by name before they are converted or evaluated.

    refuse_nonfinite(model.named_parameters(), "checkpoint ckpt/iter_0000040", FLAG)
    # ValueError: checkpoint ckpt/iter_0000040 holds non-finite weights: decoder.final_layernorm.weight
    # (64 NaN/inf of 64), embedding.word_embeddings.weight (12 of 262144): it did not train (see train.on_nonfinite) ...

A model whose weights are not finite converts bit for bit in both directions and evaluates to
passkey 0 and perplexity nan, all with exit code 0: a wasted export or a misleading table.
`--allow-nonfinite` (conversion, evaluation) lets it through on purpose, e.g. to inspect one.
Under tensor parallelism each rank holds part of the weights: `refuse_nonfinite_everywhere`
agrees across ranks, so all of them stop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

FLAG = "--allow-nonfinite"
_CHUNK_ELEMENTS = 1 << 20
_LISTED = 4


class NonFiniteWeights(ValueError):
    """Weights holding NaN or inf values."""


def count_nonfinite(tensor: torch.Tensor) -> int:
    """Non-finite values in `tensor`; of this rank's shard for a DTensor (FSDP2's sharded
    parameters), whose reductions would otherwise mix the local count with the global size."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    # in chunks: torch.isfinite makes temporaries as large as its input (|x| and two masks), which
    # would double the peak memory of a conversion that otherwise holds one weight at a time
    flat = tensor.reshape(-1)
    finite = sum(int(torch.isfinite(chunk).sum().item()) for chunk in flat.split(_CHUNK_ELEMENTS))
    return flat.numel() - finite


def nonfinite_counts(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    """name -> (non-finite values, values) for every tensor holding any."""
    counts = {}
    for name, tensor in named:
        bad = count_nonfinite(tensor.detach())
        if bad:
            counts[name] = (bad, tensor.numel())
    return counts


def describe(counts: dict[str, tuple[int, int]], where: str, flag: str) -> str:
    listed = ", ".join(f"{name} ({bad} NaN/inf of {total})" for name, (bad, total) in list(counts.items())[:_LISTED])
    more = f" and {len(counts) - _LISTED} more tensors" if len(counts) > _LISTED else ""
    return (
        f"{where} holds non-finite weights: {listed}{more}: these weights compute nothing useful (a run that "
        f"diverged, see train.on_nonfinite); pass {flag} to go ahead anyway"
    )


def refuse_nonfinite(named: Iterable[tuple[str, torch.Tensor]], where: str, flag: str = FLAG) -> None:
    counts = nonfinite_counts(named)
    if counts:
        raise NonFiniteWeights(describe(counts, where, flag))


def refuse_nonfinite_everywhere(model: torch.nn.Module, where: str, flag: str = FLAG) -> None:
    """`refuse_nonfinite` for a model sharded over ranks: every rank raises if any rank's part
    holds a non-finite value (the message lists this rank's tensors, or says another rank has them)."""
    import torch.distributed as dist

    from megatron_harpe.rank_health import any_rank_failed

    counts = nonfinite_counts(model.named_parameters())
    if not any_rank_failed(bool(counts)):
        return
    if counts:
        raise NonFiniteWeights(describe(counts, where, flag))
    rank = dist.get_rank() if dist.is_initialized() else 0
    raise NonFiniteWeights(
        f"{where} holds non-finite weights (on ranks other than {rank}); pass {flag} to go ahead anyway"
    )
