"""The scale of the CPU replication and the configs of its runs: the base model and every
context-extension method, as plain `pretrain_harpe.py` config trees (written to YAML by run.py).

The paper extends Llama2-7B from 4k to 128k with bases in [1e6, 5e6]. Here a tiny model goes
from `base_length` to `target_length` (8x) and every base of the paper is multiplied by
target_length / 131072 (the same ratio of target length to base range):

| method           | position block                                  | schedule                      |
|------------------|-------------------------------------------------|-------------------------------|
| harpe            | per-head bases, peak-valley search in [1e6, 5e6] x r (stride 3e4 x r) | one stage at target |
| abf              | one base 5e6 x r                                | one stage at target           |
| abf_multistage   | base 1e6 x r, 2e6 x r, 5e6 x r | target/4, /2, /1; tokens split in thirds, batch 4x, 2x, 1x |
| pi               | base 10000, positions / (target / base_length)  | one stage at target           |
| none             | base 10000 (unchanged)                          | one stage at target           |

Every method trains on the same extension corpus for the same number of tokens and optimizer
steps (multi-stage ABF's shorter stages take proportionally more sequences per step), with the
loss on the answer digits only (the corpus's loss-mask datasets).

Document masking (`<method>_docmask`, for harpe and abf_multistage): the same run with
`data.reset_attention_mask`, `reset_position_ids` and `eod_mask_loss` on, so a packed window's
short documents no longer see each other and every document's positions start at 0; the paper
(and the other methods here) packs across document boundaries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PAPER_TARGET_LENGTH = 131072
ORIGINAL_BASE = 10000.0
METHODS = ("harpe", "abf", "abf_multistage", "pi", "none")
DOCUMENT_MASKING = ("harpe_docmask", "abf_multistage_docmask")
DOCMASK = "_docmask"
ABLATIONS = ("harpe_multistage", *DOCUMENT_MASKING)
"""Runnable with --methods, not part of the default comparison: harpe_multistage keeps HARPE's
per-head bases but trains through multi-stage ABF's 256 -> 512 -> 1024 curriculum, to separate
the curriculum from the bases; the `_docmask` variants mask documents (see above)."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that sets the size of the experiment (full run and --smoke differ only here)."""

    base_length: int = 128
    target_length: int = 1024
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 8
    ffn_hidden_size: int = 344
    base_tokens: int = 7_000_000
    base_rounds: int = 2
    """The base model trains `base_rounds` runs, each from the previous one's weights (fresh
    optimizer, warm-up and cosine schedule, another data order): base_tokens, then
    later_round_tokens per further round."""
    later_round_tokens: int = 5_000_000
    base_processes: int = 1
    """Data-parallel processes (torchrun) of the base runs; 1 runs them in the worker."""
    extension_tokens: int = 400_000
    short_share: float = 0.2
    base_batch: int = 16
    extension_batch: int = 4
    base_lr: float = 3e-3
    extension_lr: float = 1e-3
    seeds: tuple[int, ...] = (1, 2, 3)
    eval_lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    eval_samples: int = 200
    heldout_documents: int = 200
    """Held-out documents of base_length tokens for the retention table's perplexity."""

    @property
    def ratio(self) -> float:
        """Multiplier of the paper's bases: target length / 131072."""
        return self.target_length / PAPER_TARGET_LENGTH

    def validate(self) -> None:
        if self.target_length % 4 or self.target_length <= self.base_length:
            raise ValueError(f"target_length={self.target_length} must exceed base_length and be divisible by 4")
        if not self.seeds:
            raise ValueError("give at least one seed")


FULL = Scale()
SMOKE = Scale(
    base_length=64,
    target_length=512,
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    base_tokens=8192,
    later_round_tokens=8192,
    base_rounds=1,
    base_processes=1,
    extension_tokens=12288,
    base_batch=8,
    extension_batch=2,
    seeds=(1,),
    eval_lengths=(64, 512),
    eval_samples=4,
    heldout_documents=8,
)


def warmup_steps(total_steps: int, wanted: int) -> int:
    """`wanted` warm-up steps, or a tenth of a short run."""
    return max(0, min(wanted, total_steps // 10))


def model_block(scale: Scale, vocab_size: int) -> dict[str, Any]:
    return {
        "num_layers": scale.num_layers,
        "hidden_size": scale.hidden_size,
        "num_attention_heads": scale.num_attention_heads,
        "ffn_hidden_size": scale.ffn_hidden_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": scale.base_length,
    }


def position_block(method: str, scale: Scale) -> dict[str, Any]:
    """The position encoding of one single-stage method at the target length."""
    r = scale.ratio
    if method == "harpe":
        return {
            "type": "harpe",
            "strategy": "peak_valley",
            "base_min": 1e6 * r,
            "base_max": 5e6 * r,
            "stride": 3e4 * r,
            "max_distance": scale.target_length,
        }
    if method == "abf":
        return {"type": "abf", "base": 5e6 * r}
    if method == "pi":
        return {"type": "pi", "base": ORIGINAL_BASE, "scaling_factor": scale.target_length / scale.base_length}
    if method == "none":
        return {"type": "abf", "base": ORIGINAL_BASE}
    raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")


def base_config(
    scale: Scale, data: dict[str, Any], checkpoint_dir: str, seed: int = 0, pretrained: str | None = None
) -> dict[str, Any]:
    """Pretraining of the base model at base_length with RoPE base 10000 (one round; a later
    round starts from the weights in `pretrained`)."""
    tokens = scale.base_tokens if pretrained is None else scale.later_round_tokens
    return {
        "model": model_block(scale, data["vocab_size"]),
        "position": {"type": "abf", "base": ORIGINAL_BASE},
        "data": {
            "prefixes": [data["base_prefix"]],
            "loss_mask_prefixes": [data["base_mask"]],
            "tokenizer": data["tokenizer"],
            "seq_length": scale.base_length,
            "seed": seed,
        },
        "train": {
            "micro_batch_size": scale.base_batch // scale.base_processes,
            "global_batch_size": scale.base_batch,
            "train_tokens": tokens,
            "lr": scale.base_lr,
            "min_lr": scale.base_lr / 10,
            "lr_schedule": "cosine",
            "weight_decay": 0.01,
            "seed": seed,
            "warmup_steps": warmup_steps(tokens // (scale.base_batch * scale.base_length), 50),
        },
        "checkpoint": {"save": checkpoint_dir, "save_interval": 500, "keep_last": 1, "pretrained": pretrained},
        "logging": {"log_interval": 50},
    }


def extension_config(
    method: str, scale: Scale, data: dict[str, Any], base_checkpoint: str, checkpoint_dir: str, seed: int
) -> dict[str, Any]:
    """Continual pretraining of the base model to target_length with one method; `seed` sets
    the data order and the training seed."""
    if method.endswith(DOCMASK):
        config = extension_config(method.removesuffix(DOCMASK), scale, data, base_checkpoint, checkpoint_dir, seed)
        config["data"].update(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
        return config
    config: dict[str, Any] = {
        "model": model_block(scale, data["vocab_size"]),
        "data": {
            "prefixes": [data["extension_prefix"]],
            "loss_mask_prefixes": [data["extension_mask"]],
            "tokenizer": data["tokenizer"],
            "seq_length": scale.target_length,
            "seed": seed,
        },
        "train": {
            "micro_batch_size": scale.extension_batch,
            "global_batch_size": scale.extension_batch,
            "lr": scale.extension_lr,
            "min_lr": scale.extension_lr / 10,
            "lr_schedule": "cosine",
            "weight_decay": 0.01,
            "seed": seed,
            "warmup_steps": warmup_steps(scale.extension_tokens // (scale.extension_batch * scale.target_length), 10),
        },
        "checkpoint": {"save": checkpoint_dir, "pretrained": base_checkpoint, "save_interval": 0, "keep_last": 1},
        "logging": {"log_interval": 10},
    }
    if method in ("abf_multistage", "harpe_multistage"):
        # the batch grows as the sequences shrink (equal tokens per step) and the single stage's
        # steps are split in thirds, so both schedules run exactly the same tokens and steps
        r, lengths = scale.ratio, (scale.target_length // 4, scale.target_length // 2, scale.target_length)
        tokens_per_step = scale.extension_batch * scale.target_length
        steps = -(-scale.extension_tokens // tokens_per_step)
        thirds = [steps // 3 + (index < steps % 3) for index in range(3)]
        config["stages"] = [
            {
                "seq_length": length,
                "tokens": stage_steps * tokens_per_step,
                "position": position_block("harpe", scale)
                if method == "harpe_multistage"
                else {"type": "abf", "base": base * r},
                "global_batch_size": tokens_per_step // length,
            }
            for length, stage_steps, base in zip(lengths, thirds, (1e6, 2e6, 5e6))
        ]
        config["position"] = config["stages"][-1]["position"]
    else:
        config["position"] = position_block(method, scale)
        config["train"]["train_tokens"] = scale.extension_tokens
    return config
