"""The training loop: continual pretraining with one or several stages, read top to bottom.

    torchrun --nproc-per-node 2 pretrain_harpe.py --config configs/demo_cpu.yaml

One optimizer step = the stage's global batch size (stages[].global_batch_size, by default
train.global_batch_size) in sequences = micro_batch_size x accumulation x DP.
The loss is token-weighted: every micro-batch's summed token loss is divided by the number of
loss tokens of the whole step on all DP x CP ranks, and gradients are then summed over DP x CP,
so the update is the same for any split of the batch or the sequence.

SIGTERM or SIGUSR1 (a preemption, a time limit) stop the run after the current step with a
checkpoint and exit code 128 + the signal's number; the next launch resumes (preemption.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import torch
import yaml

from megatron_harpe import collectives, parallel
from megatron_harpe.checkpointing import checkpoint, resume_check, run_lock
from megatron_harpe.checkpointing.pretrained import load_pretrained
from megatron_harpe.config import Config, StageConfig
from megatron_harpe.eval.in_training import check_eval_prompts
from megatron_harpe.model import build_model, forward_micro_batch, set_position_encoding
from megatron_harpe.parallel import ParallelContext
from megatron_harpe.planner.memory import model_flops_per_token
from megatron_harpe.rank_health import CollectiveGuard
from megatron_harpe.training import preemption
from megatron_harpe.training.data import StageData, prepare_training_data
from megatron_harpe.training.grads import clip_grad_norm, global_token_count
from megatron_harpe.training.mixed_precision import training_precision
from megatron_harpe.training.monitor import (
    TrainingMonitor,
    check_loss_finite,
    check_skip_limit,
    check_weights_finite,
    peak_tflops,
)
from megatron_harpe.training.optimizer import build_optimizer
from megatron_harpe.training.schedule import LearningRateSchedule
from megatron_harpe.training.sharding import reduce_sequence_parallel_gradients, shard_model


@dataclasses.dataclass
class StagePlan:
    index: int
    config: StageConfig
    steps: int
    first_step: int
    """Global step count before this stage starts."""


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    stage: int = 0
    stage_step: int = 0
    consumed_tokens: int = 0


def plan_stages(cfg: Config) -> list[StagePlan]:
    """Steps per stage: ceil(stage tokens / tokens per step)."""
    plans, first = [], 0
    for index, stage in enumerate(cfg.resolved_stages()):
        steps = math.ceil(stage.tokens / (stage.global_batch_size * stage.seq_length))
        plans.append(StagePlan(index, stage, steps, first))
        first += steps
    return plans


def train(cfg: Config) -> list[dict[str, float]]:
    """Run the schedule (to the end, or for train.exit_after_steps steps); returns the loss,
    gradient norm and learning rate of every step run in this launch."""
    # Process groups: TP x CP x DP from the config and the launcher's world size. A stuck
    # collective fails after parallel.timeout_minutes, naming this rank and its phase; one run
    # at a time holds the checkpoint directory; SIGTERM / SIGUSR1 from here on stop the run
    # after a step, with a checkpoint.
    with preemption.stop_signals() as signals:
        ctx = parallel.initialize(cfg.parallel.tensor, cfg.parallel.context, cfg.parallel.timeout_minutes)
        cfg.validate(world_size=ctx.world_size)
        log = _rank0_print(ctx)
        if cfg.checkpoint.save:
            preemption.start_checkpoint_writer_helper()
        with CollectiveGuard(ctx.rank, cfg.parallel.timeout_minutes) as guard:
            with run_lock.hold_checkpoint_dir(cfg.checkpoint.save, ctx, log):
                return _train(cfg, ctx, log, guard, signals)


def _train(cfg: Config, ctx: ParallelContext, log, guard: CollectiveGuard,
           signals: preemption.StopSignals) -> list[dict[str, float]]:  # fmt: skip
    parallel.seed_everything(cfg.train.seed)
    plans = plan_stages(cfg)
    total_steps = plans[-1].first_step + plans[-1].steps
    log("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # Data: the demo corpus is prepared on first use; each stage reads sequences of its length.
    guard.phase = "data preparation"
    training_data = prepare_training_data(cfg, ctx, total_samples=_samples_per_stage(cfg, plans))
    check_eval_prompts(cfg)  # eval.interval: every task's prompt fits every length, before training

    # Model, optimizer, learning-rate schedule.
    model, optimizer = build_model_and_optimizer(cfg, ctx, plans[0].config.position)
    schedule = LearningRateSchedule(
        peak_lr=cfg.train.lr,
        warmup_steps=cfg.train.warmup_steps,
        total_steps=total_steps,
        style=cfg.train.lr_schedule,
        min_lr=cfg.train.min_lr,
    )

    # Resume from our own latest checkpoint, or start from pretrained weights only.
    guard.phase = "checkpoint loading"
    state = _restore(cfg, model, optimizer, schedule, log)
    monitor = TrainingMonitor(
        total_steps=total_steps,
        log_every=cfg.logging.log_interval,
        log_dir=cfg.logging.tensorboard_dir,
        enabled=ctx.is_main,
        start_step=state.iteration,
        peak_flops=_job_peak_flops(cfg, ctx.world_size),
    )
    log(f"training {total_steps} steps in {len(plans)} stage(s); starting at step {state.iteration}")

    history: list[dict[str, float]] = []
    skipped_in_a_row = 0
    for plan in plans[state.stage :]:
        if state.stage != plan.index:
            state.stage, state.stage_step = plan.index, 0
        set_position_encoding(model, cfg.model, plan.config.position)
        monitor.flops_per_token = model_flops_per_token(cfg, plan.config.seq_length)
        batches = training_data[plan.index].micro_batches(consumed_steps=state.stage_step)
        while state.stage_step < plan.steps:
            guard.phase = f"training step {state.iteration + 1} (gradient / loss all-reduce, stop check)"
            loss, grad_norm, lr, tokens, skipped = train_step(
                cfg, ctx, plan.config, model, optimizer, schedule, batches, state.iteration + 1
            )
            state.iteration += 1
            state.stage_step += 1
            state.consumed_tokens += tokens
            history.append({"step": state.iteration, "loss": loss, "grad_norm": grad_norm, "lr": lr})
            monitor.log_step(state.iteration, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, skipped=skipped)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            check_skip_limit(skipped_in_a_row, cfg.train.max_consecutive_skips, state.iteration, model)
            if cfg.eval.interval and state.iteration % cfg.eval.interval == 0:
                _evaluate(cfg, model, monitor, state.iteration, plan.config.seq_length)
            stop_file, stop_signal = (  # done: nothing to resume
                _stop_requested(cfg, ctx, signals) if state.iteration < total_steps else (False, 0)
            )
            exiting = (
                stop_file or stop_signal or (cfg.train.exit_after_steps and len(history) == cfg.train.exit_after_steps)
            )
            if _should_save(cfg, state.iteration, total_steps) or (exiting and cfg.checkpoint.save):
                guard.phase = f"the checkpoint save of step {state.iteration}"
                _save(cfg, model, optimizer, schedule, state, training_data[plan.index])
                if not exiting and state.iteration < total_steps:  # asked during the save: stop now, it is saved
                    stop_file, stop_signal = _stop_requested(cfg, ctx, signals)
                    exiting = stop_file or stop_signal
            if exiting:
                reason = (f"{signals.name(stop_signal)} received" if stop_signal else
                          f"{cfg.checkpoint.stop_file} appeared" if stop_file else
                          "train.exit_after_steps")  # fmt: skip
                log(
                    f"stopping after step {state.iteration} ({reason})"
                    + ("; the next launch resumes" if cfg.checkpoint.save else "; no checkpoint.save, nothing saved")
                )
                if stop_file and ctx.is_main:
                    os.remove(cfg.checkpoint.stop_file)  # after the save: a requeued run must not stop again
                monitor.close()
                if stop_signal:
                    raise preemption.Preempted(stop_signal)
                return history
    monitor.close()
    return history


def build_model_and_optimizer(cfg: Config, ctx: ParallelContext, position):
    """This rank's model, sharded over DP x CP by the engine (training/sharding.py: fp32 weight
    shards, compute in the run's precision), and AdamW over those shards."""
    precision = training_precision(cfg.train, ctx.device.type)
    model = build_model(cfg.model, position, recompute=cfg.train, parallel=cfg.parallel)
    shard_model(model, ctx, precision)
    optimizer = build_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)  # fmt: skip
    return model, optimizer


def train_step(cfg: Config, ctx: ParallelContext, stage: StageConfig, model, optimizer, schedule, batches, step: int):
    """One optimizer step of `stage` over this rank's micro-batches. Returns (global mean loss,
    grad norm, learning rate, tokens in the step over the whole job, skipped)."""
    accumulation = stage.global_batch_size // (cfg.train.micro_batch_size * ctx.dp_size)
    micro_batches = [next(batches) for _ in range(accumulation)]
    micro_batches = [{k: v.to(ctx.device) for k, v in batch.items()} for batch in micro_batches]
    loss_tokens = global_token_count([b["loss_mask"] for b in micro_batches], ctx.dp_cp_group)
    model.train()
    step_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    autocast = _autocast(training_precision(cfg.train, ctx.device.type), ctx)
    per_token_positions = cfg.data.reset_position_ids or cfg.data.reset_attention_mask  # packed documents
    for batch in micro_batches:  # each backward reduce-scatters into the gradient shards (summed over DP x CP)
        with autocast:
            token_losses = forward_micro_batch(model, batch, per_token_positions=per_token_positions)
        loss = (token_losses.float() * batch["loss_mask"]).sum() / loss_tokens
        loss.backward()
        step_loss += loss.detach().double()
    if cfg.parallel.sequence_parallel:
        reduce_sequence_parallel_gradients(model, ctx.tp_group)
    if ctx.dp_size * ctx.cp_size > 1:
        collectives.all_reduce(step_loss, group=ctx.dp_cp_group)
    grad_norm = clip_grad_norm(model, cfg.train.clip_grad, ctx.tp_group, ctx.dp_cp_group)
    finite = check_loss_finite(step_loss.item(), step, cfg.train.on_nonfinite) and check_loss_finite(
        grad_norm, step, cfg.train.on_nonfinite, what="gradient norm"
    )
    lr = schedule.current_lr()
    if finite:  # a skipped update does not advance the schedule
        lr = schedule.step(optimizer)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = stage.global_batch_size * stage.seq_length  # not the tokens held: THD adds padding (thd.py)
    return step_loss.item(), grad_norm, lr, tokens, not finite


def _samples_per_stage(cfg: Config, plans: list[StagePlan]) -> list[int]:
    return [plan.steps * plan.config.global_batch_size for plan in plans]


def _autocast(precision: str, ctx: ParallelContext):
    """bf16 autocast over fp32 weights; the bf16 mode's compute weights are bf16 already (the engine casts them)."""
    if precision == "autocast":
        return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _restore(cfg: Config, model, optimizer, schedule, log) -> TrainState:
    latest = checkpoint.find_latest_checkpoint(cfg.checkpoint.save) if cfg.checkpoint.save else None
    if latest is not None:
        resume_check.check_resume_config(
            yaml.safe_load((latest / checkpoint.CONFIG_FILE).read_text()),
            cfg.to_dict(),
            cfg.checkpoint.allow_config_change,
            log,
            where=str(latest),
        )
        saved = checkpoint.load_checkpoint(latest, model=model, optimizer=optimizer)
        schedule.load_state_dict(saved["schedule"])
        log(f"resumed from {latest} at step {saved['iteration']}")
        return TrainState(saved["iteration"], saved["stage"], saved["stage_step"], saved["consumed_tokens"])
    if cfg.checkpoint.pretrained:  # shapes checked first; fresh optimizer and schedule
        load_pretrained(cfg.checkpoint.pretrained, cfg.model, model)
        log(f"continual pretraining from the weights of {cfg.checkpoint.pretrained} (fresh optimizer and schedule)")
    return TrainState()


def _stop_requested(cfg: Config, ctx: ParallelContext, signals: preemption.StopSignals) -> tuple[bool, int]:
    """(the stop file exists, the stop signal received or 0), agreed by all ranks: a shared
    filesystem can show the file, and a signal can reach, some ranks a step before others; all
    must stop after the same step."""
    stop_file = bool(cfg.checkpoint.stop_file) and os.path.exists(cfg.checkpoint.stop_file)
    seen = torch.tensor([float(stop_file), float(signals.received)], device=ctx.device)
    if ctx.world_size > 1:
        collectives.all_reduce(seen, op=collectives.ReduceOp.MAX)
    return bool(seen[0].item()), int(seen[1].item())


def _should_save(cfg: Config, iteration: int, total_steps: int) -> bool:
    if not cfg.checkpoint.save:
        return False
    interval = cfg.checkpoint.save_interval
    return iteration == total_steps or (interval > 0 and iteration % interval == 0)


def _save(cfg: Config, model, optimizer, schedule, state: TrainState, data: StageData) -> None:
    check_weights_finite(model, state.iteration)  # a checkpoint of NaN weights is no checkpoint
    train_state = dataclasses.asdict(state) | {
        "schedule": schedule.state_dict(),
        "consumed_samples_in_stage": data.consumed_samples(state.stage_step),
    }
    checkpoint.save_checkpoint(
        cfg.checkpoint.save,
        state.iteration,
        model=model,
        config=cfg.to_dict(),
        train_state=train_state,
        optimizer=optimizer,
        keep_last=cfg.checkpoint.keep_last,
    )


def _job_peak_flops(cfg: Config, world_size: int) -> float | None:
    """Peak FLOP/s of all devices of the job together (None: unknown, no MFU)."""
    per_device = peak_tflops(cfg.logging.peak_tflops)
    return None if per_device is None else per_device * 1e12 * world_size


def _evaluate(cfg: Config, model, monitor: TrainingMonitor, step: int, seq_length: int) -> None:
    """The configured eval tasks on the model being trained (every rank takes part; eval/in_training.py)."""
    from megatron_harpe.eval.in_training import evaluate_during_training

    monitor.add_scalars(step, evaluate_during_training(cfg, model, step, seq_length), prefix="eval")


def _rank0_print(ctx: ParallelContext):
    def log(message: str) -> None:
        if ctx.is_main:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    return log
