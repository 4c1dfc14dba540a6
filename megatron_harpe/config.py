"""One strict, typed configuration tree for training, conversion and evaluation.

YAML in, dataclasses out:

    cfg = load_config("configs/demo_cpu.yaml", overrides=["train.lr=1e-4", "parallel.context=2"])

An unknown key, a value of the wrong type or an impossible combination raises `ValueError`
naming the key and the fix, before any process group starts. The resolved tree (with the
per-head bases written out) is what gets saved next to every checkpoint, so a model never
silently falls back to default bases.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_harpe.position.config import PositionConfig


@dataclasses.dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, no biases, rotary positions."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 128
    """Model width (Llama2-7B: 4096); a multiple of num_attention_heads with an even head dim."""
    num_attention_heads: int = 4
    """Query heads."""
    ffn_hidden_size: int = 344
    """SwiGLU inner size (Llama2-7B: 11008)."""
    vocab_size: int = 32000
    """Vocabulary size of the embedding and output layer (Llama2: 32000); at least the tokenizer's."""
    num_query_groups: int | None = None
    """k/v heads; None (or equal to num_attention_heads) is multi-head attention, fewer is GQA."""
    max_position_embeddings: int = 4096
    """The context length the base model was pretrained at (YaRN and PI scale from it)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (Llama2: 1e-5)."""
    init_method_std: float = 0.02
    """Standard deviation of the weight initialisation of a model trained from scratch."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer (false for Llama2-7B)."""
    attention_backend: str = "sdpa"
    """`sdpa`: torch scaled_dot_product_attention with our context parallelism (CPU and GPU);
    `te`: Transformer Engine attention and its context parallelism (GPU only)."""

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}: pick sizes with an integer head dim"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} is odd: rotary encoding needs an even head dim")
        if self.num_attention_heads % self.kv_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.kv_groups}: every k/v group needs the same number of query heads"
            )
        if self.attention_backend not in ("sdpa", "te"):
            raise ValueError(f"model.attention_backend={self.attention_backend!r}: choose 'sdpa' or 'te'")


@dataclasses.dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size: attention heads and MLP columns split across this many ranks."""
    context: int = 1
    """Context-parallel size: each sequence split into 2*context chunks, two per rank."""
    timeout_minutes: float = 10.0
    """A collective waiting longer than this for the other ranks fails, naming the rank and what
    it was doing (a frozen or dead rank). Raise it if checkpoint saves on a slow filesystem take longer."""
    sequence_parallel: bool = False
    """megatron's sequence parallelism: norms and residuals split over the TP ranks along the
    sequence (all-gather / reduce-scatter instead of all-reduce). attention_backend te only
    (TE's norms; megatron's local layers refuse it) and tensor > 1."""
    cp_comm_type: str = "auto"
    """How keys/values travel over CP: auto (te: p2p, sdpa: all_gather) | p2p | a2a | all_gather.
    sdpa implements all_gather only; p2p and a2a are Transformer Engine's."""

    def resolved_cp_comm_type(self, model: ModelConfig) -> str:
        if self.cp_comm_type != "auto":
            return self.cp_comm_type
        return "p2p" if model.attention_backend == "te" else "all_gather"

    def validate(self, model: ModelConfig) -> None:
        _choice("parallel.cp_comm_type", self.cp_comm_type, ("auto", "p2p", "a2a", "all_gather"))
        if model.attention_backend == "sdpa" and self.cp_comm_type not in ("auto", "all_gather"):
            raise ValueError(
                f"parallel.cp_comm_type={self.cp_comm_type} is Transformer Engine's: the sdpa backend "
                "all-gathers keys/values; use cp_comm_type: all_gather (or auto), or attention_backend: te"
            )
        if self.cp_comm_type == "a2a" and (model.kv_groups // self.tensor) % self.context:
            raise ValueError(
                f"parallel.cp_comm_type=a2a splits the {model.kv_groups // self.tensor} k/v heads of a TP rank "
                f"over parallel.context={self.context} ranks: use p2p, or a context size dividing them"
            )
        if self.sequence_parallel and model.attention_backend != "te":
            raise ValueError(
                "parallel.sequence_parallel needs model.attention_backend: te (megatron's local layers use "
                "torch norms, which it refuses for sequence parallelism); set sequence_parallel: false for sdpa"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError(
                "parallel.sequence_parallel splits over tensor-parallel ranks: set parallel.tensor > 1 "
                "or sequence_parallel: false"
            )


@dataclasses.dataclass
class DataConfig:
    prefixes: list[str] = dataclasses.field(default_factory=list)
    """Megatron dataset prefixes (path without .bin/.idx)."""
    weights: list[float] | None = None
    """Blend weights, one per prefix (None: proportional to size)."""
    loss_mask_prefixes: list[str] | None = None
    """Loss-mask datasets, one per prefix, with the same documents: loss only on tokens marked 1
    (e.g. the answers of a retrieval task). None: loss on every token."""
    tokenizer: str | None = None
    """sentencepiece .model or tokenizer.json; used for EOD id and for evaluation. Training refuses
    datasets whose summary names a tokenizer of other content (data/identity.py)."""
    seq_length: int = 512
    """Tokens per training sequence (before context-parallel splitting)."""
    demo_workdir: str | None = None
    """If set and `prefixes` is empty: build the offline demo corpus, tokenizer and dataset here."""
    reset_position_ids: bool = False
    """Positions (and so every head's rotary angles) restart at 0 after each end-of-document
    token (the tokenizer's EOS) instead of running on across the packed documents."""
    reset_attention_mask: bool = False
    """Document masking: a token attends only to earlier tokens of its own document (sdpa:
    block-diagonal causal attention; te: THD with cu_seqlens). With reset_position_ids this is
    each document trained as if alone; see docs/document-masking.md for the cost."""
    eod_mask_loss: bool = False
    """No loss where the input token is the end-of-document token (predicting the next
    document's first token)."""
    seed: int = 1234
    """Seed of megatron's sample shuffling and blending (the data order)."""
    cache_dir: str | None = None
    """Where megatron's sample indices are cached, keyed by the data's content (tokenizer, file
    sizes and times). None: `index_cache/` beside the first dataset when that directory is
    writable, else ~/.cache/megatron_harpe/index_cache (said at start)."""


@dataclasses.dataclass
class StageConfig:
    """One stage of a multi-stage schedule (e.g. 32k -> 64k -> 128k with growing ABF bases)."""

    seq_length: int = 512
    """Tokens per training sequence in this stage."""
    tokens: int = 0
    """Training tokens in this stage."""
    position: PositionConfig = dataclasses.field(default_factory=PositionConfig)
    global_batch_size: int = 0
    """Sequences per optimizer step in this stage (0: train.global_batch_size). Scale it
    inversely with seq_length to keep the tokens per step, and so the steps per token, equal."""


@dataclasses.dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step = micro_batch_size x accumulation x data-parallel size."""
    train_tokens: int = 0
    """Training tokens of the single stage (ignored when `stages` is given)."""
    lr: float = 2e-5
    """Peak learning rate (the paper: 2e-5, constant)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine schedule (at most lr)."""
    lr_schedule: str = "constant"
    """constant | cosine"""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr (0: none)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    seed: int = 1234
    """Seed of the weight initialisation and of the prompts of evaluation during training."""
    precision: str = "auto"
    """Compute precision: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16"""
    params_dtype: str = "auto"
    """The weights the layers compute with: auto (bf16 whenever the compute is bf16) | bf16 | fp32.
    bf16 gathers bf16 weights from the fp32 sharded main weights and reduces fp32 gradients
    (training/mixed_precision.py, docs/sharding.md), and selects bf16 compute on the CPU too;
    fp32 with bf16 compute is fp32 weights under bf16 autocast (GPU only)."""
    recompute: str = "none"
    """Activation recomputation, megatron-core's `recompute_granularity`: none | full (whole
    transformer layers: keep a layer's input, rerun it in backward) | selective (the submodules
    in `recompute_modules`)."""
    recompute_method: str = "uniform"
    """full only, megatron-core's `recompute_method`: uniform (every layer, in checkpointed chunks of
    `recompute_num_layers` layers) | block (only the first `recompute_num_layers` layers; the others
    keep their activations: partial recompute, less work for more memory)."""
    recompute_num_layers: int | None = None
    """full only: layers per chunk (uniform; default 1) or layers recomputed (block; default all)."""
    recompute_modules: list[str] = dataclasses.field(default_factory=lambda: ["core_attn"])
    """selective only, megatron-core's `recompute_modules`: core_attn (core attention; saves little
    with fused/flash attention, which keeps no score matrix) and/or mlp (the whole SwiGLU MLP).
    megatron's `layernorm` is not offered: with Transformer Engine the norms are fused into the next
    linear (nothing to recompute), and without it megatron 0.16.1's `CheckpointWithoutOutput` takes
    its fp8 branch anyway (`self.fp8 = fp8 is not None`) and fails on TE's missing FP8 manager."""
    on_nonfinite: str = "stop"
    """stop | skip: what to do when the loss or gradient norm is NaN/inf."""
    max_consecutive_skips: int = 5
    """With on_nonfinite: skip, stop with an error after this many skipped steps in a row (a run
    that learns nothing must not run on and exit 0)."""
    exit_after_steps: int = 0
    """Stop this launch after N steps, saving a checkpoint first (e.g. to fit a job's time
    limit; the next launch resumes). 0: run to the end."""

    def resolved_recompute_num_layers(self, num_layers: int) -> int | None:
        """megatron's `recompute_num_layers` for `recompute: full` (None otherwise)."""
        if self.recompute != "full":
            return None
        if self.recompute_num_layers is not None:
            return self.recompute_num_layers
        return 1 if self.recompute_method == "uniform" else num_layers

    def recomputed_layers(self, num_layers: int) -> int:
        """How many layers rerun whole in backward (full), for the planner and the docs."""
        if self.recompute != "full":
            return 0
        chunk = self.resolved_recompute_num_layers(num_layers)
        return num_layers if self.recompute_method == "uniform" else min(chunk, num_layers)

    def validate_recompute(self, num_layers: int) -> None:
        _choice("train.recompute", self.recompute, RECOMPUTE_GRANULARITIES)
        _choice("train.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.recompute != "full" and (self.recompute_num_layers is not None or self.recompute_method != "uniform"):
            raise ValueError(
                f"train.recompute_method / train.recompute_num_layers apply to train.recompute: full only "
                f"(it is {self.recompute}); remove them or set recompute: full"
            )
        layers = self.recompute_num_layers
        if layers is not None and not 1 <= layers <= num_layers:
            raise ValueError(f"train.recompute_num_layers={layers} must be between 1 and model.num_layers={num_layers}")
        if self.recompute_method == "uniform" and layers is not None and num_layers % layers:
            raise ValueError(
                f"train.recompute_num_layers={layers} does not divide model.num_layers={num_layers}: uniform "
                "recompute checkpoints chunks of that many layers; pick a divisor, or recompute_method: block"
            )
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown or not self.recompute_modules:
            raise ValueError(
                f"train.recompute_modules={self.recompute_modules}: choose one or more of "
                f"{', '.join(RECOMPUTE_MODULES)}"
            )
        if self.recompute != "selective" and self.recompute_modules != ["core_attn"]:
            raise ValueError(
                f"train.recompute_modules applies to train.recompute: selective only (it is {self.recompute}); "
                "remove it or set recompute: selective"
            )


RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp")
"""megatron-core 0.16.1's recompute_modules that do work in this dense model (see recompute_modules)."""


@dataclasses.dataclass
class CheckpointConfig:
    save: str | None = None
    """Directory for checkpoints; a run resumes from its latest checkpoint automatically."""
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int | None = 2
    """Keep this many newest checkpoints, deleting older ones (None: keep all)."""
    pretrained: str | None = None
    """Weights-only start (continual pretraining): fresh optimizer, schedule and step count."""
    stop_file: str | None = None
    """Save and exit when this file appears (checked after every step), then delete it: the
    Slurm scripts create it on USR1 before the time limit, so a requeued job loses no steps.
    (Without checkpoint.save the trainer just exits.)"""
    allow_config_change: str = ""
    """Comma-separated config keys (e.g. `data.seq_length,train.global_batch_size`) allowed to
    differ from the checkpoint's on resume although they change the model's function or the data
    order; any other such change is refused (see checkpointing/resume_check.py)."""


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = 10
    """Print (and log to TensorBoard) the training metrics every N steps."""
    tensorboard_dir: str | None = None
    """Write TensorBoard event files here (None: no TensorBoard)."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device, for the MFU of the log line (e.g. 989 for an H100 SXM in
    bf16); None: looked up from the GPU's name (training/monitor.py), no MFU on CPU."""


@dataclasses.dataclass
class EvalConfig:
    interval: int = 0
    """Evaluate every N steps during training (0: never)."""
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["passkey"])
    """Evaluation tasks run during training, the names of `tools/evaluate.py --task` (e.g. passkey, niah_single_1)."""
    lengths: list[int] = dataclasses.field(default_factory=list)
    """Context lengths in tokens to evaluate at (empty: each stage's sequence length)."""
    samples: int = 4
    """Samples per task and length."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt, which also sizes its prompt (None: each task's own answer budget)."""


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    position: PositionConfig = dataclasses.field(default_factory=PositionConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    stages: list[StageConfig] = dataclasses.field(default_factory=list)
    """Multi-stage schedule; empty means one stage from data.seq_length, position and train.train_tokens."""

    def resolved_stages(self) -> list[StageConfig]:
        """The stages to run, each with its global batch size filled in."""
        if self.stages:
            return [
                dataclasses.replace(stage, global_batch_size=stage.global_batch_size or self.train.global_batch_size)
                for stage in self.stages
            ]
        return [StageConfig(self.data.seq_length, self.train.train_tokens, self.position, self.train.global_batch_size)]

    def validate(self, world_size: int | None = None, *, require_backend: bool = True) -> "Config":
        """Check every cross-field constraint; resolve base strategies into explicit bases.
        `require_backend=False` plans without checking that Transformer Engine is installed
        (a dry run of a GPU config on a CPU machine)."""
        _check_ranges(self)
        self.model.validate()
        if self.model.attention_backend == "te" and require_backend:
            from megatron_harpe.te_backend import require_transformer_engine

            require_transformer_engine()
        tp, cp = self.parallel.tensor, self.parallel.context
        if tp < 1 or cp < 1:
            raise ValueError("parallel.tensor and parallel.context must be >= 1")
        self.parallel.validate(self.model)
        if self.model.num_attention_heads % tp or self.model.kv_groups % tp:
            raise ValueError(
                f"parallel.tensor={tp} does not divide model.num_attention_heads="
                f"{self.model.num_attention_heads} and k/v groups={self.model.kv_groups}: "
                "choose a tensor-parallel size that divides both"
            )
        if self.model.vocab_size % tp:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is not divisible by parallel.tensor={tp}: "
                "pad the vocabulary to a multiple of the tensor-parallel size"
            )
        if self.stages and self.train.train_tokens:
            raise ValueError("give train.train_tokens or stages[*].tokens, not both")
        self.position.resolve(self.model, self.data.seq_length)
        for index, stage in enumerate(self.resolved_stages()):
            stage.position.resolve(self.model, stage.seq_length)
            if stage.seq_length % (2 * cp) and cp > 1:
                raise ValueError(
                    f"sequence length {stage.seq_length} (stage {index}) is not divisible by "
                    f"2 x parallel.context = {2 * cp}: context parallelism splits each sequence into "
                    "2*CP equal chunks; change data.seq_length/stages[].seq_length or parallel.context"
                )
            if stage.global_batch_size < 1:
                raise ValueError(
                    f"stages[{index}].global_batch_size={stage.global_batch_size} must be positive (or 0 for train's)"
                )
            if stage.tokens <= 0:
                raise ValueError(
                    f"stage {index} has no training tokens: set train.train_tokens (one stage) or stages[].tokens"
                )
            if self.parallel.sequence_parallel and (stage.seq_length // cp) % tp:
                raise ValueError(
                    f"sequence length {stage.seq_length} (stage {index}) / parallel.context={cp} is not divisible by "
                    f"parallel.tensor={tp}: sequence parallelism splits each rank's tokens over TP; change the "
                    "sequence length or set parallel.sequence_parallel: false"
                )
            if self.model.attention_backend == "te" and stage.position.expands_keys(self.model):
                raise ValueError(
                    "position.gqa_bases=per_query_head with model.attention_backend=te: the keys are expanded "
                    "to one per query head, while Transformer Engine's attention is built for "
                    f"{self.model.kv_groups} k/v groups; use gqa_bases: per_group, or attention_backend: sdpa"
                )
        train = self.train
        _choice("train.lr_schedule", train.lr_schedule, ("constant", "cosine"))
        _choice("train.precision", train.precision, ("auto", "fp32", "bf16"))
        _choice("train.params_dtype", train.params_dtype, ("auto", "fp32", "bf16"))
        if train.params_dtype == "bf16" and train.precision == "fp32":
            raise ValueError("train.params_dtype=bf16 computes in bf16 but train.precision=fp32: set train.precision "
                             "to bf16 or auto, or train.params_dtype to fp32")  # fmt: skip
        train.validate_recompute(self.model.num_layers)
        _choice("train.on_nonfinite", train.on_nonfinite, ("stop", "skip"))
        if world_size is not None:
            if world_size % (tp * cp):
                raise ValueError(
                    f"{world_size} processes cannot be split into tensor={tp} x context={cp} groups: "
                    f"launch a multiple of {tp * cp} processes"
                )
            dp = world_size // (tp * cp)
            for index, stage in enumerate(self.resolved_stages()):
                if stage.global_batch_size % (train.micro_batch_size * dp):
                    where = f"stages[{index}].global_batch_size" if self.stages else "train.global_batch_size"
                    raise ValueError(
                        f"{where}={stage.global_batch_size} is not a multiple of "
                        f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {dp}: "
                        "adjust the batch sizes or the number of processes"
                    )
        if (
            self.data.reset_attention_mask
            and self.model.attention_backend == "te"
            and cp > 1
            and self.parallel.resolved_cp_comm_type(self.model) != "p2p"
        ):
            raise ValueError(
                f"data.reset_attention_mask with model.attention_backend=te and parallel.cp_comm_type="
                f"{self.parallel.cp_comm_type}: Transformer Engine's all_gather context parallelism has no THD "
                "(packed documents) path and its a2a has one only from TE 2.10; set parallel.cp_comm_type: p2p"
            )
        if self.data.weights is not None and len(self.data.weights) != len(self.data.prefixes):
            raise ValueError("data.weights needs one weight per entry of data.prefixes")
        weights = self.data.weights or []
        if any(not math.isfinite(weight) or weight < 0 for weight in weights) or (weights and sum(weights) <= 0):
            raise ValueError(f"data.weights={weights} must be finite, non-negative numbers with a positive sum")
        if self.data.loss_mask_prefixes is not None and len(self.data.loss_mask_prefixes) != len(self.data.prefixes):
            raise ValueError("data.loss_mask_prefixes needs one loss-mask dataset per entry of data.prefixes")
        if not self.data.prefixes and not self.data.demo_workdir:
            raise ValueError("no training data: set data.prefixes (Megatron .bin/.idx prefixes) or data.demo_workdir")
        from megatron_harpe.eval.training_settings import check_eval_settings

        check_eval_settings(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (key, smallest allowed value, whether the bound itself is allowed): checked before anything else
_LOWER_BOUNDS = (
    ("model.num_layers", 1, True),
    ("model.hidden_size", 1, True),
    ("model.num_attention_heads", 1, True),
    ("model.ffn_hidden_size", 1, True),
    ("model.vocab_size", 1, True),
    ("model.max_position_embeddings", 1, True),
    ("model.norm_epsilon", 0.0, False),
    ("model.init_method_std", 0.0, False),
    ("data.seq_length", 1, True),
    ("train.micro_batch_size", 1, True),
    ("train.global_batch_size", 1, True),
    ("train.train_tokens", 0, True),
    ("train.lr", 0.0, False),
    ("train.min_lr", 0.0, True),
    ("train.warmup_steps", 0, True),
    ("train.weight_decay", 0.0, True),
    ("train.adam_beta1", 0.0, True),
    ("train.adam_beta2", 0.0, True),
    ("train.adam_eps", 0.0, False),
    ("train.clip_grad", 0.0, True),
    ("train.exit_after_steps", 0, True),
    ("train.max_consecutive_skips", 1, True),
    ("checkpoint.save_interval", 0, True),
    ("logging.log_interval", 1, True),
    ("eval.interval", 0, True),
    ("eval.samples", 1, True),
    ("parallel.timeout_minutes", 0.0, False),
)


def _check_ranges(cfg: Config) -> None:
    """Values that cannot be right whatever else is set: one line naming the key and the range."""
    for key, bound, inclusive in _LOWER_BOUNDS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < bound or (value == bound and not inclusive):
            wanted = f">= {bound}" if inclusive else f"> {bound}"
            raise ValueError(f"{key}={value} must be {wanted}")
    if cfg.logging.peak_tflops is not None and cfg.logging.peak_tflops <= 0:
        raise ValueError(f"logging.peak_tflops={cfg.logging.peak_tflops} must be > 0 (or null: from the GPU's name)")
    train = cfg.train
    for key in ("adam_beta1", "adam_beta2"):
        if getattr(train, key) >= 1:
            raise ValueError(f"train.{key}={getattr(train, key)} must be below 1 (e.g. 0.9 / 0.95)")
    if train.min_lr > train.lr:
        raise ValueError(
            f"train.min_lr={train.min_lr:g} is above train.lr={train.lr:g}: the schedule decays "
            "from train.lr down to train.min_lr; lower train.min_lr"
        )
    if cfg.model.num_query_groups is not None and cfg.model.num_query_groups < 1:
        raise ValueError(f"model.num_query_groups={cfg.model.num_query_groups} must be >= 1 (or null for multi-head)")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1 (or null to keep all)")
    for index, stage in enumerate(cfg.stages):
        if stage.seq_length < 1 or stage.tokens < 0 or stage.global_batch_size < 0:
            raise ValueError(f"stages[{index}]: seq_length must be >= 1, tokens and global_batch_size >= 0")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check a YAML value against a dataclass field type, building nested dataclasses."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ValueError(f"{key} must be a {annotation.__name__}, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {annotation} for {key}")


RETIRED_KEYS = {
    "parallel.distributed_optimizer": "weights, gradients and AdamW states are always sharded over DP x CP now "
    "(PyTorch FSDP2, see docs/sharding.md)",
    "parallel.overlap_grad_reduce": "the sharding engine (PyTorch FSDP2, see docs/sharding.md) always overlaps its "
    "gradient reduce-scatter with backward",
}
"""Keys of earlier versions: a config that sets one is refused with the reason; a checkpoint's
saved config drops them (`drop_retired_keys`)."""


def drop_retired_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved config tree without RETIRED_KEYS (checkpoints written before they retired)."""
    tree = {section: dict(values) if isinstance(values, dict) else values for section, values in tree.items()}
    for dotted in RETIRED_KEYS:
        section, key = dotted.split(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(key, None)
    return tree


def from_dict(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    for key in values:
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in RETIRED_KEYS:
            raise ValueError(f"{dotted} is no longer a setting: {RETIRED_KEYS[dotted]}; delete it from the config")
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = prefix or "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(names)}")
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in values.items()
    }
    return cls(**kwargs)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply `section.key=value` (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    value = load_yaml(raw, f"override {override!r}")
    keys = dotted.lstrip("-").split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(arguments: list[str]) -> list[str]:
    """Command-line overrides: `--section.key value` and `section.key=value` both become
    `section.key=value`; anything else is a ValueError."""
    overrides, index = [], 0
    while index < len(arguments):
        item = arguments[index]
        if item.startswith("--") and "=" not in item:
            if index + 1 >= len(arguments):
                raise ValueError(f"{item} needs a value")
            overrides.append(f"{item[2:]}={arguments[index + 1]}")
            index += 2
        else:
            overrides.append(item.removeprefix("--"))
            index += 1
    for override in overrides:
        if "." not in override.split("=", 1)[0]:
            raise ValueError(f"unrecognised argument {override!r}; config overrides look like --train.lr 1e-5")
    return overrides


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (instead of keeping the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first_line:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"duplicate key {key!r} (first given on line {first_line[key] + 1}): keep one of them",
                            key_node.start_mark,
                        )
                    first_line[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    pass
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML (refusing duplicate keys); errors become one ValueError line `where:line: problem`."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise ValueError(f"{where}{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: invalid YAML: {error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, return a strict `Config`.
    Relative paths in the file resolve against its directory, those of overrides against the
    current directory; the Config holds them absolute (config_paths.py says why)."""
    from megatron_harpe.config_paths import resolve_paths

    tree: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file {path} not found: give the path of a YAML config (see configs/)")
        tree = load_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path} must hold a YAML mapping of sections")
        overridden = {override.split("=", 1)[0].lstrip("-") for override in overrides or []}
        resolve_paths(tree, Path(path).parent, source=str(path), overridden=overridden)
    for override in overrides or []:
        apply_override(tree, override)
    resolve_paths(tree, Path.cwd())
    return from_dict(Config, tree)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
