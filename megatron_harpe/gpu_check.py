"""Run the preset's own training path at reduced size on one node, before anyone books 32 GPUs
(`scripts/gpu_check.sh`): a PASS/FAIL table.

    bash scripts/gpu_check.sh                                              # the HARPE preset, every GPU here
    bash scripts/gpu_check.sh --config configs/llama2_7b_128k_yarn.yaml --gpus 4
    bash scripts/gpu_check.sh --train.recompute full --train.recompute_method block   # any config override
    bash scripts/gpu_check.sh --device cpu                                 # the same checks at tiny widths

The preset's path, reduced: the preset's model (Llama2-7B widths) with --layers layers and --seq
tokens per sequence; its `parallel:` block (attention backend, sequence parallelism, CP communication:
TE's p2p ring) on two layouts that fit this node (for TP4 x CP4 on 8 GPUs: TP4 x CP2 and
TP2 x CP2 x DP2); its precision and recompute; and the trainer itself (`training.loop.train`, which
builds the model and its sharding engine and runs each step as the long job will). Every run
starts from the same weights (written once), on the offline demo corpus: nothing is downloaded.
`--device cpu` runs the same checks with gloo at tiny widths on the sdpa backend (no sequence
parallelism, all-gather CP: Transformer Engine's paths need CUDA), as the test suite does.

Checks (a row each; SKIP when this machine cannot run one):
- logits: a tiny model's logits on the device with the preset's attention backend (Transformer
  Engine loaded from a checkpoint written without it) against the CPU; HARPE with equal bases
  against stock RoPE (they must agree).
- reference: the reduced model on one device, TP1 x CP1: every step finite, the loss falls.
- parity <layout>: the preset's path on a layout of this node; the loss and the gradient norm of
  every step against the reference run (tolerances below).
- resume: saved at half the steps on the second layout, resumed on the first; the resumed steps'
  losses against the reference.
- evaluation: one in-training evaluation (eval.interval) on the first layout, from prompts whose
  length the layout must pad (sequence parallelism and CP split them).
- memory <layout>: the peak of PyTorch's allocator on the busiest rank against the memory planner's
  tensors for that layout (tools/plan_memory.py; the planner must not be below what a GPU uses).
- throughput <layout>: tokens/s and model FLOPs utilisation of the steady steps (after the first).
- documents: packed, document-masked sequences of a tiny model against each document alone (sdpa;
  Transformer Engine's THD with cu_seqlens, CP 2 on 2+ GPUs; our THD split against TE's), in
  gpu_check_documents.py. The preset's path with document masking: add
  `--data.reset_attention_mask true --data.reset_position_ids true` (every row above then masks).

Tolerances, bf16 compute with fp32 main weights: bf16 keeps 8 significant bits (relative rounding
2^-9 = 0.2% per operation). Another layout sums the same products in another order (TP splits the
matmuls, CP merges the ring's partial softmaxes, sequence parallelism reduce-scatters, DP splits the
batch and reduce-scatters gradients in fp32), so per-token values differ at that level; the loss
averages 65k tokens per step, so the layouts' losses agree far closer than one value does: 1%
(--loss-rtol). AdamW normalises each update, which turns tiny gradient differences of near-zero
gradients into whole-step differences of single weights; the gradient norm, dominated by the largest
gradients, follows within 5% (--grad-rtol) over a few steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_harpe.gpu_check_common import CheckResult, compare, format_table, visible_devices
from megatron_harpe.gpu_check_logits import check_logits

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "llama2_7b_128k_harpe.yaml"
TINY_MODEL = dict(hidden_size=64, num_attention_heads=4, num_query_groups=None, ffn_hidden_size=128, vocab_size=4096)
CHECKS = ("logits", "documents", "reference", "parity", "resume", "evaluation", "memory", "throughput")
MEMORY_ALLOWANCE = 512 * 2**20
"""cuBLAS and Transformer Engine workspaces share PyTorch's allocator beside the planned tensors."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from megatron_harpe.config import parse_overrides

    parser = argparse.ArgumentParser(
        prog="gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="the preset whose path to check (default: the HARPE 7B preset)"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available; cpu: tiny widths, gloo, sdpa)")  # fmt: skip
    parser.add_argument(
        "--gpus", type=int, default=None, help="devices to use (default: all visible GPUs; 4 processes on cpu)"
    )
    parser.add_argument("--layers", type=int, default=2, help="transformer layers of the reduced model (default 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 16384 on cuda, 256 on cpu)")
    parser.add_argument("--steps", type=int, default=6, help="training steps (even; the resume check saves at half)")
    parser.add_argument("--workdir", default=None, help="demo corpus and checkpoints (default: a temporary directory)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU (H100: 989)")
    parser.add_argument("--loss-rtol", type=float, default=0.01, help="relative loss tolerance against the reference")
    parser.add_argument(
        "--grad-rtol", type=float, default=0.05, help="relative gradient-norm tolerance against the reference"
    )
    parser.add_argument("--logit-atol", type=float, default=0.05, help="absolute logit tolerance, device vs CPU (bf16)")
    parser.add_argument("--only", nargs="+", default=None, choices=CHECKS, help="run only these checks")
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device is visible here (check the driver / CUDA_VISIBLE_DEVICES), "
            "or use --device cpu"
        )
    if args.steps < 2 or args.steps % 2:
        parser.error(f"--steps {args.steps}: give an even number >= 2 (the resume check saves at half)")
    available = torch.cuda.device_count() if args.device == "cuda" else 4
    args.gpus = available if args.gpus is None else args.gpus
    if args.gpus < 1 or args.gpus > available:
        parser.error(f"--gpus {args.gpus}: between 1 and the {available} visible")
    args.seq = args.seq or (16384 if args.device == "cuda" else 256)
    if args.layers < 1:
        parser.error("--layers must be >= 1")
    return args, overrides


def reduced_tree(args: argparse.Namespace, overrides: list[str], workdir: Path) -> dict:
    """The preset at reduced size: its model with --layers layers (tiny widths on cpu), one stage
    of --seq tokens on the demo corpus, a global batch of 4, starting from the shared weights."""
    from megatron_harpe.config import load_config

    cfg = load_config(args.config, overrides).validate(require_backend=False)  # resolves the bases
    position = cfg.stages[-1].position if cfg.stages else cfg.position
    tree = cfg.to_dict()
    tree["position"] = dataclasses.asdict(position)
    tree["stages"] = []
    tree["model"]["num_layers"] = args.layers
    if args.device == "cpu":  # what a CPU can run of the same path
        tree["model"].update(TINY_MODEL, attention_backend="sdpa")
        tree["parallel"].update(sequence_parallel=False, cp_comm_type="auto")
        if position.type == "harpe":
            tree["position"] = {
                "type": "harpe",
                "strategy": "uniform",
                "base_min": min(position.bases),
                "base_max": max(position.bases),
            }
    recompute_layers = tree["train"].get("recompute_num_layers")
    if recompute_layers is not None and recompute_layers > args.layers:
        tree["train"]["recompute_num_layers"] = args.layers if tree["train"]["recompute_method"] == "block" else 1
    tree["data"] = {"demo_workdir": str(workdir / "data"), "seq_length": args.seq}
    tree["train"].update(micro_batch_size=1, global_batch_size=4, train_tokens=args.steps * 4 * args.seq, lr=1e-4,
                         min_lr=0.0, warmup_steps=0, lr_schedule="constant", exit_after_steps=0, seed=7)  # fmt: skip
    tree["checkpoint"] = {"pretrained": str(workdir / "initial_weights")}
    tree["logging"] = {"log_interval": 1000}
    tree["eval"] = {"interval": 0}
    return tree


def with_layout(tree: dict, layout: tuple[int, int, int], **sections) -> dict:
    """The reduced preset on (TP, CP, DP); sequence parallelism where there is TP to split over."""
    tree = {key: dict(value) if isinstance(value, dict) else value for key, value in tree.items()}
    sequence_parallel = tree["parallel"]["sequence_parallel"] and layout[0] > 1
    tree["parallel"] = {
        **tree["parallel"],
        "tensor": layout[0],
        "context": layout[1],
        "sequence_parallel": sequence_parallel,
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return tree


def check_layouts(parallel: dict, model: dict, gpus: int) -> list[tuple[int, int, int]]:
    """(TP, CP, DP) layouts of this node that run the preset's kind of parallelism: the preset's
    TP (leaving room for CP 2 when the preset uses CP), and one with less TP and more DP."""

    def valid(tp: int, cp: int) -> bool:
        return tp >= 1 and cp >= 1 and gpus % (tp * cp) == 0 and not (
            model["num_attention_heads"] % tp or (model["num_query_groups"] or model["num_attention_heads"]) % tp
            or model["vocab_size"] % tp)  # fmt: skip

    preset_tp, preset_cp = parallel["tensor"], parallel["context"]
    tp = min(preset_tp, gpus // (2 if preset_cp > 1 and gpus > 1 else 1)) or 1
    while not valid(tp, 1):
        tp -= 1
    cp = min(preset_cp, gpus // tp)
    while not valid(tp, cp):
        cp -= 1
    first = (tp, cp, gpus // (tp * cp))
    layouts = [first] if first != (1, 1, 1) else []
    for tp_b, cp_b in ((tp // 2, cp), (tp, cp // 2), (1, 1)):
        second = (tp_b, cp_b, gpus // max(1, tp_b * cp_b))
        if valid(tp_b, cp_b) and second not in layouts and second != (1, 1, 1) and gpus > 1:
            layouts.append(second)
            break
    return layouts


def _initial_weights_rank(tree: dict, path: str) -> None:
    """Initialise the reduced model once (one rank) and save its weights for every run."""
    from megatron_harpe import parallel
    from megatron_harpe.checkpointing.checkpoint import save_checkpoint
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.model import build_model

    cfg = from_dict(Config, {**tree, "checkpoint": {}}).validate()
    parallel.initialize(1, 1)
    parallel.seed_everything(cfg.train.seed)
    save_checkpoint(path, 0, model=build_model(cfg.model, cfg.position), config=cfg.to_dict(), train_state={})


def _train_rank(tree: dict, log_path: str) -> dict:
    """`training.loop.train` with each step timed, the evaluation's scalars kept and the
    allocator's peak read at the end; the trainer's own output goes to `log_path`."""
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.eval import in_training
    from megatron_harpe.training import loop

    seconds: list[float] = []
    scalars: list[dict] = []
    step, evaluate = loop.train_step, in_training.evaluate_during_training

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed_step(*args, **kwargs):
        synchronize()
        start = time.perf_counter()
        result = step(*args, **kwargs)
        synchronize()
        seconds.append(time.perf_counter() - start)
        return result

    loop.train_step = timed_step
    in_training.evaluate_during_training = lambda *args: scalars.append(evaluate(*args)) or scalars[-1]
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        history = loop.train(from_dict(Config, tree))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"history": history, "seconds": seconds, "peak_bytes": peak, "eval": scalars}


class Runs:
    """The training runs of one check, each in fresh processes (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, args: argparse.Namespace, tree: dict, workdir: Path) -> None:
        self.args, self.tree = args, tree
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def train(self, tree: dict, world_size: int, label: str) -> list[dict]:
        from megatron_harpe.parallel import run_on_ranks

        log = self.logs / (label.replace(" ", "_").replace(":", "").replace(",", "") + ".log")
        print(f"[gpu_check] {label} on {world_size} {self.args.device} process(es); the trainer's output: {log}",
              file=sys.stderr, flush=True)  # fmt: skip
        with visible_devices(self.args.device):
            return run_on_ranks(_train_rank, world_size, tree, str(log), timeout=4 * 3600)

    def initial_weights(self, path: Path) -> None:
        from megatron_harpe.parallel import run_on_ranks

        with visible_devices(self.args.device):
            run_on_ranks(_initial_weights_rank, 1, self.tree, str(path), timeout=3600)


def layout_name(layout: tuple[int, int, int]) -> str:
    tp, cp, dp = layout
    return " x ".join(f"{name}{size}" for name, size in (("TP", tp), ("CP", cp), ("DP", dp)) if size > 1) or "1 device"


def check_parity(args, name: str, ranks: list[dict], reference: dict) -> list[CheckResult]:
    history, want = ranks[0]["history"], reference["history"]
    return [
        compare(f"parity {name}: loss", [h["loss"] for h in history], [h["loss"] for h in want], args.loss_rtol, 0.0),
        compare(f"parity {name}: grad norm", [h["grad_norm"] for h in history], [h["grad_norm"] for h in want],
                args.grad_rtol, 0.0),
    ]  # fmt: skip


def check_memory(tree: dict, name: str, layout: tuple[int, int, int], ranks: list[dict]) -> CheckResult:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.planner.memory import config_layout, estimate_memory

    if ranks[0]["peak_bytes"] is None:
        return CheckResult(f"memory {name}", "SKIP", "the allocator's peak needs CUDA")
    cfg = from_dict(Config, tree).validate(world_size=layout[0] * layout[1] * layout[2])
    planned = estimate_memory(cfg, config_layout(cfg, layout[0] * layout[1] * layout[2])).tensors
    peak = max(rank["peak_bytes"] for rank in ranks)
    status = "PASS" if peak <= planned + MEMORY_ALLOWANCE else "FAIL"
    return CheckResult(f"memory {name}", status, f"peak {peak / 2**30:.2f} GiB, planned {planned / 2**30:.2f} GiB "
                       f"(+{MEMORY_ALLOWANCE / 2**20:.0f} MiB for workspaces), ratio {peak / planned:.2f}")  # fmt: skip


def check_throughput(args, tree: dict, name: str, world_size: int, ranks: list[dict]) -> CheckResult:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.planner.memory import forward_flops_per_token

    cfg = from_dict(Config, tree).validate(world_size=world_size)
    steady = ranks[0]["seconds"][1:] or ranks[0]["seconds"]
    seconds = sorted(steady)[len(steady) // 2]
    tokens_per_second = cfg.train.global_batch_size * args.seq / seconds
    matmul, attention = forward_flops_per_token(cfg, args.seq)
    mfu = tokens_per_second * 3 * (matmul + attention) / (world_size * args.peak_tflops * 1e12)
    detail = (f"{tokens_per_second:,.0f} tokens/s on {world_size} device(s), {seconds:.2f} s per step, "
              f"MFU {mfu:.1%} of {args.peak_tflops:g} TFLOP/s")  # fmt: skip
    return CheckResult(f"throughput {name}", "PASS" if tokens_per_second > 0 else "FAIL", detail)


def run_checks(args: argparse.Namespace, overrides: list[str], workdir: Path) -> list[CheckResult]:
    wanted = set(args.only or CHECKS)
    results: list[CheckResult] = []
    if "logits" in wanted:
        results += check_logits(args, workdir)
    if "documents" in wanted:  # document masking, on a tiny model of its own
        from megatron_harpe.gpu_check_documents import check_document_masking

        results += check_document_masking(args, workdir)
    if not wanted - {"logits", "documents"}:
        return results
    from megatron_harpe.config import Config, from_dict

    tree = reduced_tree(args, overrides, workdir)
    layouts = check_layouts(tree["parallel"], tree["model"], args.gpus)
    for layout in [(1, 1, 1), *layouts]:  # every run's config, checked before the first starts
        from_dict(Config, with_layout(tree, layout)).validate(world_size=layout[0] * layout[1] * layout[2],
                                                              require_backend=args.device == "cuda")  # fmt: skip
    runs = Runs(args, tree, workdir)
    runs.initial_weights(workdir / "initial_weights")
    reference = runs.train(with_layout(tree, (1, 1, 1)), 1, "reference")
    losses = [h["loss"] for h in reference[0]["history"]]
    if "reference" in wanted:
        learned = torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0]
        results.append(CheckResult("reference: TP1 x CP1, 1 device", "PASS" if learned else "FAIL",
                                   f"{args.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"))  # fmt: skip
    measured = {"1 device": ((1, 1, 1), reference)}
    evaluation = {"interval": args.steps, "tasks": ["passkey"], "lengths": [args.seq // 2 + 3], "samples": 1,
                  "max_new_tokens": 8}  # fmt: skip
    for index, layout in enumerate(layouts):
        extra = {"eval": evaluation} if index == 0 and "evaluation" in wanted else {}
        ranks = runs.train(with_layout(tree, layout, **extra), layout[0] * layout[1] * layout[2], layout_name(layout))
        measured[layout_name(layout)] = (layout, ranks)
        if "parity" in wanted:
            results += check_parity(args, layout_name(layout), ranks, reference[0])
        if extra:
            scalars = ranks[0]["eval"]
            results.append(CheckResult(f"evaluation: in training on {layout_name(layout)}",
                                       "PASS" if scalars else "FAIL",
                                       f"logged {', '.join(scalars[0])}" if scalars else
                                       "no evaluation ran"))  # fmt: skip
    if not layouts:
        for check in ("parity", "evaluation"):
            if check in wanted:
                results.append(CheckResult(check, "SKIP", f"needs 2 or more devices (--gpus {args.gpus})"))
    if "resume" in wanted:
        results.append(check_resume(args, runs, tree, layouts, reference[0]))
    for name, (layout, ranks) in measured.items():
        size = layout[0] * layout[1] * layout[2]
        if "memory" in wanted:
            results.append(check_memory(with_layout(tree, layout), name, layout, ranks))
        if "throughput" in wanted:
            results.append(check_throughput(args, with_layout(tree, layout), name, size, ranks))
    return results


def check_resume(args, runs: Runs, tree: dict, layouts: list, reference: dict) -> CheckResult:
    """Save on the second layout (or the only one) at half the steps, resume on the first."""
    first = layouts[0] if layouts else (1, 1, 1)
    saver = layouts[1] if len(layouts) > 1 else first
    save = {"save": str(Path(tree["checkpoint"]["pretrained"]).parent / "resume_checkpoints"), "keep_last": 1}
    half = args.steps // 2
    runs.train(with_layout(tree, saver, checkpoint=save, train={"exit_after_steps": half}),
               saver[0] * saver[1] * saver[2], f"resume save {layout_name(saver)}")  # fmt: skip
    resumed = runs.train(with_layout(tree, first, checkpoint=save), first[0] * first[1] * first[2],
                         f"resume load {layout_name(first)}")[0]["history"]  # fmt: skip
    name = f"resume: saved on {layout_name(saver)} at step {half}, resumed on {layout_name(first)}"
    if [h["step"] for h in resumed] != list(range(half + 1, args.steps + 1)):
        return CheckResult(
            name, "FAIL", f"resumed steps {[h['step'] for h in resumed]}, expected {half + 1}..{args.steps}"
        )
    return compare(
        name, [h["loss"] for h in resumed], [h["loss"] for h in reference["history"][half:]], args.loss_rtol, 0.0
    )


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from megatron_harpe.cli import quiet_third_party

    quiet_third_party()
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            results = run_checks(args, overrides, workdir)
        except ValueError as error:  # a config the check cannot reduce: one line
            print(f"gpu_check: {error}", file=sys.stderr)
            return 2
    print(format_table(results))
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
