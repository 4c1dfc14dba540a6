"""Step time and saved activations of document masking against plain causal attention, side by
side on the CPU (sdpa backend), with and without context parallelism.

    python benchmarks/document_masking.py                      # seq 4096, CP 1 and 2
    python benchmarks/document_masking.py --seq 2048 --steps 2

The same model and tokens train unmasked (documents packed, attention across them) and masked
(`data.reset_attention_mask` + `reset_position_ids`: documents.py's runs, per-token rotary
tables), for three document-length profiles of the packed sequence:
- one: the sequence is a single document (the masked path's own overhead);
- long: documents of 1/4 .. 1/2 of the sequence (length-upsampled data);
- short: documents of 32 .. 256 tokens (many runs, merged into block-diagonal tiles).
Step time is the best of --steps training steps (forward, backward, AdamW; masked and unmasked
steps interleaved, so a change of machine load hits both) on the slowest rank, as wall time and
as the process's CPU time (steadier on a shared machine); activations are the distinct storages
autograd saves for backward in one forward (`torch.autograd.graph.saved_tensors_hooks`). Each
layout runs in fresh gloo processes.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from megatron_harpe.cli import quiet_third_party

quiet_third_party()  # before megatron-core's import: its warnings are not this benchmark's output

from context_parallel import benchmark_model  # noqa: E402

from megatron_harpe import parallel  # noqa: E402
from megatron_harpe.data.loader import slice_for_context_parallel  # noqa: E402
from megatron_harpe.documents import DocumentMask, document_ids, document_positions  # noqa: E402
from megatron_harpe.model import forward_micro_batch  # noqa: E402

EOD = 0
PROFILES = {"one": None, "long": (4, 2), "short": (32, 256)}


def document_lengths(profile: str, seq: int, rng: random.Random) -> list[int]:
    if PROFILES[profile] is None:
        return [seq]
    low, high = PROFILES[profile]
    if profile == "long":
        low, high = seq // low, seq // high
    lengths, left = [], seq
    while left:
        lengths.append(min(left, rng.randint(low, high)))
        left -= lengths[-1]
    return lengths


def packed_tokens(profile: str, seq: int, vocab: int) -> torch.Tensor:
    rng = random.Random(0)
    documents = [[rng.randrange(1, vocab) for _ in range(n - 1)] + [EOD] for n in document_lengths(profile, seq, rng)]
    return torch.tensor([token for document in documents for token in document])[None]


def keep(tensor: torch.Tensor, kept: dict[int, int], parameters: set[int]) -> torch.Tensor:
    """A saved-tensors pack hook: note the bytes of each distinct non-parameter storage."""
    storage = tensor.untyped_storage()
    if storage.data_ptr() not in parameters:
        kept[storage.data_ptr()] = storage.nbytes()
    return tensor


def measure(context: int, seq: int, steps: int) -> dict:
    ctx, model_cfg, model, optimizer = benchmark_model(context, seq)  # the context-parallel benchmark's model
    parameters = {param.untyped_storage().data_ptr() for param in model.parameters()}
    batches, documents = {}, {}
    for profile in PROFILES:
        tokens = packed_tokens(profile, seq + 1, model_cfg.vocab_size)
        ids = document_ids(tokens[:, :-1], EOD)
        whole = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(1, seq),
            "position_ids": torch.arange(seq)[None],
        }
        for masked in (False, True):
            batch = dict(whole, position_ids=document_positions(ids)) if masked else whole
            batch = slice_for_context_parallel(batch, ctx.cp_rank, context)
            if masked:
                batch["document_ids"] = ids
            batches[(profile, masked)] = batch
        documents[profile] = DocumentMask(ids).documents_per_sequence()
    times: dict = {key: [] for key in batches}
    saved: dict = {}
    for _ in range(steps):  # masked and unmasked steps interleaved: a change of machine load hits both
        for (profile, masked), batch in batches.items():
            kept: dict[int, int] = {}
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.autograd.graph.saved_tensors_hooks(lambda tensor: keep(tensor, kept, parameters), lambda t: t):
                loss = forward_micro_batch(model, batch, per_token_positions=masked).sum() / seq
            loss.backward()
            for param in model.parameters():  # CP ranks hold the same weights: sum partial gradients
                torch.distributed.all_reduce(param.grad, group=ctx.cp_group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[(profile, masked)].append((time.perf_counter() - start, time.process_time() - cpu_start))
            saved[(profile, masked)] = sum(kept.values()) / 2**20
    results = {
        key: {
            "step_s": min(wall for wall, _ in times[key]),
            "cpu_s": min(cpu for _, cpu in times[key]),
            "saved_mib": saved[key],
            "documents": documents[key[0]],
        }
        for key in batches
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--context", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(
        f"4 layers x hidden 256 x 8 heads (4 k/v groups), sdpa on CPU, sequence {args.seq}, best of {args.steps} steps"
    )
    print("ratios are masked / unmasked; CPU seconds are this process's (all its threads), the slowest rank's")
    print(f"{'CP':>3} {'documents':>12} {'wall s':>13} {'wall ratio':>11} {'CPU s':>13} {'CPU ratio':>10} "
          f"{'saved MiB':>15} {'memory ratio':>13}")  # fmt: skip
    for context in args.context:
        per_rank = parallel.run_on_ranks(measure, context, context, args.seq, args.steps)
        for profile in PROFILES:
            plain, masked = ({key: max(r[(profile, m)][key] for r in per_rank)
                              for key in ("step_s", "cpu_s", "saved_mib")} for m in (False, True))  # fmt: skip
            documents = per_rank[0][(profile, True)]["documents"]
            print(
                f"{context:>3} {profile + f' ({documents:.0f})':>12} "
                f"{plain['step_s']:>6.2f}/{masked['step_s']:<6.2f} {masked['step_s'] / plain['step_s']:>11.2f} "
                f"{plain['cpu_s']:>6.2f}/{masked['cpu_s']:<6.2f} {masked['cpu_s'] / plain['cpu_s']:>10.2f} "
                f"{plain['saved_mib']:>7.1f}/{masked['saved_mib']:<7.1f} "
                f"{masked['saved_mib'] / plain['saved_mib']:>13.2f}"
            )


if __name__ == "__main__":
    main()
