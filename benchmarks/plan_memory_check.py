"""The memory planner's estimates against memory measured on CPU, printed as ratios.

    python benchmarks/plan_memory_check.py            # all cases (~2-4 minutes on 2 cores)
    python benchmarks/plan_memory_check.py --quick    # two small cases

Two measurements per case, in fresh processes (TP x CP gloo ranks via `run_on_ranks`):
1. activations, exactly: every tensor autograd saves during one forward pass is seen through
   `torch.autograd.graph.saved_tensors_hooks`; the bytes of their distinct storages (parameters
   and the rotary module's cached tables excluded: the planner counts those apart) are compared
   with `activation_breakdown` (goal: ratio 1.00).
2. peak memory: the process's peak resident memory (`ru_maxrss`) over two training steps
   (forward, backward, AdamW step) minus its resident memory before the model was built, against
   the planner's total for fp32 on CPU (goal: within 20%). The measured process runs the model
   with a plain AdamW (16 bytes per parameter, what the engine keeps sharded, here over one rank)
   and no FSDP2 all-gather buffers, so the planner's engine buffers are left out of the comparison.
   glibc is told to serve every large allocation with mmap (MALLOC_MMAP_THRESHOLD_) so freed
   tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource

import torch

from megatron_harpe.cli import quiet_third_party

quiet_third_party()  # before megatron-core's import: its warnings are not this benchmark's output

from megatron_harpe import parallel  # noqa: E402
from megatron_harpe.config import Config, load_config  # noqa: E402
from megatron_harpe.model import build_model  # noqa: E402
from megatron_harpe.planner.memory import Layout, estimate_memory  # noqa: E402
from megatron_harpe.position.rotary import context_parallel_positions  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    tensor: int = 1
    context: int = 1
    micro_batch: int = 2

    def config(self) -> Config:
        base = (
            "model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
            "model.ffn_hidden_size=1376", "model.vocab_size=8192", "data.seq_length=1024",
            "data.demo_workdir=unused", "train.train_tokens=1", "position.type=harpe",
            "position.strategy=uniform", "position.base_min=1.0e4", "position.base_max=1.0e6",
            f"parallel.tensor={self.tensor}", f"parallel.context={self.context}",
        )  # fmt: skip
        return load_config(None, [*base, *self.overrides]).validate()

    def layout(self) -> Layout:
        train = self.config().train
        return Layout(tensor=self.tensor, context=self.context, micro_batch=self.micro_batch, recompute=train.recompute,
                      recompute_method=train.recompute_method, recompute_num_layers=train.recompute_num_layers,
                      recompute_modules=tuple(train.recompute_modules))  # fmt: skip


CASES = [
    Case("harpe mha", ()),
    Case("harpe gqa 8q/2kv", ("model.num_query_groups=2",)),
    Case("harpe gqa per-query-head", ("model.num_query_groups=2", "position.gqa_bases=per_query_head")),
    Case(
        "abf (one base)",
        (
            "position.type=abf",
            "position.strategy=null",
            "position.base=5.0e5",
            "position.base_min=null",
            "position.base_max=null",
        ),
    ),  # fmt: skip
    Case("harpe seq 2048, batch 1", ("data.seq_length=2048",), micro_batch=1),
    Case("harpe tp2", (), tensor=2),
    Case("harpe cp2", (), context=2),
    Case("harpe gqa tp2 cp2", ("model.num_query_groups=4",), tensor=2, context=2),
    # megatron's recompute: the first 2 of 4 layers keep only their inputs; the MLPs rerun
    Case("harpe block 2/4", ("train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=2")),
    Case("harpe selective mlp", ("train.recompute=selective", "train.recompute_modules=[mlp]")),
]


def _inputs(cfg: Config, case: Case, ctx: parallel.ParallelContext) -> tuple[torch.Tensor, torch.Tensor]:
    seq = cfg.data.seq_length
    local = seq // case.context
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (case.micro_batch, local), generator=generator)
    positions = context_parallel_positions(seq, ctx.cp_rank, ctx.cp_size).long().expand(case.micro_batch, local)
    return tokens, positions


def measure_rank(case: Case) -> tuple[int, int]:
    """On this rank: (distinct bytes autograd keeps for backward after one forward pass, peak
    resident memory over two training steps above the resident memory before the model)."""
    import psutil

    cfg = case.config()
    ctx = parallel.initialize(case.tensor, case.context)
    parallel.seed_everything(0)
    before = psutil.Process().memory_info().rss
    model = build_model(cfg.model, cfg.position, recompute=cfg.train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens, positions = _inputs(cfg, case, ctx)
    for step in range(2):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        with hooks if step == 0 else contextlib.nullcontext():
            loss = model(tokens, positions, None, labels=tokens).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    # the rotary module's cached angle tables and cos/sin: the planner counts them as rotary tables
    # (megatron's recompute saves the table it passes its checkpointed layers; the rotation saves cos/sin)
    cached = {id(table): table for pair in model.rotary_pos_emb._cache.values() for table in pair}.values()
    rotary = {tensor.untyped_storage().data_ptr() for table in cached
              for tensor in (table, table.rotary_cos_sin.cos, table.rotary_cos_sin.sin,
                             *(x for pair in table.rotary_cos_sin._cast.values() for x in pair))}  # fmt: skip
    return sum(size for pointer, size in kept.items() if pointer not in rotary), peak


def estimated(case: Case):
    return estimate_memory(case.config(), case.layout(), device="cpu")


def expected_peak(estimate) -> int:
    """The planner's total for a process without the engine's unsharded copies (see point 2)."""
    return estimate.total - sum(estimate.unit_buffers.values())


def measure(case: Case) -> tuple[int, int]:
    """(saved activation bytes, peak bytes), each the largest over the case's ranks (spawned fresh)."""
    results = parallel.run_on_ranks(measure_rank, case.tensor * case.context, case)
    return max(saved for saved, _ in results), max(peak for _, peak in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two cases only")
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned ranks
    cases = CASES[:2] if args.quick else CASES
    print(f"{'case':28s} {'TPxCP':>5s} | {'activations: measured':>21s} {'estimate':>9s} {'ratio':>6s} | "
          f"{'peak: measured':>14s} {'estimate':>9s} {'ratio':>6s}")  # fmt: skip
    peak_ratios = []
    for case in cases:
        estimate = estimated(case)
        saved, peak = measure(case)
        expected = expected_peak(estimate)
        peak_ratios.append(peak / expected)
        print(
            f"{case.name:28s} {case.tensor}x{case.context:<3d} | {saved / 2**20:17.1f} MiB "
            f"{estimate.activations / 2**20:5.1f} MiB"
            f" {saved / estimate.activations:6.3f} | {peak / 2**20:10.1f} MiB {expected / 2**20:5.1f} MiB "
            f"{peak / expected:6.3f}"
        )
    worst = max(peak_ratios, key=lambda ratio: abs(ratio - 1))
    print(f"peak memory: worst measured/estimated ratio {worst:.3f} (goal: within 0.80-1.20)")


if __name__ == "__main__":
    main()
