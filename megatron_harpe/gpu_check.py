"""Accept a GPU install before a long job: one command, a PASS/FAIL table (`scripts/gpu_check.sh`).

    bash scripts/gpu_check.sh                      # every GPU of this machine (1, 2 or 8)
    bash scripts/gpu_check.sh --device cpu         # the same checks on the CPU: a dry path of the tool itself

Checks (each a row of the table; SKIP when this machine cannot run it):
- logits: a tiny HARPE model's logits on the device (sdpa, and Transformer Engine when installed,
  loaded from a checkpoint written without TE) against the CPU reference; and HARPE with all bases
  equal against stock RoPE at that base (they must agree).
- parity TP2 / CP2 (2+ GPUs): 20 training steps split over 2 GPUs against 1 GPU.
- training: 20 steps on the device whose losses track a CPU run of the same data and weights.
- resume: the run saved after 10 steps and resumed gives the uninterrupted run's losses.
- throughput: tokens/s, model FLOPs utilisation and peak memory against `plan_memory.py`'s estimate.
- documents: packed, document-masked sequences against each document alone (sdpa; Transformer
  Engine's THD with cu_seqlens, CP 2 on 2+ GPUs; our THD split against TE's), in gpu_check_documents.py.

The runs are spawned processes (NCCL on GPUs, gloo on CPU) of `training.loop.train` on the
offline demo corpus, so nothing is downloaded. Not run by this project (it has no GPU): the
argument handling, the comparisons and the table are tested on CPU, and `--device cpu` runs it all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=4096,
                  max_position_embeddings=256)  # fmt: skip
SEQ_LENGTH = 256
BASES = [500.0, 5000.0, 50000.0, 500000.0]
REFERENCE_CHECKPOINT = "reference_weights"
MEMORY_ALLOWANCE = 512 * 2**20


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str
    """PASS | FAIL | SKIP"""
    detail: str


def compare(name: str, got: list[float] | torch.Tensor, want: list[float] | torch.Tensor, rtol: float, atol: float) -> CheckResult:
    """PASS when every |got - want| <= atol + rtol |want| (and the shapes agree)."""
    got_t, want_t = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    if got_t.shape != want_t.shape:
        return CheckResult(name, "FAIL", f"shapes differ: {tuple(got_t.shape)} vs {tuple(want_t.shape)}")
    if not torch.isfinite(got_t).all():
        return CheckResult(name, "FAIL", "non-finite values")
    difference = (got_t - want_t).abs()
    worst = float(difference.max()) if difference.numel() else 0.0
    ok = bool((difference <= atol + rtol * want_t.abs()).all())
    return CheckResult(name, "PASS" if ok else "FAIL", f"max |diff| {worst:.3g} (allowed {atol:g} + {rtol:g} x |ref|)")


def format_table(results: list[CheckResult]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'check':{width}s}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{r.name:{width}s}  {r.status:6s}  {r.detail}" for r in results]
    failed = sum(r.status == "FAIL" for r in results)
    lines.append(f"{'overall':{width}s}  {'FAIL' if failed else 'PASS':6s}  "
                 f"{failed} failed, {sum(r.status == 'PASS' for r in results)} passed, "
                 f"{sum(r.status == 'SKIP' for r in results)} skipped")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the checks (default: cuda when available)")  # fmt: skip
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use for the parity checks (default: all visible)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20; the resume check saves at half)")
    parser.add_argument("--workdir", default=None, help="demo corpus and checkpoints (default: a temporary directory)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU (H100: 989)")
    parser.add_argument("--loss-rtol", type=float, default=0.03, help="relative loss tolerance, device vs CPU (bf16)")
    parser.add_argument("--logit-atol", type=float, default=0.05, help="absolute logit tolerance, device vs CPU (bf16)")
    parser.add_argument("--only", nargs="+", default=None,
                        choices=["logits", "parity", "training", "resume", "throughput", "documents"],
                        help="run only these checks")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here (check the driver / CUDA_VISIBLE_DEVICES), or use --device cpu")
    if args.steps < 2 or args.steps % 2:
        parser.error(f"--steps {args.steps}: give an even number >= 2 (the resume check saves at half)")
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    args.gpus = available if args.gpus is None else args.gpus
    if args.gpus < 1 or args.gpus > available:
        parser.error(f"--gpus {args.gpus}: between 1 and the {available} visible")
    return args


def tiny_tree(workdir: Path, steps: int, **sections) -> dict:
    """The tiny model's config; every run starts from the CPU-initialised weights the reference
    saves (GPU initialisation draws other random numbers)."""
    tree = {
        "checkpoint": {"pretrained": str(workdir / REFERENCE_CHECKPOINT)},
        "model": dict(TINY_MODEL),
        "position": {"type": "harpe", "bases": list(BASES)},
        "data": {"demo_workdir": str(workdir / "data"), "seq_length": SEQ_LENGTH},
        "train": {"micro_batch_size": 1, "global_batch_size": 4, "train_tokens": steps * 4 * SEQ_LENGTH, "lr": 3e-3,
                  "warmup_steps": 2, "lr_schedule": "cosine", "clip_grad": 1.0, "seed": 7},
        "logging": {"log_interval": 1000},
    }  # fmt: skip
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


@contextlib.contextmanager
def visible_devices(device: str):
    """Spawned ranks see CUDA only when the run is meant for it (the CPU reference hides it)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _train_rank(tree: dict) -> dict:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training.loop import train

    start = time.perf_counter()
    history = train(from_dict(Config, tree))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"history": history, "seconds": time.perf_counter() - start, "peak_bytes": peak}


def run_training(tree: dict, world_size: int, device: str) -> dict:
    from megatron_harpe.parallel import run_on_ranks

    with visible_devices(device):
        return run_on_ranks(_train_rank, world_size, tree)[0]


def _logits_rank(tree: dict, checkpoint_dir: str, save: bool, backend: str) -> list:
    """Logits of the tiny model for fixed tokens; the CPU reference saves its weights first."""
    from megatron_harpe import parallel
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.model import build_model
    from megatron_harpe.training.checkpoint import load_checkpoint, save_checkpoint

    tree = {**tree, "model": {**tree["model"], "attention_backend": backend}, "checkpoint": {}}
    cfg = from_dict(Config, tree).validate()
    ctx = parallel.initialize(1, 1)
    parallel.seed_everything(7)
    model = build_model(cfg.model, cfg.position)
    if save:
        save_checkpoint(checkpoint_dir, 0, model=model, config=cfg.to_dict(), train_state={})
    else:
        load_checkpoint(checkpoint_dir, model=model, weights_only=True, load_rng=False)
    tokens = torch.arange(64, device=ctx.device)[None] * 37 % TINY_MODEL["vocab_size"]
    positions = torch.arange(64, device=ctx.device)[None]
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        return [model(tokens, positions, None).float().cpu()]


def reference_logits(workdir: Path, steps: int) -> torch.Tensor:
    """Initialise the tiny model on the CPU, save its weights (every run starts from them) and
    return its logits."""
    from megatron_harpe.parallel import run_on_ranks

    with visible_devices("cpu"):
        return run_on_ranks(_logits_rank, 1, tiny_tree(workdir, steps), str(workdir / REFERENCE_CHECKPOINT), True, "sdpa")[0][0]


def check_logits(args, workdir: Path, reference: torch.Tensor) -> list[CheckResult]:
    from megatron_harpe.parallel import run_on_ranks
    from megatron_harpe.te_backend import transformer_engine_available

    tree = tiny_tree(workdir, args.steps)
    results = []
    ckpt = str(workdir / REFERENCE_CHECKPOINT)
    with visible_devices("cpu"):
        equal = {**tree, "position": {"type": "harpe", "bases": [10000.0] * 4}}
        stock = {**tree, "position": {"type": "abf", "base": 10000.0}}
        (harpe_equal,) = run_on_ranks(_logits_rank, 1, equal, ckpt, False, "sdpa")[0]
        (rope,) = run_on_ranks(_logits_rank, 1, stock, ckpt, False, "sdpa")[0]
    results.append(compare("logits: equal bases = stock RoPE (cpu)", harpe_equal, rope, 0.0, 1e-5))
    backends = ["sdpa"] + (["te"] if args.device == "cuda" and transformer_engine_available() else [])
    for backend in backends:
        with visible_devices(args.device):
            (got,) = run_on_ranks(_logits_rank, 1, tree, ckpt, False, backend)[0]
        results.append(compare(f"logits: {backend} on {args.device} vs cpu", got, reference, 0.02, args.logit_atol))
    if "te" not in backends:
        results.append(CheckResult("logits: te vs cpu", "SKIP", "Transformer Engine not available on this device"))
    return results


def check_training(args, workdir: Path) -> tuple[list[CheckResult], dict]:
    tree = tiny_tree(workdir, args.steps)
    cpu = run_training(tree, 1, "cpu")
    device = cpu if args.device == "cpu" else run_training(tree, 1, args.device)
    losses = [h["loss"] for h in device["history"]]
    result = compare(f"training: {args.steps} steps on {args.device} vs cpu", losses, [h["loss"] for h in cpu["history"]],
                     args.loss_rtol, 0.0)  # fmt: skip
    learned = losses[-1] < losses[0]
    if not learned:
        result = CheckResult(result.name, "FAIL", f"loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f}); {result.detail}")
    return [result], device


def check_resume(args, workdir: Path, uninterrupted: dict) -> list[CheckResult]:
    save = {"save": str(workdir / "resume_ckpt"), "keep_last": 1}
    half = args.steps // 2
    first = run_training(tiny_tree(workdir, args.steps, checkpoint=save, train={"exit_after_steps": half}), 1, args.device)
    second = run_training(tiny_tree(workdir, args.steps, checkpoint=save), 1, args.device)
    losses = [h["loss"] for h in first["history"] + second["history"]]
    return [compare(f"resume: saved at step {half}, resumed", losses, [h["loss"] for h in uninterrupted["history"]], 1e-3, 1e-4)]


def check_parity(args, workdir: Path, single: dict) -> list[CheckResult]:
    if args.gpus < 2:
        return [CheckResult("parity: TP2 / CP2 vs 1 device", "SKIP", "needs 2 GPUs")]
    results = []
    want = [h["loss"] for h in single["history"]]
    for name, parallel_keys in (("TP2", {"tensor": 2}), ("CP2", {"context": 2})):
        run = run_training(tiny_tree(workdir, args.steps, parallel=parallel_keys), 2, args.device)
        results.append(compare(f"parity: {name} vs 1 device", [h["loss"] for h in run["history"]], want, 1e-2, 1e-3))
    return results


def check_throughput(args, workdir: Path, run: dict) -> list[CheckResult]:
    from megatron_harpe.config import Config, from_dict
    from megatron_harpe.training.memory import Layout, estimate_memory, forward_flops_per_token

    cfg = from_dict(Config, tiny_tree(workdir, args.steps)).validate()
    tokens = args.steps * cfg.train.global_batch_size * SEQ_LENGTH
    tokens_per_second = tokens / run["seconds"]  # includes start-up: a lower bound
    matmul, attention = forward_flops_per_token(cfg, SEQ_LENGTH)
    mfu = tokens_per_second * 3 * (matmul + attention) / (args.peak_tflops * 1e12)
    detail = f"{tokens_per_second:,.0f} tokens/s, MFU {mfu:.2%} of {args.peak_tflops:g} TFLOP/s (tiny model: a smoke figure)"
    if args.device != "cuda":
        return [CheckResult("throughput", "SKIP", detail + "; peak memory needs CUDA")]
    predicted = estimate_memory(cfg, Layout(recompute=cfg.train.recompute)).total
    peak = run["peak_bytes"]
    # the planner is an upper bound of the model's own memory; cuBLAS / TE workspaces come from the
    # same allocator and outweigh a tiny model, hence the fixed allowance
    status = "PASS" if peak <= predicted + MEMORY_ALLOWANCE else "FAIL"
    return [CheckResult("throughput / peak memory", status,
                        f"{detail}; peak {peak / 2**20:.1f} MiB vs planned {predicted / 2**20:.1f} MiB "
                        f"+ {MEMORY_ALLOWANCE / 2**20:.0f} MiB for workspaces")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    wanted = set(args.only or ["logits", "parity", "training", "resume", "throughput", "documents"])
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        workdir.mkdir(parents=True, exist_ok=True)
        results: list[CheckResult] = []
        reference = reference_logits(workdir, args.steps)
        if "logits" in wanted:
            results += check_logits(args, workdir, reference)
        run = None
        if wanted & {"training", "resume", "parity", "throughput"}:
            training_results, run = check_training(args, workdir)
            results += training_results if "training" in wanted else []
        if "resume" in wanted:
            results += check_resume(args, workdir, run)
        if "parity" in wanted:
            results += check_parity(args, workdir, run)
        if "throughput" in wanted:
            results += check_throughput(args, workdir, run)
        if "documents" in wanted:  # document masking: megatron_harpe/gpu_check_documents.py
            from megatron_harpe.gpu_check_documents import check_document_masking

            results += check_document_masking(args, workdir)
    print(format_table(results))
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
