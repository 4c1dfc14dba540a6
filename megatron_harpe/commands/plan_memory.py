"""Plan a run before asking for GPUs: per-GPU memory with headroom, FLOPs per token, step time,
and the parallel layouts and recompute settings that fit, fastest first.

    # the paper's run: Llama2-7B at 131072 tokens on 32 x 80 GB
    harpe-plan-memory --config configs/llama2_7b_128k_harpe.yaml --gpus 32 --gpu-memory 80

    # 8 GPUs of one node; another recompute for the detailed layout (any config key can be overridden)
    harpe-plan-memory --config configs/llama2_7b_128k_harpe.yaml --gpus 8 --train.recompute full --train.recompute_method block --train.recompute_num_layers 16

    # detail one layout, with config overrides as for pretrain_harpe.py
    harpe-plan-memory --config configs/demo_cpu.yaml --gpus 2 --gpu-memory 16 --tensor-parallel 1 --context-parallel 2 --train.micro_batch_size 2

(`python tools/plan_memory.py` is the same command.)

Memory is an upper bound for one rank at its peak: the sharding engine's state (PyTorch FSDP2 over
DP x CP: fp32 weights, gradients and AdamW moments sharded; one or two layers all-gathered at a
time), one micro-batch of activations under the recompute setting, rotary tables, the largest
transient buffer, and the headroom a GPU needs beyond those tensors: the CUDA context, NCCL's
buffers per communicator and allocator fragmentation (--cuda-context-gib, --nccl-gib-per-group,
--fragmentation; figures and sources in megatron_harpe/planner/engine_memory.py, formulas in
megatron_harpe/planner/memory.py). A layout fits when all of it is within --gpu-memory.
`--precision trainer` (default) is what pretrain_harpe.py will do (training/mixed_precision.py).
For each TP x CP x DP x micro-batch the planner weighs no recompute, selective recompute (core
attention, MLP, both), full recompute, and the fewest leading layers whose recompute makes it fit
(`recompute_method: block`); the fastest that fits is recommended, with the `train:` and
`parallel:` keys that select it. The step time adds to compute the communication compute does not
hide (TP, CP, the engine's DP x CP traffic over NVLink inside a node and InfiniBand between nodes).
"""  # noqa: E501 - each example stays on one line in --help (tests/unit/test_cli_vocabulary.py)

from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_harpe import cli
from megatron_harpe.config import Config, load_config
from megatron_harpe.planner.engine_memory import HEADROOM_SOURCES, Headroom
from megatron_harpe.planner.memory import (
    CP_COMM_CHOICES,
    ENGINE,
    GIB,
    PRECISIONS,
    RECOMPUTE_CHOICES,
    Hardware,
    Layout,
    LayoutPlan,
    config_layout,
    estimate_memory,
    estimate_step,
    longest_stage,
    rank_layouts,
    schedule_seconds,
    trainer_precision,
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser_for(__doc__)
    parser.add_argument("--config", required=True, help="the YAML run config to plan (see configs/)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs for the whole job")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument(
        "--cuda-context-gib",
        type=float,
        default=Headroom.cuda_context_gib,
        help=f"headroom for the CUDA context and workspaces (default {Headroom.cuda_context_gib})",
    )
    parser.add_argument(
        "--nccl-gib-per-group",
        type=float,
        default=Headroom.nccl_gib_per_group,
        help=f"headroom per NCCL communicator (default {Headroom.nccl_gib_per_group})",
    )
    parser.add_argument(
        "--fragmentation",
        type=float,
        default=Headroom.fragmentation,
        help=f"headroom for allocator fragmentation, fraction of the tensors (default {Headroom.fragmentation})",
    )
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100: 989)")
    parser.add_argument("--utilization", type=float, default=0.4, help="fraction of peak sustained (default 0.4)")
    parser.add_argument(
        "--precision",
        choices=["trainer", *PRECISIONS],
        default="trainer",
        help="trainer (default): what pretrain_harpe.py will do with this config; or a fixed one",
    )
    parser.add_argument("--cpu", action="store_true", help="plan CPU processes (fp32, the CPU attention path)")
    parser.add_argument("--backend", choices=["sdpa", "te"], default=None, help="default: model.attention_backend")
    parser.add_argument("--cp-comm", choices=CP_COMM_CHOICES, default=None, help="te: p2p (default) | a2a | all_gather")
    parser.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="te backend: split norms over TP (default: parallel.sequence_parallel)",
    )
    parser.add_argument("--nvlink-gbs", type=float, default=360.0, help="GB/s a GPU sends inside a node (default 360)")
    parser.add_argument("--ib-gbs", type=float, default=40.0, help="GB/s a GPU sends between nodes (default 40)")
    cli.add_parallel(
        parser,
        tensor="layout to detail (default: parallel.tensor)",
        context="layout to detail (default: parallel.context)",
        default=None,
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="default: train.micro_batch_size")
    parser.add_argument(
        "--recompute",
        choices=RECOMPUTE_CHOICES,
        default=None,
        help="granularity of the detailed layout (default: train.recompute; method, layers and "
        "modules: --train.recompute_method etc.)",
    )
    parser.add_argument("--top", type=int, default=10, help="how many fitting layouts to list")
    cli.add_common_flags(parser)
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The tool's flags and the config overrides (`--section.key value`) among `argv`."""
    return cli.parse_with_overrides(build_parser(), argv)


def gib(value: float) -> str:
    if value < GIB:
        return f"{value / 2**20:8.1f} MiB"
    return f"{value / GIB:8.2f} GiB"


def detailed_layout(args: argparse.Namespace, cfg: Config) -> Layout:
    """The layout to detail: the config's own, with --tensor-parallel/--context-parallel/--micro-batch applied,
    checked by the config's own validation (heads, vocabulary, sequence and batch divisibility)."""
    cfg.parallel.tensor = args.tensor_parallel or cfg.parallel.tensor
    cfg.parallel.context = args.context_parallel or cfg.parallel.context
    cfg.train.micro_batch_size = args.micro_batch or cfg.train.micro_batch_size
    cfg.validate(world_size=args.gpus, require_backend=False)
    if args.recompute and args.recompute != cfg.train.recompute:
        cfg.train.recompute, cfg.train.recompute_method, cfg.train.recompute_num_layers = (
            args.recompute,
            "uniform",
            None,
        )
        cfg.train.recompute_modules = ["core_attn"]
    layout = config_layout(cfg, args.gpus)
    return dataclasses.replace(
        layout,
        sequence_parallel=args.sequence_parallel and layout.tensor > 1,
        cp_comm=args.cp_comm or _default_cp_comm(cfg, args),
    )


def _default_cp_comm(cfg: Config, args: argparse.Namespace) -> str:
    if args.backend and args.backend != cfg.model.attention_backend:
        return "p2p" if args.backend == "te" else "all_gather"
    return cfg.parallel.resolved_cp_comm_type(cfg.model)


def _apply_config_defaults(args: argparse.Namespace, cfg: Config) -> None:
    """Switches not given on the command line come from the config's `parallel` section."""
    if args.sequence_parallel is None:
        args.sequence_parallel = cfg.parallel.sequence_parallel


def describe(cfg: Config, plan: LayoutPlan, hardware: Hardware, backend: str) -> list[str]:
    memory, step, layout = plan.memory, plan.step, plan.layout
    layers = cfg.model.num_layers
    lines = [
        f"layout: tensor {layout.tensor} x context {layout.context} x data {layout.data}, micro-batch "
        f"{layout.micro_batch}, recompute {layout.recompute_label(layers)}, backend {backend}"
        + (f" (cp {layout.cp_comm})" if layout.context > 1 else "")
        + (", sequence parallel" if layout.sequence_parallel else ""),
        f"  engine            {ENGINE}: {layout.data * layout.context} ranks; {memory.precision.name}",
        f"  sharded state     {gib(sum(memory.sharded.values()))}   {memory.parameters / 1e9:.3f}B parameters per TP "
        f"rank / {layout.data * layout.context}: "
        + ", ".join(f"{kind} {gib(value).strip()}" for kind, value in memory.sharded.items()),
        f"  engine buffers    {gib(sum(memory.unit_buffers.values()))}",
    ]  # fmt: skip
    for kind, value in memory.unit_buffers.items():
        lines.append(f"      {kind:72s} {gib(value)}")
    if memory.autocast_copies:
        lines.append(f"  autocast copies   {gib(memory.autocast_copies)}   bf16 weights kept from forward to backward")
    by_recompute = ", ".join(f"{name} {gib(value).strip()}" for name, value in memory.activations_by_recompute.items())
    lines.append(f"  activations       {gib(memory.activations)}   ({by_recompute})")
    for kind, value in sorted(memory.activation_breakdown.items(), key=lambda item: -item[1]):
        lines.append(f"      {kind:38s} {gib(value)}")
    lines.append(f"  rotary tables     {gib(memory.rotary_tables)}")
    for kind, value in memory.transient.items():
        lines.append(f"  transient         {gib(value)}   {kind}")
    lines.append(f"  tensors           {gib(memory.tensors)}")
    for kind, value in memory.headroom.items():
        lines.append(f"  headroom          {gib(value)}   {kind}")
    verdict = "fits" if plan.fits(hardware) else "DOES NOT FIT"
    lines.append(
        f"  total             {gib(memory.total)}   of {hardware.memory_gib:g} GiB with the headroom: {verdict}"
    )
    comm = ", ".join(f"{dim} {volume / GIB:.1f}" for dim, volume in step.communication_bytes.items()) or "0"
    model_utilization = (
        step.tokens_per_step
        * step.model_flops_per_token
        / (step.step_seconds * layout.gpus * hardware.peak_tflops * 1e12)
    )  # communication included
    lines.append(f"  step time         {step.step_seconds:8.2f} s    at {hardware.utilization:.0%} of "
                 f"{hardware.peak_tflops:g} TFLOP/s (model FLOPs utilisation {model_utilization:.0%})")  # fmt: skip
    lines.append(f"  sent per GPU      {comm} GiB per step; compute {step.compute_seconds:.2f} s + exposed "
                 f"communication {step.exposed_communication_seconds:.2f} s")  # fmt: skip
    for item in step.communication:
        hidden = f"hidden by {item.hidden_by}" if item.hidden_by else "on the critical path"
        lines.append(f"      {item.dimension:8s} {item.what:58s} {item.sent_bytes / GIB:8.1f} GiB over {item.link:10s} "
                     f"{item.seconds:7.2f} s, {hidden}: {item.exposed_seconds:.2f} s exposed")  # fmt: skip
    lines.append(f"  assumed links     NVLink {hardware.nvlink_gbs:g} GB/s per GPU inside a node of "
                 f"{hardware.gpus_per_node}, InfiniBand {hardware.ib_gbs:g} GB/s per GPU between nodes "
                 "(--nvlink-gbs, --ib-gbs, --gpus-per-node)")  # fmt: skip
    return lines


def config_keys(layout: Layout) -> str:
    """The `parallel:` and `train:` keys that run `layout`."""
    keys = [f"parallel.tensor={layout.tensor}", f"parallel.context={layout.context}",
            f"train.micro_batch_size={layout.micro_batch}", f"train.recompute={layout.recompute}"]  # fmt: skip
    if layout.recompute == "full":
        keys.append(f"train.recompute_method={layout.recompute_method}")
        if layout.recompute_num_layers is not None:
            keys.append(f"train.recompute_num_layers={layout.recompute_num_layers}")
    if layout.recompute == "selective":
        keys.append(f"train.recompute_modules=[{', '.join(layout.recompute_modules)}]")
    return " ".join(keys)


def total_hours(cfg: Config, layout: Layout, hardware: Hardware, precision, backend: str) -> float:
    return schedule_seconds(cfg, layout, hardware, precision, backend) / 3600


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides).validate(require_backend=False)
    except ValueError as error:
        return cli.report_user_error(error)
    _apply_config_defaults(args, cfg)
    try:
        layout = detailed_layout(args, cfg)
    except ValueError as error:
        if args.tensor_parallel or args.context_parallel or args.micro_batch:
            print(f"layout error: {error}", file=sys.stderr)
            return 2
        print(f"note: the config's own layout does not suit {args.gpus} GPUs ({error}); detailing the fastest "
              "layout that fits instead\n")  # fmt: skip
        layout = None
    backend = args.backend or cfg.model.attention_backend
    hardware = Hardware(
        args.gpu_memory,
        args.peak_tflops,
        args.utilization,
        args.gpus_per_node,
        nvlink_gbs=args.nvlink_gbs,
        ib_gbs=args.ib_gbs,
        headroom=Headroom(args.cuda_context_gib, args.nccl_gib_per_group, args.fragmentation),
    )
    device = "cpu" if args.cpu else "gpu"
    try:
        precision = trainer_precision(cfg, device) if args.precision == "trainer" else PRECISIONS[args.precision]
    except ValueError as error:  # a precision the trainer refuses on this device
        return cli.report_user_error(error)
    plans = rank_layouts(
        cfg, hardware, args.gpus, precision, backend=backend, device=device,
        sequence_parallel=args.sequence_parallel, cp_comm=args.cp_comm or _default_cp_comm(cfg, args),
    )  # fmt: skip
    if layout is None:
        if not plans:
            print("no layout fits: add GPUs, shorten the sequence, or try --optimizer-sharding / --backend te "
                  "--sequence-parallel")  # fmt: skip
            return 1
        layout = plans[0].layout
    stage = longest_stage(cfg)
    model = cfg.model
    step = estimate_step(cfg, layout, hardware, precision, backend=backend)
    print(
        f"model: {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads / "
        f"{model.kv_groups} k/v groups, vocabulary {model.vocab_size}: "
        f"{estimate_memory(cfg, Layout(), precision).parameters / 1e9:.3f}B parameters\n"
        f"sequence {stage.seq_length:,} tokens x global batch {stage.global_batch_size} = "
        f"{step.tokens_per_step:,} tokens per step\n"
        f"FLOPs per token (forward + backward): {step.model_flops_per_token:.3e} "
        f"(executed with recompute {layout.recompute}: {step.executed_flops_per_token:.3e})\n"
        f"{args.gpus} GPUs x {args.gpu_memory:g} GiB, {args.gpus_per_node} per node\n"
    )
    detail = LayoutPlan(layout, estimate_memory(cfg, layout, precision, backend=backend, device=device,
                                                hardware=hardware), step)  # fmt: skip
    print("\n".join(describe(cfg, detail, hardware, backend)))
    print(f"  whole schedule    {total_hours(cfg, layout, hardware, precision, backend):8.1f} h")
    if detail.memory.headroom:
        print("  headroom figures  " + "\n                    ".join(HEADROOM_SOURCES))
    print()

    if not plans:
        print("no layout fits: add GPUs, shorten the sequence, or try --backend te --sequence-parallel")
        return 1
    layers = cfg.model.num_layers
    print(
        f"layouts that fit with the headroom, fastest schedule first ({len(plans)} of them; "
        f"top {min(args.top, len(plans))}):"
    )
    print(f"  {'#':>2s} {'TP':>3s} {'CP':>3s} {'DP':>3s} {'mbs':>3s} {'recompute':>18s} {'memory/GPU':>11s} "
          f"{'step s':>8s} {'hours':>7s} {'sent/GPU/step':>13s}")  # fmt: skip
    for index, plan in enumerate(plans[: args.top], 1):
        item = plan.layout
        sent = sum(plan.step.communication_bytes.values()) / GIB
        hours = plan.schedule_seconds / 3600
        print(f"  {index:2d} {item.tensor:3d} {item.context:3d} {item.data:3d} {item.micro_batch:3d} "
              f"{item.recompute_label(layers):>18s} {gib(plan.memory.total):>11s} {plan.step.step_seconds:8.2f} "
              f"{hours:7.1f} {sent:9.1f} GiB")  # fmt: skip
    best = plans[0]
    same = best.layout == layout
    print(f"\nrecommended: #1, {best.step.step_seconds:.1f} s per step ({best.schedule_seconds / 3600:.1f} h in all), "
          f"{gib(best.memory.total).strip()} per GPU with the "
          f"headroom ({'the config already runs it' if same else 'the config runs another layout'}):\n"
          f"  {config_keys(best.layout)}")  # fmt: skip
    return 0


def entry_point() -> int:
    """The console script: main() behind megatron_harpe.cli's front door."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(entry_point())
