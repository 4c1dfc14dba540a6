"""Evaluate a megatron_harpe checkpoint directly, sharded with TP and CP.

    python tools/evaluate.py --task passkey --model runs/demo_cpu/checkpoints --lengths 512,1024
    torchrun --nproc-per-node 8 tools/evaluate.py --task niah --model ckpt/harpe \\
        --tensor-parallel 4 --context-parallel 2 --lengths 131072

Every rank runs the same evaluation (prompts are generated from the same seed) and takes part
in each forward pass; each forward is collective and its logits are gathered so every rank sees
the same argmax. Sequences are padded at the end to what the layout needs (`sequence_multiple`:
2*CP chunks under context parallelism, and under sequence parallelism each CP rank's tokens also
split over the TP ranks, which megatron asserts in tensor_parallel/mappings.py): causal attention
keeps padding from influencing the real positions.

Generation is greedy with a KV cache (eval/backends/kv_cache.py): the prompt runs once, sharded over
TP and CP like any forward, then each new token costs a one-token forward; it equals full
recomputation token for token (`kv_cache=False` recomputes, the reference the tests compare
with). Teacher forcing stays available (`--scoring teacher_forcing`).

The tokenizer: `tokenizer=` if given, else the one the checkpoint keeps from its Hugging Face
source (`hf_source/`, written by hf-to-megatron), else the config's `data.tokenizer`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_harpe import collectives, parallel
from megatron_harpe.checkpointing import checkpoint
from megatron_harpe.config import Config
from megatron_harpe.eval.backends.kv_cache import gather_vocabulary, generate_cached
from megatron_harpe.model import build_model
from megatron_harpe.position.rotary import context_parallel_positions


class MegatronBackend:
    """`ModelBackend` over a megatron_harpe GPTModel shard."""

    self_extend = None  # SelfExtendSettings when installed (eval/self_extend/megatron.py)

    def __init__(self, model, config: Config, tokenizer, name: str, generation: bool, kv_cache: bool = True) -> None:
        self.model = model.eval()
        self.kv_cache = kv_cache
        self.config = config
        self.tokenizer = tokenizer
        self.name = name
        self.supports_generation = generation
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.device = next(model.parameters()).device
        self.multiple = sequence_multiple(model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        tensor_parallel: int = 1,
        context_parallel: int = 1,
        tokenizer: str | None = None,
        generation: bool | None = None,
        kv_cache: bool = True,
        trust_remote_code: bool = False,
        self_extend=None,
        **_unused,
    ) -> "MegatronBackend":
        from megatron_harpe.convert.megatron_side import read_checkpoint_spec
        from megatron_harpe.eval.backends.tokenizer import load_tokenizer_any

        spec = read_checkpoint_spec(path)  # a multi-stage run: the encoding of the stage saved in
        config = spec.config
        config.position = spec.position
        tokenizer_path = tokenizer or checkpoint_tokenizer(path, spec)
        if not tokenizer_path or not os.path.exists(tokenizer_path):
            raise ValueError(
                f"no tokenizer for {path}: it keeps no hf_source/ and its config names "
                f"{config.data.tokenizer!r}; pass --tokenizer PATH"
            )
        parallel.initialize(tensor_parallel, context_parallel)
        model = build_model(config.model, config.position, initialize=False)
        checkpoint.load_checkpoint(path, model=model, weights_only=True, load_rng=False)
        if self_extend is not None:
            from megatron_harpe.eval.self_extend.megatron import install_self_extend

            install_self_extend(model, self_extend)
        name = f"megatron:{Path(path).name}"
        # Self-Extend's attention (eval/self_extend/megatron.py) recomputes and keeps no cache
        use_cache = kv_cache and self_extend is None
        backend = cls(
            model,
            config,
            load_tokenizer_any(str(tokenizer_path), trust_remote_code=trust_remote_code),
            name,
            generation if generation is not None else True,
            kv_cache=use_cache,
        )
        backend.self_extend = self_extend
        return backend

    @torch.no_grad()
    def logits(self, ids: list[int], last: int | None = None) -> torch.Tensor:
        """fp32 logits of the last `last` positions (all if None), [n, tokenizer vocab], the
        same on every rank. Only those rows are gathered: at 128k the full table would not fit."""
        length = len(ids)
        last = length if last is None else min(last, length)
        padded = length + (-length) % self.multiple
        tokens = torch.tensor(ids + [0] * (padded - length), device=self.device)[None]
        local_positions = context_parallel_positions(padded, self.cp_rank, self.cp_size).long().to(self.device)
        local_logits = self.model(tokens[:, local_positions], local_positions[None], None)[0]  # [s_local, vocab/tp]
        wanted = (local_positions >= length - last) & (local_positions < length)
        rows = gather_vocabulary(local_logits[wanted].float().contiguous())
        if self.cp_size == 1:
            return rows[:, : self.tokenizer.vocab_size]
        # each CP rank fills the rows it holds; a sum over the CP group assembles them
        result = torch.zeros(last, rows.size(-1), device=self.device)
        result[local_positions[wanted] - (length - last)] = rows
        collectives.all_reduce(result, group=parallel_state.get_context_parallel_group())
        return result[:, : self.tokenizer.vocab_size]

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        if self.kv_cache:
            return generate_cached(self, prompt_ids, max_new_tokens)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(self.logits(prompt_ids + generated, last=1)[-1].argmax())
            if next_id == self.tokenizer.eos_id:
                break
            generated.append(next_id)
        return generated

    def teacher_forced_match(self, prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
        if not answer_ids:
            return []
        logits = self.logits(prompt_ids + answer_ids[:-1], last=len(answer_ids))
        return logits.argmax(dim=-1).tolist()

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        logprobs = torch.log_softmax(self.logits(ids)[:-1], dim=-1)
        targets = torch.tensor(ids[1:], device=logprobs.device)
        return logprobs.gather(1, targets[:, None])[:, 0].cpu()


def sequence_multiple(model) -> int:
    """What the token count of a forward of `model` must be a multiple of on this layout: 2*CP
    under context parallelism (two chunks per rank), times TP under sequence parallelism (each CP
    rank's tokens split over the TP ranks for the norms)."""
    cp = parallel_state.get_context_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    return cp * math.lcm(2 if cp > 1 else 1, tp)


def checkpoint_tokenizer(path: str, spec) -> str | None:
    """The tokenizer a checkpoint brings: its HF source's (`hf_source/`), else the config's."""
    from megatron_harpe.convert.megatron_to_hf import find_tokenizer

    found = find_tokenizer(path, spec, None)
    if found is not None and found.is_dir() and not any(found.glob("tokenizer*")):
        found = spec.config.data.tokenizer  # a source without tokenizer files
    return str(found) if found else None
