"""Communication of one optimizer step, per GPU: volume, link, time, and how much of it compute
hides. `memory.estimate_step` adds the exposed part to the compute time, so layouts differ by
their traffic, not only by their FLOPs.

    items = communication_items(cfg, layout, hardware, precision, stage, backend, compute_seconds=63.0)
    exposed = sum(item.exposed_seconds for item in items)

Model (per rank; s = tokens per CP rank, b = micro-batch, h = hidden, e = activation bytes,
m = micro-batches per step, L = layers, P = parameters per rank, n = DP x CP):

- Which link: megatron orders ranks TP fastest, then CP, then DP. A group stays on NVLink when
  its span (stride x size: TP tp, CP tp x cp, DP x CP all GPUs) fits in one node, else the
  per-GPU InfiniBand NIC is its bottleneck. Ring collectives send (k-1)/k of the buffer per
  all-gather or reduce-scatter, twice that per all-reduce; time = bytes sent / link bandwidth.
- TP (exposed: on the critical path of every layer): per layer and forward pass two
  all-reduces of sbh e (attention and MLP outputs), or with sequence parallelism two
  all-gathers + two reduce-scatters (the same volume); backward the same again. Full
  recompute runs the forward twice.
- CP, TE p2p: each of cp-1 ring steps sends the local k/v (2 s b g d e) while the previous
  block's attention runs; backward sends k/v and their gradients (twice). Hidden behind the
  attention compute of the step, exposed beyond it. CP, our sdpa all-gather (and TE's
  all_gather): a synchronous all-gather of k/v per layer and pass, and its reduce-scatter in
  backward: exposed. TE a2a: two all-to-alls of q/k/v per layer and pass each way, exposed.
- DP x CP gradients (what training/sharded_optimizer.py and grad_overlap.py do): all-reduce of
  fp32 gradients 2 (n-1)/n P x 4 B (under bf16 params their fp32 main gradients); with optimizer
  sharding each owner then broadcasts the weights it updated, (n-1)/n P x weight bytes per GPU
  (2 B under bf16 params; megatron's reduce-scatter would halve
  the gradient traffic). With `overlap_grad_reduce` the gradient reduction runs during the
  backward of the last micro-batch (hidden up to that time); the weight broadcast is exposed.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CommItem:
    dimension: str
    """tensor | context | data"""
    what: str
    sent_bytes: float
    link: str
    """nvlink | infiniband"""
    seconds: float
    hidden_by: str
    """The compute it overlaps with ('' when it is on the critical path)."""
    exposed_seconds: float


def group_link(span: int, gpus_per_node: int) -> str:
    return "nvlink" if span <= gpus_per_node else "infiniband"


def communication_items(cfg, layout, hardware, precision, stage, backend: str, *, compute_seconds: float,
                        attention_fraction: float, parameters: int) -> list[CommItem]:  # fmt: skip
    """What each GPU sends in one optimizer step, and how long it takes beyond compute."""
    model = cfg.model
    tp, cp, dp = layout.tensor, layout.context, layout.data
    e, b, s = precision.activation_bytes, layout.micro_batch, stage.seq_length // cp
    micro_batches = stage.global_batch_size // (layout.micro_batch * dp)
    forward_passes = 2 if layout.recompute == "full" else 1
    bandwidth = {"nvlink": hardware.nvlink_gbs * 1e9, "infiniband": hardware.ib_gbs * 1e9}
    items: list[CommItem] = []

    def add(dimension, what, sent, span, hidden_by="", window=0.0):
        link = group_link(span, hardware.gpus_per_node)
        seconds = sent / bandwidth[link]
        items.append(CommItem(dimension, what, sent, link, seconds, hidden_by, max(0.0, seconds - window)))

    if tp > 1:
        per_pass = 2 * 2 * (tp - 1) / tp * s * b * model.hidden_size * e
        what = "all-gather + reduce-scatter (sequence parallel)" if layout.sequence_parallel else "all-reduce"
        add("tensor", f"layer outputs, {what}", (forward_passes + 1) * per_pass * model.num_layers * micro_batches, tp)
    if cp > 1:
        g = (model.num_attention_heads if stage.position.expands_keys(model) else model.kv_groups) // tp
        local_kv = 2 * s * b * g * model.head_dim * e
        per_layer_steps = model.num_layers * micro_batches * (cp - 1) * local_kv
        if backend == "te" and layout.cp_comm == "p2p":
            attention_seconds = compute_seconds * attention_fraction
            add("context", "k/v ring (p2p), overlapped with attention", (forward_passes + 2) * per_layer_steps,
                tp * cp, "attention", attention_seconds)  # fmt: skip
        elif backend == "te" and layout.cp_comm == "a2a":
            a = model.num_attention_heads // tp
            qkv = s * b * (a + 2 * g) * model.head_dim * e * (cp - 1) / cp
            add("context", "q/k/v all-to-all", 2 * (forward_passes + 1) * qkv * model.num_layers * micro_batches, tp * cp)
        else:
            add("context", "k/v all-gather + gradient reduce-scatter", (forward_passes + 1) * per_layer_steps, tp * cp)
    replicas = dp * cp
    if replicas > 1:
        ring = (replicas - 1) / replicas
        last_backward = compute_seconds / micro_batches * 2 / 3 if layout.overlap_grad_reduce else 0.0
        hidden_by = "backward of the last micro-batch" if layout.overlap_grad_reduce else ""
        add("data", "gradient all-reduce (fp32)", 2 * ring * parameters * 4, layout.gpus, hidden_by, last_backward)
        if layout.optimizer_sharding:  # sharded_optimizer.py: each owner broadcasts what it updated
            add("data", "updated weight broadcast from owners", ring * parameters * precision.stored_weight_bytes,
                layout.gpus)  # fmt: skip
    return items
