"""gpu_check's forward check (megatron_harpe/gpu_check.py): a tiny HARPE model's logits on the
device, with each attention backend there (Transformer Engine loaded from a checkpoint written
without it), against the same weights on the CPU; and HARPE with all bases equal against stock RoPE.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=4096,
            max_position_embeddings=256)  # fmt: skip
BASES = [500.0, 5000.0, 50000.0, 500000.0]
CHECKPOINT = "logits_reference_weights"


def _tree(position: dict) -> dict:
    return {"model": dict(TINY), "position": position, "data": {"demo_workdir": "unused", "seq_length": 256},
            "train": {"train_tokens": 1}}  # fmt: skip


def compared_model(cfg, checkpoint_dir: str, save: bool):
    """The model of `cfg` (in eval mode) with the weights a check compares across runs: the CPU
    reference initialises them (seed 7) and saves them, every other run loads them (Transformer
    Engine from a checkpoint written without it). Needs `parallel.initialize` first."""
    from megatron_harpe import parallel
    from megatron_harpe.checkpointing.checkpoint import load_checkpoint, save_checkpoint
    from megatron_harpe.model import build_model

    parallel.seed_everything(7)
    model = build_model(cfg.model, cfg.position)
    if save:
        save_checkpoint(checkpoint_dir, 0, model=model, config=cfg.to_dict(), train_state={})
    else:
        load_checkpoint(checkpoint_dir, model=model, weights_only=True, load_rng=False)
    return model.eval()


def device_autocast(device: torch.device):
    """bf16 autocast on a GPU (as the checks' tolerances assume), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _logits_rank(tree: dict, checkpoint_dir: str, save: bool, backend: str) -> list:
    """Logits for fixed tokens; the CPU reference initialises and saves the weights first."""
    from megatron_harpe import parallel
    from megatron_harpe.config import Config, from_dict

    tree = {**tree, "model": {**tree["model"], "attention_backend": backend}}
    cfg = from_dict(Config, tree).validate()
    ctx = parallel.initialize(1, 1)
    model = compared_model(cfg, checkpoint_dir, save)
    tokens = torch.arange(64, device=ctx.device)[None] * 37 % TINY["vocab_size"]
    positions = torch.arange(64, device=ctx.device)[None]
    with torch.no_grad(), device_autocast(ctx.device):
        return [model(tokens, positions, None).float().cpu()]


def check_logits(args, workdir: Path) -> list:
    from megatron_harpe.gpu_check_common import CheckResult, compare, visible_devices
    from megatron_harpe.parallel import run_on_ranks
    from megatron_harpe.te_backend import transformer_engine_available

    harpe = _tree({"type": "harpe", "bases": list(BASES)})
    checkpoint = str(workdir / CHECKPOINT)
    with visible_devices("cpu"):
        (reference,) = run_on_ranks(_logits_rank, 1, harpe, checkpoint, True, "sdpa")[0]
        (equal,) = run_on_ranks(
            _logits_rank, 1, _tree({"type": "harpe", "bases": [1e4] * 4}), checkpoint, False, "sdpa"
        )[0]
        (stock,) = run_on_ranks(_logits_rank, 1, _tree({"type": "abf", "base": 1e4}), checkpoint, False, "sdpa")[0]
    results = [compare("logits: equal bases = stock RoPE (cpu)", equal, stock, 0.0, 1e-5)]
    backends = ["sdpa"] + (["te"] if args.device == "cuda" and transformer_engine_available() else [])
    for backend in backends:
        with visible_devices(args.device):
            (got,) = run_on_ranks(_logits_rank, 1, harpe, checkpoint, False, backend)[0]
        results.append(compare(f"logits: {backend} on {args.device} vs cpu", got, reference, 0.02, args.logit_atol))
    if "te" not in backends:
        results.append(
            CheckResult("logits: te vs cpu", "SKIP", "Transformer Engine needs CUDA and is not available here")
        )
    return results
