"""Run packed, document-masked sequences on TP x CP gloo ranks through the trainer's own path
(training/data.py `prepare_documents`, model.py `forward_micro_batch`), and each of their
documents alone in one process, so test_document_masking.py can compare them.

Everything comes back in full shapes: logits [b, S, vocab], per-token losses [b, S], gradients
of the summed token loss / tokens (TP shards gathered, CP partial sums added), and per rank the
largest difference between the rotary angle tables its tokens were rotated with and the tables
the same tokens get when their document runs alone (the cached path, at positions 0..L-1).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from model_parity import shard, unshard

from megatron_harpe import parallel
from megatron_harpe.config import Config, DataConfig, ModelConfig, ParallelConfig
from megatron_harpe.documents import document_ids, document_positions, document_spans
from megatron_harpe.model import build_model, forward_micro_batch
from megatron_harpe.parallel import ParallelContext
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding
from megatron_harpe.training.data import prepare_documents

EOD = 0


@dataclasses.dataclass(frozen=True)
class Case:
    model: ModelConfig
    position: PositionConfig


def packed_batch(lengths_per_row: list[list[int]], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sequences of documents of the given lengths, each ending in EOD; labels are the next token
    of the stream (a random one after the last)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        docs = [
            torch.cat([torch.randint(1, vocab, (n - 1,), generator=generator), torch.tensor([EOD])]) for n in lengths
        ]
        rows.append(torch.cat(docs))
    tokens = torch.stack(rows)
    labels = torch.cat([tokens[:, 1:], torch.randint(1, vocab, (tokens.size(0), 1), generator=generator)], dim=1)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(tokens.shape),
        "position_ids": document_positions(document_ids(tokens, EOD)),
    }


def make_weights(case: Case, seed: int = 7) -> dict[str, torch.Tensor]:
    parallel.seed_everything(seed)
    gpt = build_model(case.model, case.position)
    with torch.no_grad():  # norms start at 1: perturb them so their gradients matter
        for name, param in gpt.named_parameters():
            if "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return {k: v.clone() for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)}


def alone(cases: list[Case], batch: dict[str, torch.Tensor]) -> list[dict]:
    """In one process: weights per case, and every document of `batch` run by itself."""
    parallel.initialize(1, 1)
    results = []
    ids = document_ids(batch["tokens"], EOD)
    tokens_total = batch["tokens"].numel()
    for case in cases:
        weights = make_weights(case)
        gpt = build_model(case.model, case.position, initialize=False)
        gpt.load_state_dict(weights, strict=False)
        logits, losses = torch.zeros(*batch["tokens"].shape, case.model.vocab_size), torch.zeros(batch["tokens"].shape)
        for row in range(ids.size(0)):
            for start, end in document_spans(ids[row]):
                tokens = batch["tokens"][row : row + 1, start:end]
                positions = torch.arange(end - start)[None]
                with torch.no_grad():
                    logits[row, start:end] = gpt(tokens, positions, None)[0]
                token_losses = gpt(tokens, positions, None, labels=batch["labels"][row : row + 1, start:end])
                (token_losses.sum() / tokens_total).backward()
                losses[row, start:end] = token_losses.detach()[0]
        grads = {name: param.grad.clone() for name, param in gpt.named_parameters()}
        results.append({"weights": weights, "logits": logits, "losses": losses, "grads": grads})
    return results


def _config(case: Case, tp: int, cp: int, sequence_parallel: bool = False) -> Config:
    return Config(model=case.model, position=case.position,
                  parallel=ParallelConfig(tensor=tp, context=cp, sequence_parallel=sequence_parallel),
                  data=DataConfig(reset_position_ids=True, reset_attention_mask=True))  # fmt: skip


def packed(
    tp: int,
    cp: int,
    jobs: list[tuple[Case, dict, str | None]],
    batch: dict[str, torch.Tensor],
    sequence_parallel: bool = False,
) -> list[dict]:
    """On every rank, per (case, full weights, breakage) job: the packed batch through the
    trainer's path; the gathered results (complete on every rank) and this rank's largest rotary
    table difference. `breakage`: None, `no_mask` (the document ids are dropped) or
    `positions_run_on` (the sequence's own positions instead of the restarted ones)."""
    if sequence_parallel:
        from tests.distributed.sequence_parallel_cpu import enable_sequence_parallel_on_cpu

        enable_sequence_parallel_on_cpu()
    ctx = parallel.initialize(tp, cp)
    results = []
    for case, full_weights, breakage in jobs:
        cfg = _config(case, tp, cp, sequence_parallel)
        gpt = build_model(case.model, case.position, initialize=False, parallel=cfg.parallel)
        local_weights = {name: shard(name, full, ctx.tp_rank, tp) for name, full in full_weights.items()}
        gpt.load_state_dict(local_weights, strict=False)
        whole = dict(batch)
        if breakage == "positions_run_on":
            whole["position_ids"] = torch.arange(batch["tokens"].size(1)).expand_as(batch["tokens"])
        local = prepare_documents(whole, cfg, ctx, EOD)
        if breakage == "no_mask":
            del local["document_ids"]
        tables = _record_tables(gpt)
        split = []  # tokens each layer's norm sees: split over TP under sequence parallelism
        gpt.decoder.layers[0].input_layernorm.register_forward_hook(lambda m, args, out: split.append(args[0].size(0)))
        with torch.no_grad():
            logits = forward_micro_batch(
                gpt, {k: v for k, v in local.items() if k != "labels"}, per_token_positions=True
            )
        token_losses = forward_micro_batch(gpt, local, per_token_positions=True)
        (token_losses.sum() / batch["tokens"].numel()).backward()
        assert gpt.config.sequence_parallel == (sequence_parallel and tp > 1)
        assert split[-1] == local["tokens"].size(1) // (tp if sequence_parallel else 1), split
        table_error = _table_error(case, ctx, tp, cp, tables[-1], batch)
        results.append({**_gather(gpt, ctx, tp, cp, logits, token_losses.detach()), "table_error": table_error})
    return results


def _record_tables(gpt) -> list:
    """The (q, k) tables the model's rotary hands its layers, forward by forward."""
    seen = []
    gpt.rotary_pos_emb.register_forward_hook(lambda module, args, tables: seen.append(tables))
    return seen


def _table_error(case: Case, ctx: ParallelContext, tp: int, cp: int, tables, batch) -> float:
    """Largest |angle difference| between the (q, k) tables this rank used and the tables of the
    same tokens with their document alone (this TP rank's heads, the cached path, CP 1)."""
    alone_rotary = HeadwiseRotaryEmbedding(case.position, case.position.query_head_bases(case.model),
                                           case.position.key_head_bases(case.model), case.model.head_dim,
                                           tp_rank=ctx.tp_rank, tp_size=tp)  # fmt: skip
    ids = document_ids(batch["tokens"], EOD)
    local = parallel.context_parallel_indices(ids.size(1), ctx.cp_rank, cp)
    worst = 0.0
    for row in range(ids.size(0)):
        expected_q, expected_k = [], []
        for start, end in document_spans(ids[row]):
            query, key = alone_rotary(end - start)
            expected_q.append(query[:, 0])
            expected_k.append(key[:, 0])
        for used, expected in zip(tables, (torch.cat(expected_q), torch.cat(expected_k))):
            used = used.expand(-1, ids.size(0), -1, -1)  # a cached table [s, 1, ...] serves every sequence
            worst = max(worst, float((used[:, row] - expected[local]).abs().max()))
    return worst


def _gather(gpt, ctx: ParallelContext, tp: int, cp: int, logits: torch.Tensor, losses: torch.Tensor) -> dict:
    grads = {}
    for name, param in gpt.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad, group=ctx.cp_group)  # CP ranks hold the same weights: add their partial grads
        if getattr(param, "sequence_parallel", False):  # norms under SP: each TP rank saw part of the tokens
            dist.all_reduce(grad, group=ctx.tp_group)
        parts = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(parts, grad, group=ctx.tp_group)
        grads[name] = unshard(name, parts)
    vocab_parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(vocab_parts, logits.contiguous(), group=ctx.tp_group)
    full_vocab = torch.cat(vocab_parts, dim=-1)
    return {"grads": grads, "logits": _sequence_order(full_vocab, ctx, cp), "losses": _sequence_order(losses, ctx, cp)}


def _sequence_order(local: torch.Tensor, ctx: ParallelContext, cp: int) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=ctx.cp_group)
    seq = local.size(1) * cp
    ordered = torch.empty(local.size(0), seq, *local.shape[2:])
    for rank, part in enumerate(parts):
        ordered[:, parallel.context_parallel_indices(seq, rank, cp)] = part
    return ordered
