"""Per-GPU memory, FLOPs and step time of a config under a parallel layout, computed from
formulas without building anything (`tools/plan_memory.py` prints and ranks them).

    cfg = load_config("configs/llama2_7b_128k_harpe.yaml").validate()
    memory = estimate_memory(cfg, Layout(tensor=4, context=4, data=2, recompute="full"))
    step = estimate_step(cfg, Layout(tensor=4, context=4, data=2, recompute="full"), Hardware())
    plans = rank_layouts(cfg, Hardware(memory_gib=80), gpus=32)   # layouts that fit, fastest first

Where the numbers come from (s = tokens per CP rank, b = micro-batch, h = hidden, a and g =
query and k/v heads per TP rank, d = head dim, f = FFN size / TP, V = vocabulary / TP, e = bytes
per activation element, L = layers; all per micro-batch and per rank):

- Parameters per rank: `plan.parameters_per_rank` (exact for megatron-core's sharding). Bytes
  per parameter follow the trainer's mode (`mixed_precision.training_precision`, the same
  function the trainer asks): `fp32` weights, gradients and AdamW's two moments (16 B);
  `autocast` adds the bf16 weight copies living from forward to backward (+2 B); `bf16` params
  (the default on GPU) are bf16 weights 2 + fp32 main gradients 4 + fp32 main weights and
  moments 12. Optimizer sharding divides the optimizer states (with the main weights) by DP x CP
  (CP ranks hold the same weights). tests/distributed/test_bf16_params.py checks these bytes
  against what the trainer allocates.
- Activations: the tensors autograd keeps for backward, counted per layer for this model
  (RMSNorm, SwiGLU, no biases, no dropout), in the spirit of Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", sbh(34 + 5as/h) for GPT): their 34 and
  their s^2 score term do not apply to a SwiGLU model on flash/SDPA attention, which keeps no
  [s, s] scores. Per layer: norms 3sbh each with torch's composite RMSNorm (input, normalised,
  output; 2sbh with TE's fused norm + linear) -- replicated over TP unless sequence parallelism;
  the fused QKV output sb(a+2g)d (kept alive by the value view attention saves), rotated q and k
  sb(a+g)d, attention output sbad, softmax statistics 4sba bytes; SwiGLU 5sbf (fc1 output 2f,
  silu f, the linear half + offset f, their product f). HARPE's cos/sin are not per layer: the
  cached apply of position/rotary.py computes them once per rank and sequence length and every
  layer saves the same tensors, so they count once, with the rotary tables (megatron's own unfused
  RoPE would recompute 2s(rows_q + rows_k)d per layer). After the last layer: final norm and the
  fp32 softmax of the loss 4sbV.
  Our sdpa backend under CP keeps the all-gathered keys and values of the whole sequence S for
  backward (2Sbgd per layer; on CPU also the left-padded queries and their outputs). Recompute
  `full` keeps each layer's input sbh plus one layer's activations during its backward;
  `selective` re-runs core attention (drops the softmax statistics and, with our CP, the
  gathered keys/values). The sdpa terms match what autograd saves on CPU tensor by tensor
  (benchmarks/plan_memory_check.py); the TE terms follow megatron/TE's code, unmeasured here.
- Transient buffers (one layer at a time): CP keys/values in flight (all-gather staging 2Sbgd e;
  TE p2p double buffers 2 x 2sbgd e; a2a the local q/k/v), and logits in the activation dtype
  next to the fp32 softmax while the loss is computed.
- FLOPs per token (forward): 2 x matmul parameters (QKV, output projection, SwiGLU, logits) +
  causal attention 2 x S x a x d per layer (QK^T and AV over S/2 keys on average). Training is 3x
  forward; full recomputation adds one forward, selective the attention part.
- Document masking (`data.reset_attention_mask`, document_cost.py): Transformer Engine's THD
  padding is planned into the sequence length (activations and compute); the sdpa path adds the
  block masks its merged short documents save for backward to the activations and its
  document ids to the transient buffers; per-token rotary tables count once per sequence.
- Step time = compute + exposed communication. Compute = tokens per step x executed FLOPs
  per token / (GPUs x peak x utilisation); communication (TP, CP, DP x CP traffic, links and
  overlap) is modelled in `communication.py`.
"""

from __future__ import annotations

import dataclasses
import math

from megatron_harpe.config import Config, StageConfig
from megatron_harpe.training.communication import CommItem, communication_items
from megatron_harpe.training.document_cost import (
    planned_sequence_length,
    rotary_table_copies,
    sdpa_mask_activations,
    sdpa_mask_bytes,
)
from megatron_harpe.training.plan import parameters_per_rank

GIB = 2**30
RECOMPUTE_CHOICES = ("none", "selective", "full")
CP_COMM_CHOICES = ("all_gather", "p2p", "a2a")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout and the memory-saving switches that go with it."""

    tensor: int = 1
    context: int = 1
    data: int = 1
    micro_batch: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    """TE backend only: norms and residual activations split over TP."""
    optimizer_sharding: bool = False
    """Optimizer states split over DP x CP (megatron's distributed optimizer)."""
    cp_comm: str = "all_gather"
    """How keys/values travel over CP: all_gather (our sdpa backend), or TE's p2p / a2a."""
    overlap_grad_reduce: bool = False
    """Gradient reduction over DP x CP runs during the last micro-batch's backward."""

    @property
    def gpus(self) -> int:
        return self.tensor * self.context * self.data


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    weight_bytes: float
    """Per parameter, during a step (autocast copies included)."""
    grad_bytes: float
    optimizer_bytes: float
    """Per parameter, shardable over DP x CP."""
    activation_bytes: int
    stored_weight_bytes: int = 4
    """Per parameter as the weights are kept between steps (what a sharded optimizer all-gathers)."""


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 8, 4),
    "autocast": Precision("autocast (fp32 weights, bf16 compute)", 6, 4, 8, 2),
    "bf16": Precision("bf16 params, fp32 main weights and gradients", 2, 4, 12, 2, 2),
}


def trainer_precision(cfg: Config, device: str = "gpu") -> Precision:
    """What this project's trainer does for `train.precision` / `train.params_dtype` on `device`
    ("gpu" or "cpu"); ValueError for a combination the trainer refuses there."""
    from megatron_harpe.training.mixed_precision import training_precision

    return PRECISIONS[training_precision(cfg.train, "cuda" if device == "gpu" else "cpu")]


@dataclasses.dataclass(frozen=True)
class Hardware:
    memory_gib: float = 80.0
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989, A100: 312)."""
    utilization: float = 0.4
    """Fraction of peak sustained on the executed FLOPs (recomputation included)."""
    gpus_per_node: int = 8
    usable_fraction: float = 0.9
    """Memory left for the model after the CUDA context, NCCL buffers and fragmentation."""
    nvlink_gbs: float = 360.0
    """GB/s one GPU sends inside a node (H100 NVLink 4: 450 per direction, ~360 reached by NCCL)."""
    ib_gbs: float = 40.0
    """GB/s one GPU sends to other nodes (one 400 Gb/s NDR NIC per GPU, ~40 reached)."""


def config_layout(cfg: Config, gpus: int) -> Layout:
    """The layout `cfg.parallel` asks for on `gpus` GPUs (what pretrain_harpe.py will run)."""
    parallel = cfg.parallel
    tp, cp = parallel.tensor, parallel.context
    return Layout(
        tensor=tp, context=cp, data=gpus // (tp * cp), micro_batch=cfg.train.micro_batch_size,
        recompute=cfg.train.recompute, sequence_parallel=parallel.sequence_parallel and tp > 1,
        optimizer_sharding=parallel.distributed_optimizer, cp_comm=parallel.resolved_cp_comm_type(cfg.model),
        overlap_grad_reduce=parallel.overlap_grad_reduce,
    )  # fmt: skip


@dataclasses.dataclass
class MemoryEstimate:
    layout: Layout
    precision: Precision
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    optimizer_unsharded: int
    optimizer_sharded: int
    activations: int
    activations_by_recompute: dict[str, int]
    activation_breakdown: dict[str, int]
    rotary_tables: int
    transient: dict[str, int]

    @property
    def total(self) -> int:
        peak_transient = max(self.transient.values(), default=0)
        return self.weights + self.gradients + self.optimizer + self.activations + self.rotary_tables + peak_transient


def longest_stage(cfg: Config) -> StageConfig:
    return max(cfg.resolved_stages(), key=lambda stage: stage.seq_length)


def activation_breakdown(
    cfg: Config,
    layout: Layout,
    seq_length: int,
    position,
    element_bytes: int,
    backend: str | None = None,
    device: str = "gpu",
    recompute: str | None = None,
) -> dict[str, int]:
    """Bytes kept for backward by one micro-batch on one rank, by kind (see module docstring)."""
    model = cfg.model
    backend = backend or model.attention_backend
    recompute = recompute or layout.recompute
    tp, cp, e = layout.tensor, layout.context, element_bytes
    s, full_s, b = seq_length // cp, seq_length, layout.micro_batch
    h, d = model.hidden_size, model.head_dim
    a = model.num_attention_heads // tp
    expands = position.expands_keys(model)
    g = a if expands else model.kv_groups // tp
    f, vocab = model.ffn_hidden_size // tp, model.vocab_size // tp
    sp_split = tp if layout.sequence_parallel else 1
    norm_tensors = 2 if backend == "te" else 3
    gathers_kv = backend == "sdpa" and cp > 1

    layer = {
        "norms": 2 * norm_tensors * s * b * h * e // sp_split,
        "mlp": 5 * s * b * f * e,
    }
    qkv_output = 0 if expands else s * b * (model.num_attention_heads + 2 * model.kv_groups) // tp * d * e
    rotated_qk = s * b * (a + g) * d * e + (s * b * g * d * e if expands else 0)  # + expanded values
    if recompute == "selective":  # core attention re-runs: its inputs and output stay
        layer["attention q/k/v"] = qkv_output + rotated_qk
        layer["attention output"] = s * b * a * d * e
    elif gathers_kv:  # local k/v feed the all-gather only; the gathered ones are kept
        layer["cp gathered k/v"] = 2 * full_s * b * g * d * e
        if device == "cpu":
            # attention.py left-pads each query chunk to its visible key length on CPU: the two
            # chunks of a rank see 2*CP+1 chunks of keys together, padded queries and outputs alike.
            padded = (2 * cp + 1) * (s // 2)
            layer["cpu padded queries"] = padded * b * a * d * e
            layer["attention output"] = padded * b * a * d * e + s * b * a * d * e
            layer["softmax statistics"] = 4 * padded * b * a
        else:
            layer["attention q/k/v"] = s * b * a * d * e
            layer["attention output"] = 2 * s * b * a * d * e  # per-chunk outputs and their concatenation
            layer["softmax statistics"] = 4 * s * b * a
    else:
        layer["attention q/k/v"] = qkv_output + rotated_qk
        layer["attention output"] = s * b * a * d * e
        layer["softmax statistics"] = 4 * s * b * a
    final = {
        "final norm": norm_tensors * s * b * h * e // sp_split,
        "logits (fp32 softmax)": 4 * s * b * vocab,
    }
    layers = model.num_layers
    if recompute == "full":  # each layer keeps its input; one layer is rebuilt at a time
        breakdown = {"layer inputs (recompute)": layers * s * b * h * e // sp_split}
        breakdown.update({f"{kind} (1 layer)": value for kind, value in layer.items()})
    else:
        breakdown = {kind: layers * value for kind, value in layer.items()}
    breakdown.update(final)
    breakdown.update(sdpa_mask_activations(cfg, layout, s, e, backend, recompute))  # document masking
    return breakdown


def transient_buffers(
    cfg: Config, layout: Layout, seq_length: int, position, element_bytes: int, backend: str | None = None
) -> dict[str, int]:
    """The largest short-lived buffers (one layer at a time), by kind."""
    model = cfg.model
    backend = backend or model.attention_backend
    tp, cp, e, b = layout.tensor, layout.context, element_bytes, layout.micro_batch
    s = seq_length // cp
    d = model.head_dim
    g = (model.num_attention_heads if position.expands_keys(model) else model.kv_groups) // tp
    buffers = {}
    if cp > 1:
        local_kv = 2 * s * b * g * d * e
        if backend == "sdpa" or layout.cp_comm == "all_gather":
            buffers["cp k/v all-gather"] = cp * local_kv
        elif layout.cp_comm == "p2p":
            buffers["cp k/v ring (double-buffered)"] = 2 * local_kv
        else:
            buffers["cp all-to-all q/k/v"] = s * b * (model.num_attention_heads // tp + 2 * g) * d * e
    if e < 4:
        buffers["logits before fp32 loss"] = s * b * (model.vocab_size // tp) * e
    return buffers


def rotary_table_bytes(cfg: Config, position, seq_length: int, layout: Layout, element_bytes: int = 4) -> int:
    """What HeadwiseRotaryEmbedding caches, worst TP rank: the angle tables (`table_bytes`) and
    their cos/sin (`cos_sin_bytes`, with a copy cast to the activations' `element_bytes`)."""
    from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding

    model = cfg.model
    query_bases, key_bases = position.query_head_bases(model), position.key_head_bases(model)
    ranks = (
        HeadwiseRotaryEmbedding(position, query_bases, key_bases, model.head_dim, tp_rank=rank,
                                tp_size=layout.tensor, cp_size=layout.context)
        for rank in range(layout.tensor)
    )  # fmt: skip
    return max(rotary.table_bytes(seq_length) + rotary.cos_sin_bytes(seq_length, element_bytes) for rotary in ranks)


def estimate_memory(cfg: Config, layout: Layout, precision: Precision | None = None, *, stage: StageConfig | None = None,
                    backend: str | None = None, device: str = "gpu") -> MemoryEstimate:  # fmt: skip
    """Peak memory of one rank: weights, gradients, optimizer states, one micro-batch of
    activations, rotary tables and the largest transient buffer (an upper bound: gradients
    fill up while activations drain during backward)."""
    precision = precision or trainer_precision(cfg, device)
    stage = stage or longest_stage(cfg)
    position, e = stage.position, precision.activation_bytes
    seq_length = planned_sequence_length(cfg, stage, layout.context, layout.tensor, backend)  # + THD padding
    params = parameters_per_rank(cfg.model, layout.tensor)
    unsharded = int(params * precision.optimizer_bytes)
    sharded = math.ceil(unsharded / (layout.data * layout.context))
    by_recompute = {
        mode: sum(activation_breakdown(cfg, layout, seq_length, position, e, backend, device, mode).values())
        for mode in RECOMPUTE_CHOICES
    }
    return MemoryEstimate(
        layout=layout,
        precision=precision,
        parameters=params,
        weights=int(params * precision.weight_bytes),
        gradients=int(params * precision.grad_bytes),
        optimizer=sharded if layout.optimizer_sharding else unsharded,
        optimizer_unsharded=unsharded,
        optimizer_sharded=sharded,
        activations=by_recompute[layout.recompute],
        activations_by_recompute=by_recompute,
        activation_breakdown=activation_breakdown(cfg, layout, seq_length, position, e, backend, device),
        rotary_tables=rotary_table_bytes(cfg, position, seq_length, layout, e) * rotary_table_copies(cfg, layout.micro_batch),
        transient={**transient_buffers(cfg, layout, seq_length, position, e, backend),
                   **sdpa_mask_bytes(cfg, layout.micro_batch, seq_length, backend)},
    )


@dataclasses.dataclass
class StepEstimate:
    tokens_per_step: int
    model_flops_per_token: float
    """Forward + backward, no recomputation (what MFU counts)."""
    executed_flops_per_token: float
    step_seconds: float
    """Compute plus the communication compute does not hide."""
    communication_bytes: dict[str, float]
    """Bytes each GPU sends per optimizer step, by parallel dimension."""
    compute_seconds: float = 0.0
    communication: list[CommItem] = dataclasses.field(default_factory=list)

    @property
    def exposed_communication_seconds(self) -> float:
        return sum(item.exposed_seconds for item in self.communication)


def forward_flops_per_token(cfg: Config, seq_length: int) -> tuple[float, float]:
    """(matmul FLOPs, causal attention FLOPs) of one token's forward pass."""
    model = cfg.model
    h, d, heads, groups = model.hidden_size, model.head_dim, model.num_attention_heads, model.kv_groups
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * model.ffn_hidden_size
    matmul = 2.0 * (model.num_layers * per_layer + h * model.vocab_size)
    attention = 2.0 * seq_length * heads * d * model.num_layers
    return matmul, attention


def estimate_step(cfg: Config, layout: Layout, hardware: Hardware, precision: Precision | None = None,
                  *, stage: StageConfig | None = None, backend: str | None = None) -> StepEstimate:  # fmt: skip
    precision = precision or trainer_precision(cfg)
    stage = stage or longest_stage(cfg)
    backend = backend or cfg.model.attention_backend
    seq_length, model = stage.seq_length, cfg.model
    matmul, attention = forward_flops_per_token(cfg, seq_length)
    model_flops = 3 * (matmul + attention)
    extra = {"none": 0.0, "selective": attention, "full": matmul + attention}[layout.recompute]
    executed = model_flops + extra
    tokens = stage.global_batch_size * seq_length
    executed_tokens = tokens * planned_sequence_length(cfg, stage, layout.context, layout.tensor, backend) / seq_length
    compute = executed_tokens * executed / (layout.gpus * hardware.peak_tflops * 1e12 * hardware.utilization)
    attention_executed = attention * (3 + (1 if layout.recompute in ("selective", "full") else 0))
    items = communication_items(
        cfg, layout, hardware, precision, stage, backend, compute_seconds=compute,
        attention_fraction=attention_executed / executed, parameters=parameters_per_rank(model, layout.tensor),
    )  # fmt: skip
    comm: dict[str, float] = {}
    for item in items:
        comm[item.dimension] = comm.get(item.dimension, 0.0) + item.sent_bytes
    exposed = sum(item.exposed_seconds for item in items)
    return StepEstimate(tokens, model_flops, executed, compute + exposed, comm, compute, items)


@dataclasses.dataclass
class LayoutPlan:
    layout: Layout
    memory: MemoryEstimate
    step: StepEstimate

    def fits(self, hardware: Hardware) -> bool:
        return self.memory.total <= hardware.memory_gib * GIB * hardware.usable_fraction


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int, *, backend: str | None = None,
                      optimizer_sharding: bool = False, sequence_parallel: bool = False,
                      cp_comm: str | None = None, overlap_grad_reduce: bool = False) -> list[Layout]:  # fmt: skip
    """Every TP x CP x DP x micro-batch x recompute combination the config and GPU count allow.
    Tensor parallelism stays inside a node (its all-reduces are on the critical path)."""
    model, train = cfg.model, cfg.train
    backend = backend or model.attention_backend
    cp_comm = cp_comm or ("p2p" if backend == "te" else "all_gather")
    seq_length = longest_stage(cfg).seq_length
    layouts = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node or model.num_attention_heads % tp or model.kv_groups % tp or model.vocab_size % tp:
            continue
        for cp in _divisors(gpus // tp):
            if cp > 1 and any(stage.seq_length % (2 * cp) for stage in cfg.resolved_stages()):
                continue
            if cp_comm == "a2a" and (model.kv_groups // tp) % cp:
                continue
            dp = gpus // (tp * cp)
            for micro in sorted({1, train.micro_batch_size}):
                if train.global_batch_size % (micro * dp) or seq_length // cp < 1:
                    continue
                for recompute in RECOMPUTE_CHOICES:
                    layouts.append(
                        Layout(tp, cp, dp, micro, recompute, sequence_parallel and tp > 1, optimizer_sharding, cp_comm,
                               overlap_grad_reduce)
                    )
    return layouts


def rank_layouts(cfg: Config, hardware: Hardware, gpus: int, precision: Precision | None = None,
                 device: str = "gpu", **options) -> list[LayoutPlan]:  # fmt: skip
    """Layouts that fit in memory, fastest first (ties: less communication, less memory)."""
    backend = options.get("backend")
    precision = precision or trainer_precision(cfg, device)
    plans = [
        LayoutPlan(layout, estimate_memory(cfg, layout, precision, backend=backend, device=device),
                   estimate_step(cfg, layout, hardware, precision, backend=backend))
        for layout in candidate_layouts(cfg, gpus, hardware.gpus_per_node, **options)
        if device == "gpu" or layout.recompute == "none"  # megatron's recompute needs CUDA's RNG tracker
    ]  # fmt: skip
    fitting = [plan for plan in plans if plan.fits(hardware)]
    return sorted(
        fitting,
        key=lambda plan: (round(plan.step.step_seconds, 6), sum(plan.step.communication_bytes.values()),
                          plan.memory.total),
    )  # fmt: skip


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
