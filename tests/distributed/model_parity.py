"""Run one forward/backward of the model on spawned gloo ranks and bring everything back in
TP=1 / CP=1 shapes, so a parallel run can be compared with the single-process run.

Weights are made once (full, unsharded) and each rank loads its TP shard; gradients are
gathered back to full shapes; per-token outputs are put back in sequence order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_harpe import parallel
from megatron_harpe.config import ModelConfig
from megatron_harpe.model import build_model
from megatron_harpe.position.config import PositionConfig
from megatron_harpe.position.rotary import context_parallel_positions

# Which axis of each full weight tensor parallelism splits (None: replicated).
_ROW_SPLIT = ("word_embeddings.weight", "linear_qkv.weight", "output_layer.weight")
_COLUMN_SPLIT = ("linear_proj.weight", "linear_fc2.weight")


def _split_axis(name: str) -> int | None:
    if name.endswith(_ROW_SPLIT) or name.endswith("linear_fc1.weight"):
        return 0
    if name.endswith(_COLUMN_SPLIT):
        return 1
    return None


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full weight (SwiGLU fc1 holds [gate_r; up_r] per rank)."""
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]])
    axis = _split_axis(name)
    return full if axis is None else full.chunk(size, dim=axis)[rank]


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates), torch.cat(ups)])
    axis = _split_axis(name)
    return parts[0] if axis is None else torch.cat(parts, dim=axis)


def make_full_weights(model: ModelConfig, position: PositionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random full weights (a TP=1 model's state dict) made in a one-rank world."""
    return parallel.run_on_ranks(_make_full_weights, 1, model, position, seed)[0]


def _make_full_weights(model, position, seed):
    parallel.initialize(1, 1)
    parallel.seed_everything(seed)
    gpt = build_model(model, position)
    with torch.no_grad():  # norms start at 1: perturb them so their gradients matter
        for name, param in gpt.named_parameters():
            if "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return {k: v.clone() for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)}


def run_step(tp: int, cp: int, model, position, weights, tokens) -> dict:
    """Forward + backward of the token-mean loss on tp*cp ranks; results in full shapes."""
    results = parallel.run_on_ranks(_rank_step, tp * cp, tp, cp, model, position, weights, tokens)
    return results[0]


def _rank_step(tp, cp, model, position, weights, tokens):
    ctx = parallel.initialize(tp, cp)
    gpt = build_model(model, position, initialize=False)
    local = {name: shard(name, full, ctx.tp_rank, tp) for name, full in weights.items()}
    missing, unexpected = gpt.load_state_dict(local, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    seq = tokens.size(1)
    local_positions = context_parallel_positions(seq - 1, ctx.cp_rank, cp).long()
    inputs, labels = tokens[:, :-1][:, local_positions], tokens[:, 1:][:, local_positions]
    position_ids = local_positions.expand_as(inputs)
    logits = gpt(inputs, position_ids, None)  # [b, s_local, vocab/tp]
    token_losses = gpt(inputs, position_ids, None, labels=labels)  # [b, s_local]
    loss = token_losses.sum() / (tokens.size(0) * (seq - 1))  # token mean over the un-split batch
    loss.backward()

    cp_group, tp_group = ctx.cp_group, ctx.tp_group
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss, group=cp_group)
    grads = {}
    for name, param in gpt.named_parameters():
        grad = param.grad.detach().clone()
        dist.all_reduce(grad, group=cp_group)  # CP ranks hold the same weights: sum partial grads
        parts = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(parts, grad, group=tp_group)
        grads[name] = unshard(name, parts)
    vocab_parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(vocab_parts, logits.detach().contiguous(), group=tp_group)
    full_vocab = torch.cat(vocab_parts, dim=-1)
    seq_parts = [torch.empty_like(full_vocab) for _ in range(cp)]
    dist.all_gather(seq_parts, full_vocab, group=cp_group)
    ordered = torch.empty(full_vocab.size(0), seq - 1, full_vocab.size(-1))
    for rank, part in enumerate(seq_parts):
        ordered[:, context_parallel_positions(seq - 1, rank, cp).long()] = part
    assert parallel_state.get_context_parallel_world_size() == cp
    return {"loss": total_loss.item(), "logits": ordered, "grads": grads}
