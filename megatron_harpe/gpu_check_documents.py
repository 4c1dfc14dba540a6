"""The document-masking rows of `scripts/gpu_check.sh` (`--only documents`): packed documents
give the logits of each document alone, on the attention backends this machine has.

Rows (SKIP where the machine cannot run them):
- sdpa on the CPU (fp32): the reference behaviour, also the tool's own dry path;
- sdpa on the GPU: packed against alone on the GPU, and against the CPU;
- Transformer Engine, THD with cu_seqlens (thd.py): packed against each document alone on TE,
  one GPU and (2+ GPUs) context parallel 2 with every document padded to a multiple of 4 and
  split per document;
- our THD split against TE's own `thd_get_partitioned_indices`.
A tiny HARPE model with GQA (bases per k/v group) holds 256 tokens in five documents: shorter
than a CP chunk, one token long, and crossing chunks. Its weights are written once by a CPU run
(without TE) and loaded everywhere, as the main logits check does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_harpe.gpu_check_common import CheckResult, compare, visible_devices

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             vocab_size=4096, max_position_embeddings=256)  # fmt: skip
BASES = [500.0, 50000.0]
LENGTHS = [37, 5, 100, 1, 113]
EOD = 3
WEIGHTS = "documents_weights"


def tree(backend: str, context: int) -> dict:
    return {
        "model": {**MODEL, "attention_backend": backend},
        "position": {"type": "harpe", "bases": list(BASES)},
        "parallel": {"context": context},
        "data": {"prefixes": ["unused"], "seq_length": sum(LENGTHS), "reset_position_ids": True,
                 "reset_attention_mask": True},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "train_tokens": sum(LENGTHS)},
    }  # fmt: skip


def packed_batch() -> dict[str, torch.Tensor]:
    from megatron_harpe.documents import document_ids, document_positions

    generator = torch.Generator().manual_seed(11)
    pieces = [torch.cat([torch.randint(4, MODEL["vocab_size"], (n - 1,), generator=generator), torch.tensor([EOD])])
              for n in LENGTHS]  # fmt: skip
    tokens = torch.cat(pieces)[None]
    return {
        "tokens": tokens,
        "labels": tokens,
        "loss_mask": torch.ones(tokens.shape),
        "position_ids": document_positions(document_ids(tokens, EOD)),
    }


def _documents_rank(config_tree: dict, checkpoint_dir: str, save: bool) -> dict:
    """Packed logits [S, V] in sequence order (CP ranks gathered), and with CP 1 each document's
    logits alone; plus our THD split against TE's where TE runs."""
    from megatron_harpe import collectives, parallel
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.gpu_check_logits import compared_model, device_autocast
    from megatron_harpe.model import forward_micro_batch
    from megatron_harpe.training.data import prepare_documents

    cfg = from_dict(Config, config_tree).validate()
    cp = cfg.parallel.context
    ctx = parallel.initialize(1, cp)
    model = compared_model(cfg, checkpoint_dir, save)
    batch = packed_batch()
    local = {
        key: value.to(ctx.device) for key, value in prepare_documents(batch, cfg, ctx, EOD).items() if key != "labels"
    }
    with torch.no_grad(), device_autocast(ctx.device):
        logits = forward_micro_batch(model, local, per_token_positions=True).float()[0]  # [local tokens, V]
        alone = None
        if cp == 1:
            alone = torch.cat([model(batch["tokens"][:, start:end].to(ctx.device),
                                     torch.arange(end - start, device=ctx.device)[None], None).float()[0]
                               for start, end in _spans()])  # fmt: skip
    parts = collectives.all_gather(logits.contiguous(), group=ctx.cp_group) if cp > 1 else [logits]
    result = {"packed": _sequence_order(parts, local, cp).cpu(), "alone": None if alone is None else alone.cpu()}
    if cfg.model.attention_backend == "te":
        result["partition_mismatches"] = _partition_mismatches()
    return result


def _spans() -> list[tuple[int, int]]:
    bounds = torch.tensor([0, *LENGTHS]).cumsum(0).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _sequence_order(parts: list[torch.Tensor], local: dict, cp: int) -> torch.Tensor:
    """The ranks' logits back in the order of the packed sequence, padding dropped."""
    from megatron_harpe.parallel import context_parallel_indices
    from megatron_harpe.thd import partition_indices

    if "cu_seqlens_padded" not in local:  # sdpa: the ranks hold chunks of the sequence itself
        ordered = torch.empty(sum(LENGTHS), parts[0].size(-1), device=parts[0].device)
        for rank, part in enumerate(parts):
            ordered[context_parallel_indices(sum(LENGTHS), rank, cp).to(part.device)] = part
        return ordered
    cu_padded = local["cu_seqlens_padded"].cpu()
    stream = torch.empty(int(cu_padded[-1]), parts[0].size(-1), device=parts[0].device)
    for rank, part in enumerate(parts):
        stream[partition_indices(cu_padded, cp, rank).to(part.device)] = part
    lengths = (local["cu_seqlens"][1:] - local["cu_seqlens"][:-1]).tolist()
    return torch.cat([stream[int(start) : int(start) + n] for start, n in zip(cu_padded[:-1].tolist(), lengths)])


def _partition_mismatches() -> int:
    """How many of our THD indices differ from `transformer_engine_torch.thd_get_partitioned_indices`."""
    import transformer_engine_torch as tex

    from megatron_harpe.thd import padded_lengths, partition_indices

    mismatches = 0
    for cp in (2, 4):
        padded = padded_lengths([37, 5, 100, 1, 113, 64], cp)
        cu = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
        for rank in range(cp):
            theirs = tex.thd_get_partitioned_indices(cu.cuda(), int(cu[-1]), cp, rank).cpu().long()
            mismatches += int((theirs != partition_indices(cu, cp, rank)).sum())
    return mismatches


def check_document_masking(args, workdir: Path) -> list[CheckResult]:
    """The document-masking rows (see the module docstring)."""
    from megatron_harpe.parallel import run_on_ranks
    from megatron_harpe.te_backend import transformer_engine_available

    checkpoint = str(workdir / WEIGHTS)
    with visible_devices("cpu"):
        cpu = run_on_ranks(_documents_rank, 1, tree("sdpa", 1), checkpoint, True)[0]
    results = [compare("documents: sdpa packed = alone (cpu, fp32)", cpu["packed"], cpu["alone"], 1e-4, 1e-4)]
    gpu_tolerance = (0.02, args.logit_atol)
    if args.device != "cuda":
        return results + [CheckResult("documents: sdpa / te on GPU", "SKIP", "needs CUDA")]
    with visible_devices("cuda"):
        sdpa = run_on_ranks(_documents_rank, 1, tree("sdpa", 1), checkpoint, False)[0]
    results += [compare("documents: sdpa packed = alone (gpu)", sdpa["packed"], sdpa["alone"], *gpu_tolerance),
                compare("documents: sdpa packed gpu vs cpu", sdpa["packed"], cpu["alone"], *gpu_tolerance)]  # fmt: skip
    if not transformer_engine_available():
        return results + [CheckResult("documents: te THD", "SKIP", "Transformer Engine not installed")]
    with visible_devices("cuda"):
        te = run_on_ranks(_documents_rank, 1, tree("te", 1), checkpoint, False)[0]
    results += [compare("documents: te THD packed = alone", te["packed"], te["alone"], *gpu_tolerance),
                compare("documents: te THD packed vs cpu", te["packed"], cpu["alone"], *gpu_tolerance)]  # fmt: skip
    mismatches = te["partition_mismatches"]
    results.append(CheckResult("documents: THD split = TE's thd_get_partitioned_indices",
                               "FAIL" if mismatches else "PASS",
                               f"{mismatches} indices differ (CP 2 and 4, every rank)"))  # fmt: skip
    if args.gpus < 2:
        return results + [CheckResult("documents: te THD context parallel 2", "SKIP", "needs 2 GPUs")]
    with visible_devices("cuda"):
        te_cp2 = run_on_ranks(_documents_rank, 2, tree("te", 2), checkpoint, False)[0]
    results.append(compare("documents: te THD CP2 packed = alone", te_cp2["packed"], te["alone"], *gpu_tolerance))
    return results
