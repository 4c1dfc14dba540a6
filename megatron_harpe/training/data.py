"""Training batches for one rank: megatron datasets per stage, this DP rank's samples, this
CP rank's two chunks of every sequence (with document masking on Transformer Engine: its THD
stream, see thd.py).

The demo corpus (offline, built from the local Python installation) is prepared by rank 0 on
first use when the config names `data.demo_workdir` and no dataset prefixes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_harpe.config import Config, StageConfig
from megatron_harpe.data.identity import check_training_data
from megatron_harpe.data.index_cache import cache_directory
from megatron_harpe.data.loader import build_gpt_dataset, micro_batches, slice_for_context_parallel
from megatron_harpe.data.tokenizer import load_tokenizer
from megatron_harpe.documents import document_ids
from megatron_harpe.parallel import ParallelContext
from megatron_harpe.rank_health import any_rank_failed


class StageData:
    """The sequences of one stage, iterated from any step (resume is exact by consumed samples)."""

    def __init__(self, dataset, cfg: Config, stage: StageConfig, ctx: ParallelContext, eod: int | None = None) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self.stage = stage
        self.ctx = ctx
        self.eod = eod

    def consumed_samples(self, steps: int) -> int:
        return steps * self.stage.global_batch_size

    def micro_batches(self, consumed_steps: int) -> Iterator[dict[str, torch.Tensor]]:
        for batch in micro_batches(
            self.dataset,
            micro_batch_size=self.cfg.train.micro_batch_size,
            global_batch_size=self.stage.global_batch_size,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp_size,
            consumed_samples=self.consumed_samples(consumed_steps),
        ):
            if self.cfg.data.reset_attention_mask:
                yield prepare_documents(batch, self.cfg, self.ctx, self.eod)
            else:
                yield slice_for_context_parallel(batch, self.ctx.cp_rank, self.ctx.cp_size)


def prepare_documents(
    batch: dict[str, torch.Tensor], cfg: Config, ctx: ParallelContext, eod: int
) -> dict[str, torch.Tensor]:
    """A micro-batch of whole sequences made ready for document masking on this rank: for sdpa
    the CP rank's chunks plus the `document_ids` of the whole sequences; for Transformer Engine
    the rank's part of the THD stream of documents (thd.py)."""
    ids = document_ids(batch["tokens"], eod)
    if cfg.model.attention_backend == "te":
        from megatron_harpe.thd import pack_thd

        tp_split = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
        return pack_thd(
            batch,
            ids,
            cp_rank=ctx.cp_rank,
            cp_size=ctx.cp_size,
            tp_split=tp_split,
            reset_positions=cfg.data.reset_position_ids,
        )
    local = slice_for_context_parallel(batch, ctx.cp_rank, ctx.cp_size)
    local["document_ids"] = ids
    return local


def prepare_training_data(cfg: Config, ctx: ParallelContext, total_samples: list[int]) -> list[StageData]:
    """One `StageData` per stage (stages differ in sequence length)."""
    if not cfg.data.prefixes:
        _prepare_demo_data(cfg, ctx)
    if cfg.data.tokenizer is None:
        raise ValueError("data.tokenizer is needed for the end-of-document id: set it to the dataset's tokenizer")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}: use the model's own tokenizer or a larger model.vocab_size"
        )
    cache_dir = cache_directory(cfg.data.cache_dir, cfg.data.prefixes, say=_on_main(ctx))
    _check_data_identity(cfg, ctx, cache_dir)
    builds = [
        dict(
            prefixes=cfg.data.prefixes,
            weights=cfg.data.weights,
            seq_length=stage.seq_length,
            num_samples=samples,
            seed=cfg.data.seed,
            tokenizer=tokenizer,
            reset_position_ids=cfg.data.reset_position_ids,
            reset_attention_mask=cfg.data.reset_attention_mask,
            eod_mask_loss=cfg.data.eod_mask_loss,
            loss_mask_prefixes=cfg.data.loss_mask_prefixes,
            cache_dir=str(cache_dir),
        )
        for stage, samples in zip(cfg.resolved_stages(), total_samples)
    ]
    # rank 0 builds and caches megatron's indices first, alone: its failure (say, a full disk)
    # stops every rank at once instead of leaving them in megatron's barrier until the timeout
    error = None
    if ctx.rank == 0:
        try:
            for build in builds:
                build_gpt_dataset(**build, alone=True)
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            error = caught
    if any_rank_failed(error is not None):
        raise error or ValueError("the training data could not be prepared (rank 0 says why)")
    return [
        StageData(build_gpt_dataset(**build), cfg, stage, ctx, eod=tokenizer.eos_id)
        for build, stage in zip(builds, cfg.resolved_stages())
    ]


def _on_main(ctx: ParallelContext):
    return lambda line: print(line, file=sys.stderr, flush=True) if ctx.is_main else None


def _check_data_identity(cfg: Config, ctx: ParallelContext, cache_dir: Path) -> None:
    """Every rank refuses data made with another tokenizer or holding ids beyond the model's
    vocabulary (data/identity.py), before the first step; rank 0 measures what is not recorded."""
    error, notes = None, []
    try:
        notes = check_training_data(
            cfg.data.prefixes, cfg.data.tokenizer, cfg.model.vocab_size, cache_dir, measure=ctx.is_main
        )
    except ValueError as caught:
        error = caught
    if any_rank_failed(error is not None):
        raise error or ValueError("the training data was refused (rank 0 says why)")
    for note in notes:
        _on_main(ctx)(note)


def _prepare_demo_data(cfg: Config, ctx: ParallelContext) -> None:
    from megatron_harpe.data.demo_corpus import prepare_demo_data

    workdir = Path(cfg.data.demo_workdir)
    if ctx.is_main:
        prepare_demo_data(workdir)
    dist.barrier()
    demo = prepare_demo_data(workdir)  # every step is already done: returns the paths
    cfg.data.prefixes = [str(demo.prefix)]
    cfg.data.tokenizer = str(demo.tokenizer)
