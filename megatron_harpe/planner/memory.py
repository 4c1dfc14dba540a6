"""Per-GPU memory, FLOPs and step time of a config under a parallel layout, computed from
formulas without building anything (`tools/plan_memory.py` prints and ranks them).

    cfg = load_config("configs/llama2_7b_128k_harpe.yaml").validate(require_backend=False)
    layout = Layout(tensor=4, context=4, data=2, recompute="full", recompute_method="block", recompute_num_layers=8)
    memory = estimate_memory(cfg, layout)        # .total includes the headroom; .tensors does not
    step = estimate_step(cfg, layout, Hardware())
    plans = rank_layouts(cfg, Hardware(memory_gib=80), gpus=32)   # layouts that fit, fastest first

Where the numbers come from (s = tokens per CP rank, b = micro-batch, h = hidden, a and g =
query and k/v heads per TP rank, d = head dim, f = FFN size / TP, V = vocabulary / TP, e = bytes
per activation element, L = layers; all per micro-batch and per rank):

- Parameters per rank: `plan.parameters_per_rank` (exact for megatron-core's sharding). The
  sharding engine (PyTorch FSDP2 over DP x CP, ZeRO-3; planner/engine_memory.py has its model and
  sources) keeps fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 B per parameter,
  sharded over DP x CP; its all-gathered layers and their gradients are in the compute dtype of the
  trainer's mode (`mixed_precision.training_precision`, the function the trainer asks: bf16 on GPU);
  `autocast` (fp32 weights, bf16 compute) adds the bf16 weight copies autocast keeps (+2 B, unsharded).
- Headroom (engine_memory.py): the CUDA context and workspaces, NCCL's buffers per communicator,
  and allocator fragmentation as a fraction of the tensors; `total` = tensors + headroom <= GPU memory.
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
  backward (2Sbgd per layer; on CPU also the left-padded queries and their outputs).
  Recompute (megatron-core's, `train.recompute*`): `full` keeps the input sbh of each recomputed
  chunk (uniform: chunks of N layers, all layers recomputed; block: the first N layers, the others
  keep everything) and rebuilds one chunk's activations during its backward, after the kept layers'
  backward has freed theirs (so the peak holds the larger of the two); `selective` core_attn re-runs
  core attention (drops the softmax statistics and, with our CP, the gathered keys/values), mlp the
  SwiGLU MLP (drops its 5sbf; with TE also the pre-MLP norm fused into fc1, keeping the MLP's input).
  The sdpa terms match what autograd saves on CPU tensor by tensor (benchmarks/plan_memory_check.py);
  the TE terms follow megatron/TE's code, unmeasured here.
- Transient buffers (the largest counts): CP keys/values in flight (all-gather staging 2Sbgd e;
  TE p2p double buffers 2 x 2sbgd e; a2a the local q/k/v), logits in the activation dtype next to
  the fp32 softmax while the loss is computed, and the gradients of one layer's activations while
  its backward runs (at most one layer's activations).
- FLOPs per token (forward): 2 x matmul parameters (QKV, output projection, SwiGLU, logits) +
  causal attention 2 x S x a x d per layer (QK^T and AV over S/2 keys on average). Training is 3x
  forward; full recompute adds the forward of the recomputed layers (not the output layer),
  selective the forward of core attention and/or the MLP.
- Document masking (`data.reset_attention_mask`, document_cost.py): Transformer Engine's THD
  padding is planned into the sequence length (activations and compute); the sdpa path adds
  what its document runs save for backward (block masks of merged short documents) to each
  layer's core-attention activations (so recompute drops them like the rest of core attention)
  and its document ids to the transient buffers; per-token rotary tables count once per sequence.
- Step time = compute + exposed communication. Compute = tokens per step x executed FLOPs
  per token / (GPUs x peak x utilisation); communication (TP, CP, DP x CP traffic, links and
  overlap) is modelled in `communication.py`.
"""

from __future__ import annotations

import dataclasses
import math

from megatron_harpe.config import Config, StageConfig, TrainConfig
from megatron_harpe.planner import engine_memory
from megatron_harpe.planner.communication import CommItem, communication_items
from megatron_harpe.planner.document_cost import (
    planned_sequence_length,
    rotary_table_copies,
    sdpa_document_activations,
    sdpa_mask_bytes,
)
from megatron_harpe.planner.engine_memory import ENGINE, GIB, Headroom  # noqa: F401 (ENGINE, GIB: for the tools)
from megatron_harpe.planner.parameters import parameters_per_rank

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
    """megatron-core's recompute granularity: none | selective | full (train.recompute)."""
    recompute_method: str = "uniform"
    """full: uniform (every layer, chunks of recompute_num_layers) | block (the first recompute_num_layers)."""
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ("core_attn",)
    """selective: core_attn and/or mlp."""
    sequence_parallel: bool = False
    """TE backend only: norms and residual activations split over TP."""
    cp_comm: str = "all_gather"
    """How keys/values travel over CP: all_gather (our sdpa backend), or TE's p2p / a2a."""

    @property
    def gpus(self) -> int:
        return self.tensor * self.context * self.data

    def train_keys(self) -> TrainConfig:
        """The `train.recompute*` keys of this layout (validated like a config's)."""
        return TrainConfig(recompute=self.recompute, recompute_method=self.recompute_method,
                           recompute_num_layers=self.recompute_num_layers,
                           recompute_modules=list(self.recompute_modules))  # fmt: skip

    def recomputed_layers(self, num_layers: int) -> int:
        return self.train_keys().recomputed_layers(num_layers)

    def recompute_chunk(self, num_layers: int) -> int:
        """Layers rebuilt at once during backward (full recompute)."""
        if self.recompute != "full":
            return 0
        return self.train_keys().resolved_recompute_num_layers(num_layers) if self.recompute_method == "uniform" else 1

    def recompute_label(self, num_layers: int) -> str:
        if self.recompute == "selective":
            return "sel " + "+".join(self.recompute_modules)
        if self.recompute != "full":
            return "none"
        chunk = self.train_keys().resolved_recompute_num_layers(num_layers)
        if self.recompute_method == "uniform":
            return "full" if chunk == 1 else f"full x{chunk}"
        return f"block {chunk}/{num_layers}"


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    activation_bytes: int
    """Bytes per activation element (the compute dtype)."""
    unit_bytes: int
    """Bytes per parameter of the engine's all-gathered weights and of their unsharded gradients."""
    autocast_copies: bool = False
    """autocast keeps a bf16 copy of every weight from forward to backward."""


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4),
    "autocast": Precision("autocast (fp32 weights, bf16 compute)", 2, 4, autocast_copies=True),
    "bf16": Precision("bf16 compute, fp32 main weights, gradients and moments", 2, 2),
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
    nvlink_gbs: float = 360.0
    """GB/s one GPU sends inside a node (H100 NVLink 4: 450 per direction, ~360 reached by NCCL)."""
    ib_gbs: float = 40.0
    """GB/s one GPU sends to other nodes (one 400 Gb/s NDR NIC per GPU, ~40 reached)."""
    headroom: Headroom = Headroom()
    """CUDA context, NCCL buffers and fragmentation kept free (engine_memory.py, with sources)."""


def config_layout(cfg: Config, gpus: int) -> Layout:
    """The layout `cfg.parallel` and `cfg.train` ask for on `gpus` GPUs (what pretrain_harpe.py will run)."""
    parallel, train = cfg.parallel, cfg.train
    tp, cp = parallel.tensor, parallel.context
    return Layout(
        tensor=tp, context=cp, data=gpus // (tp * cp), micro_batch=train.micro_batch_size,
        recompute=train.recompute, recompute_method=train.recompute_method,
        recompute_num_layers=train.recompute_num_layers, recompute_modules=tuple(train.recompute_modules),
        sequence_parallel=parallel.sequence_parallel and tp > 1, cp_comm=parallel.resolved_cp_comm_type(cfg.model),
    )  # fmt: skip


@dataclasses.dataclass
class MemoryEstimate:
    layout: Layout
    precision: Precision
    parameters: int
    """Parameters of this TP rank's model shard (before the engine's DP x CP sharding)."""
    sharded: dict[str, int]
    """The engine's fp32 state, sharded over DP x CP, by kind."""
    unit_buffers: dict[str, int]
    """The engine's all-gathered weights and unsharded gradients alive at the peak."""
    autocast_copies: int
    activations: int
    activations_by_recompute: dict[str, int]
    activation_breakdown: dict[str, int]
    rotary_tables: int
    transient: dict[str, int]
    headroom: dict[str, int]

    @property
    def tensors(self) -> int:
        """What the planned tensors take at the peak (headroom excluded)."""
        peak_transient = max(self.transient.values(), default=0)
        return (sum(self.sharded.values()) + sum(self.unit_buffers.values()) + self.autocast_copies
                + self.activations + self.rotary_tables + peak_transient)  # fmt: skip

    @property
    def total(self) -> int:
        return self.tensors + sum(self.headroom.values())


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
) -> dict[str, int]:
    """Bytes kept for backward by one micro-batch on one rank, by kind (see module docstring)."""
    model = cfg.model
    backend = backend or model.attention_backend
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
    selective = set(layout.recompute_modules) if layout.recompute == "selective" else set()

    layer = {
        "norms": 2 * norm_tensors * s * b * h * e // sp_split,
        "mlp": 5 * s * b * f * e,
    }
    if "mlp" in selective:  # the MLP reruns; with TE its fused pre-MLP norm too, keeping only its input
        del layer["mlp"]
        if backend == "te":
            layer["norms"] = (norm_tensors + 1) * s * b * h * e // sp_split
    qkv_output = 0 if expands else s * b * (model.num_attention_heads + 2 * model.kv_groups) // tp * d * e
    rotated_qk = s * b * (a + g) * d * e + (s * b * g * d * e if expands else 0)  # + expanded values
    if "core_attn" in selective:  # core attention re-runs: its inputs and output stay
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
    if "core_attn" not in selective:  # document masking: what the sdpa document runs save too
        layer.update(sdpa_document_activations(cfg, layout, s, e, backend))
    final = {
        "final norm": norm_tensors * s * b * h * e // sp_split,
        "logits (fp32 softmax)": 4 * s * b * vocab,
    }
    layers = model.num_layers
    breakdown: dict[str, int] = {}
    if layout.recompute == "full":
        recomputed, chunk = layout.recomputed_layers(layers), layout.recompute_chunk(layers)
        kept = layers - recomputed
        breakdown["layer inputs (recompute)"] = (recomputed // chunk) * s * b * h * e // sp_split
        # backward frees the kept layers' activations before it rebuilds the first recomputed chunk
        if kept >= chunk:
            breakdown.update({f"{kind} ({kept} layers kept)": kept * value for kind, value in layer.items()})
        else:
            breakdown.update({f"{kind} ({chunk} layer rebuilt)": chunk * value for kind, value in layer.items()})
    else:
        breakdown = {kind: layers * value for kind, value in layer.items()}
    breakdown.update(final)
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
    layer = {kind: value for kind, value in activation_breakdown(cfg, dataclasses.replace(layout, recompute="none"),
             seq_length, position, element_bytes, backend).items()
             if kind not in ("final norm", "logits (fp32 softmax)", "document block masks")}  # fmt: skip
    buffers["one layer's backward (gradients of its activations)"] = sum(layer.values()) // model.num_layers
    return buffers


_ROTARY_BYTES: dict[tuple, int] = {}


def rotary_table_bytes(cfg: Config, position, seq_length: int, layout: Layout, element_bytes: int = 4) -> int:
    """What HeadwiseRotaryEmbedding caches for one length, worst TP rank: the angle table
    (`table_bytes`) and its cos/sin (`cos_sin_bytes`, with a copy cast to the activations' `element_bytes`)."""
    from megatron_harpe.position.rotary import HeadwiseRotaryEmbedding

    model = cfg.model
    query_bases, key_bases = position.query_head_bases(model), position.key_head_bases(model)
    key = (repr(position), tuple(query_bases), tuple(key_bases), model.head_dim, seq_length, layout.tensor,
           layout.context, element_bytes)  # fmt: skip
    if key not in _ROTARY_BYTES:
        ranks = (
            HeadwiseRotaryEmbedding(position, query_bases, key_bases, model.head_dim, tp_rank=rank,
                                    tp_size=layout.tensor, cp_size=layout.context)
            for rank in range(layout.tensor)
        )  # fmt: skip
        _ROTARY_BYTES[key] = max(r.table_bytes(seq_length) + r.cos_sin_bytes(seq_length, element_bytes) for r in ranks)
    return _ROTARY_BYTES[key]


def unit_parameters(cfg: Config, tp: int) -> tuple[int, int]:
    """(parameters of one transformer layer, of the root unit: embedding, output layer, final
    norm) on one TP rank: the engine's units of all-gather and reduce-scatter."""
    model = cfg.model
    total = parameters_per_rank(model, tp)
    layer = (total - parameters_per_rank(dataclasses.replace(model, num_layers=0), tp)) // model.num_layers
    return layer, total - model.num_layers * layer


def estimate_memory(cfg: Config, layout: Layout, precision: Precision | None = None, *,
                    stage: StageConfig | None = None, backend: str | None = None, device: str = "gpu",
                    hardware: Hardware | None = None) -> MemoryEstimate:  # fmt: skip
    """Peak memory of one rank: the engine's sharded state and unsharded units, one micro-batch of
    activations, rotary tables, the largest transient buffer (an upper bound: gradients fill up
    while activations drain during backward), and on GPUs the headroom of `hardware`."""
    precision = precision or trainer_precision(cfg, device)
    stage = stage or longest_stage(cfg)
    position, e = stage.position, precision.activation_bytes
    seq_length = planned_sequence_length(cfg, stage, layout.context, layout.tensor, backend)  # + THD padding
    params = parameters_per_rank(cfg.model, layout.tensor)
    layer_params, root_params = unit_parameters(cfg, layout.tensor)

    def activations_with(**recompute) -> dict[str, int]:
        variant = dataclasses.replace(layout, **recompute)
        return activation_breakdown(cfg, variant, seq_length, position, e, backend, device)

    breakdown = activations_with()
    by_recompute = {"none": sum(activations_with(recompute="none").values()),
                    "full": sum(activations_with(recompute="full", recompute_method="uniform",
                                                 recompute_num_layers=None).values()),
                    layout.recompute_label(cfg.model.num_layers): sum(breakdown.values())}  # fmt: skip
    memory = MemoryEstimate(
        layout=layout,
        precision=precision,
        parameters=params,
        sharded=engine_memory.sharded_states(params, layout.data * layout.context),
        unit_buffers=engine_memory.unit_buffers(layer_params, root_params, precision.unit_bytes),
        autocast_copies=2 * params if precision.autocast_copies else 0,
        activations=sum(breakdown.values()),
        activations_by_recompute=by_recompute,
        activation_breakdown=breakdown,
        rotary_tables=rotary_table_bytes(cfg, position, seq_length, layout, e)
        * rotary_table_copies(cfg, layout.micro_batch),
        transient={
            **transient_buffers(cfg, layout, seq_length, position, e, backend),
            **sdpa_mask_bytes(cfg, layout.micro_batch, seq_length, backend),
        },
        headroom={},
    )
    if device == "gpu":
        figures = (hardware or Hardware()).headroom
        memory.headroom = engine_memory.headroom(figures, layout.tensor, layout.context, layout.data, memory.tensors)
    return memory


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


def forward_flops_by_part(cfg: Config, seq_length: int) -> dict[str, float]:
    """One token's forward FLOPs by part: the layers' attention projections, MLPs and causal
    attention (all layers), and the output layer."""
    model = cfg.model
    h, d, heads, groups = model.hidden_size, model.head_dim, model.num_attention_heads, model.kv_groups
    layers = model.num_layers
    return {
        "projections": 2.0 * layers * (h * (heads + 2 * groups) * d + heads * d * h),
        "mlp": 2.0 * layers * 3 * h * model.ffn_hidden_size,
        "attention": 2.0 * seq_length * heads * d * layers,
        "logits": 2.0 * h * model.vocab_size,
    }


def model_flops_per_token(cfg: Config, seq_length: int) -> float:
    """One token's model FLOPs, forward and backward (3x the forward), without recompute: the
    numerator of MFU."""
    matmul, attention = forward_flops_per_token(cfg, seq_length)
    return 3 * (matmul + attention)


def forward_flops_per_token(cfg: Config, seq_length: int) -> tuple[float, float]:
    """(matmul FLOPs, causal attention FLOPs) of one token's forward pass."""
    parts = forward_flops_by_part(cfg, seq_length)
    return parts["projections"] + parts["mlp"] + parts["logits"], parts["attention"]


def recompute_flops_per_token(cfg: Config, layout: Layout, seq_length: int) -> dict[str, float]:
    """The forward FLOPs recompute adds per token, by part."""
    parts = forward_flops_by_part(cfg, seq_length)
    if layout.recompute == "full":
        share = layout.recomputed_layers(cfg.model.num_layers) / cfg.model.num_layers
        return {part: share * parts[part] for part in ("projections", "mlp", "attention")}
    if layout.recompute == "selective":
        names = {"core_attn": "attention", "mlp": "mlp"}
        return {names[module]: parts[names[module]] for module in layout.recompute_modules}
    return {}


def estimate_step(cfg: Config, layout: Layout, hardware: Hardware, precision: Precision | None = None,
                  *, stage: StageConfig | None = None, backend: str | None = None) -> StepEstimate:  # fmt: skip
    precision = precision or trainer_precision(cfg)
    stage = stage or longest_stage(cfg)
    backend = backend or cfg.model.attention_backend
    seq_length = stage.seq_length
    attention = forward_flops_per_token(cfg, seq_length)[1]
    model_flops = model_flops_per_token(cfg, seq_length)
    extra = recompute_flops_per_token(cfg, layout, seq_length)
    executed = model_flops + sum(extra.values())
    tokens = stage.global_batch_size * seq_length
    executed_tokens = tokens * planned_sequence_length(cfg, stage, layout.context, layout.tensor, backend) / seq_length
    compute = executed_tokens * executed / (layout.gpus * hardware.peak_tflops * 1e12 * hardware.utilization)
    attention_executed = 3 * attention + extra.get("attention", 0.0)
    parts = forward_flops_by_part(cfg, seq_length)
    layer_params, root_params = unit_parameters(cfg, layout.tensor)
    items = communication_items(
        cfg, layout, hardware, precision, stage, backend, compute_seconds=compute,
        attention_fraction=attention_executed / executed,
        recomputed_fraction={part: extra.get(part, 0.0) / parts[part] for part in ("projections", "mlp", "attention")},
        unit_parameters=(layer_params, root_params),
    )  # fmt: skip
    comm: dict[str, float] = {}
    for item in items:
        comm[item.dimension] = comm.get(item.dimension, 0.0) + item.sent_bytes
    exposed = sum(item.exposed_seconds for item in items)
    return StepEstimate(tokens, model_flops, executed, compute + exposed, comm, compute, items)


def schedule_seconds(cfg: Config, layout: Layout, hardware: Hardware, precision: Precision | None = None,
                     backend: str | None = None) -> float:  # fmt: skip
    """The whole schedule's time: each stage's steps at that stage's step time."""
    seconds = 0.0
    for stage in cfg.resolved_stages():
        steps = math.ceil(stage.tokens / (stage.global_batch_size * stage.seq_length))
        seconds += steps * estimate_step(cfg, layout, hardware, precision, stage=stage, backend=backend).step_seconds
    return seconds


@dataclasses.dataclass
class LayoutPlan:
    layout: Layout
    memory: MemoryEstimate
    step: StepEstimate
    """The longest stage's step."""
    schedule_seconds: float = 0.0

    def fits(self, hardware: Hardware) -> bool:
        return self.memory.total <= hardware.memory_gib * GIB


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int, *, backend: str | None = None,
                      sequence_parallel: bool | None = None, cp_comm: str | None = None) -> list[Layout]:  # fmt: skip
    """Every TP x CP x DP x micro-batch combination the config and GPU count allow (without
    recompute; `recompute_options` adds those). Tensor parallelism stays inside a node (its
    collectives are on the critical path). Backend, sequence parallelism and CP communication
    default to the config's."""
    model, train = cfg.model, cfg.train
    backend = backend or model.attention_backend
    if sequence_parallel is None:
        sequence_parallel = cfg.parallel.sequence_parallel and backend == "te"
    if cp_comm is None:
        cp_comm = cfg.parallel.resolved_cp_comm_type(model) if backend == model.attention_backend else (
            "p2p" if backend == "te" else "all_gather")  # fmt: skip
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
            if sequence_parallel and tp > 1 and any((stage.seq_length // cp) % tp for stage in cfg.resolved_stages()):
                continue
            dp = gpus // (tp * cp)
            for micro in sorted({1, train.micro_batch_size}):
                if train.global_batch_size % (micro * dp) or seq_length // cp < 1:
                    continue
                layouts.append(
                    Layout(tp, cp, dp, micro, sequence_parallel=sequence_parallel and tp > 1, cp_comm=cp_comm)
                )
    return layouts


def recompute_options(layout: Layout, num_layers: int) -> list[Layout]:
    """The recompute settings the planner weighs for a layout, cheapest in FLOPs first: none,
    selective (core_attn, mlp, both), full on every layer; `rank_layouts` adds the smallest
    partial (block) recompute that fits."""
    variants = [dataclasses.replace(layout, recompute="none")]
    for modules in (("core_attn",), ("mlp",), ("core_attn", "mlp")):
        variants.append(dataclasses.replace(layout, recompute="selective", recompute_modules=modules))
    variants.append(
        dataclasses.replace(layout, recompute="full", recompute_method="uniform", recompute_num_layers=None)
    )
    return variants


def rank_layouts(cfg: Config, hardware: Hardware, gpus: int, precision: Precision | None = None,
                 device: str = "gpu", **options) -> list[LayoutPlan]:  # fmt: skip
    """Layouts (with their recompute) that fit in memory with the headroom, fastest whole schedule
    first (ties: less communication, less memory). For each TP x CP x DP x micro-batch the partial
    recompute is the fewest leading layers (`block`) that make it fit."""
    backend = options.get("backend")
    precision = precision or trainer_precision(cfg, device)
    layers = cfg.model.num_layers

    def plan(layout: Layout) -> LayoutPlan:
        return LayoutPlan(layout,
                          estimate_memory(cfg, layout, precision, backend=backend, device=device, hardware=hardware),
                          estimate_step(cfg, layout, hardware, precision, backend=backend))  # fmt: skip

    plans = []
    for base in candidate_layouts(cfg, gpus, hardware.gpus_per_node, **options):
        variants = [plan(variant) for variant in recompute_options(base, layers)]
        plans += variants
        if variants[0].fits(hardware):  # no recompute fits: partial recompute would only cost time
            continue
        blocks = [dataclasses.replace(base, recompute="full", recompute_method="block", recompute_num_layers=n)
                  for n in range(1, layers)]  # fmt: skip
        smallest = _smallest_fitting(blocks, lambda block: plan(block).fits(hardware))
        if smallest is not None:
            plans.append(plan(smallest))
    fitting = [item for item in plans if item.fits(hardware)]
    for item in fitting:
        item.schedule_seconds = schedule_seconds(cfg, item.layout, hardware, precision, backend)
    return sorted(
        fitting,
        key=lambda item: (float(f"{item.schedule_seconds:.6g}"), sum(item.step.communication_bytes.values()),
                          item.memory.total),
    )  # fmt: skip


def _smallest_fitting(blocks: list[Layout], fits) -> Layout | None:
    """The first layout of `blocks` that fits (memory falls as more layers are recomputed)."""
    low, high = 0, len(blocks)
    while low < high:
        middle = (low + high) // 2
        if fits(blocks[middle]):
            high = middle
        else:
            low = middle + 1
    return blocks[low] if low < len(blocks) else None


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
