"""Communication of one optimizer step, per GPU: volume, link, time, and how much of it compute
hides. `memory.estimate_step` adds the exposed part to the compute time, so layouts differ by
their traffic, not only by their FLOPs.

    step = memory.estimate_step(cfg, layout, Hardware())    # calls communication_items
    exposed = sum(item.exposed_seconds for item in step.communication)

Model (per rank; s = tokens per CP rank, b = micro-batch, h = hidden, e = activation bytes,
m = micro-batches per step, L = layers, P = parameters per rank, n = DP x CP):

- Which link: megatron orders ranks TP fastest, then CP, then DP. A group stays on NVLink when
  its span (stride x size: TP tp, CP tp x cp, DP x CP all GPUs) fits in one node, else the
  per-GPU InfiniBand NIC is its bottleneck. Ring collectives send (k-1)/k of the buffer per
  all-gather or reduce-scatter, twice that per all-reduce; time = bytes sent / link bandwidth.
- TP (exposed: on the critical path of every layer): per layer and forward pass two
  all-reduces of sbh e (attention and MLP outputs), or with sequence parallelism two
  all-gathers + two reduce-scatters (the same volume); backward the same again. Recompute reruns
  the forward collectives of what it recomputes (full: the recomputed layers' share; selective mlp:
  the MLP's half; core attention has none).
- CP, TE p2p: each of cp-1 ring steps sends the local k/v (2 s b g d e) while the previous
  block's attention runs; backward sends k/v and their gradients (twice); recomputed attention
  runs the ring again. Hidden behind the attention compute of the step, exposed beyond it. CP, our
  sdpa all-gather (and TE's all_gather): a synchronous all-gather of k/v per layer and pass, and
  its reduce-scatter in backward: exposed. TE a2a: two all-to-alls of q/k/v per layer and pass each
  way, exposed.
- DP x CP, the sharding engine (PyTorch FSDP2, planner/engine_memory.py): every micro-batch
  all-gathers each layer's weights in the compute dtype for forward and again for backward (layers
  are resharded after forward; the root unit is not), and reduce-scatters its gradients in fp32:
  (n-1)/n of P x (2 u + 4) bytes per micro-batch (u: bytes of the all-gathered weights). The next
  layer is prefetched while the current one computes, so this hides behind the step's compute, less
  the time other overlapped traffic (TE's CP ring) takes on the same link; the first all-gather of
  each micro-batch (root and first layer) has nothing to hide behind.
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
                        attention_fraction: float, recomputed_fraction: dict[str, float],
                        unit_parameters: tuple[int, int]) -> list[CommItem]:  # fmt: skip
    """What each GPU sends in one optimizer step, and how long it takes beyond compute.
    `recomputed_fraction`: the share of the projections', MLPs' and attention's forward rerun by
    recompute; `unit_parameters`: (one layer's, the root unit's) parameters on this TP rank."""
    model = cfg.model
    tp, cp, dp = layout.tensor, layout.context, layout.data
    e, b, s = precision.activation_bytes, layout.micro_batch, stage.seq_length // cp
    micro_batches = stage.global_batch_size // (layout.micro_batch * dp)
    tp_passes = 2 + (recomputed_fraction.get("projections", 0.0) + recomputed_fraction.get("mlp", 0.0)) / 2
    attention_forwards = 1 + recomputed_fraction.get("attention", 0.0)
    bandwidth = {"nvlink": hardware.nvlink_gbs * 1e9, "infiniband": hardware.ib_gbs * 1e9}
    items: list[CommItem] = []

    def add(dimension, what, sent, span, hidden_by="", window=0.0, exposed=None):
        link = group_link(span, hardware.gpus_per_node)
        seconds = sent / bandwidth[link]
        exposed = max(0.0, seconds - window) if exposed is None else exposed
        items.append(CommItem(dimension, what, sent, link, seconds, hidden_by, exposed))

    if tp > 1:
        per_pass = 2 * 2 * (tp - 1) / tp * s * b * model.hidden_size * e
        what = "all-gather + reduce-scatter (sequence parallel)" if layout.sequence_parallel else "all-reduce"
        add("tensor", f"layer outputs, {what}", tp_passes * per_pass * model.num_layers * micro_batches, tp)
    if cp > 1:
        g = (model.num_attention_heads if stage.position.expands_keys(model) else model.kv_groups) // tp
        local_kv = 2 * s * b * g * model.head_dim * e
        per_layer_steps = model.num_layers * micro_batches * (cp - 1) * local_kv
        if backend == "te" and layout.cp_comm == "p2p":
            attention_seconds = compute_seconds * attention_fraction
            add("context", "k/v ring (p2p), overlapped with attention", (attention_forwards + 2) * per_layer_steps,
                tp * cp, "attention", attention_seconds)  # fmt: skip
        elif backend == "te" and layout.cp_comm == "a2a":
            a = model.num_attention_heads // tp
            qkv = s * b * (a + 2 * g) * model.head_dim * e * (cp - 1) / cp
            add("context", "q/k/v all-to-all", 2 * (attention_forwards + 1) * qkv * model.num_layers * micro_batches,
                tp * cp)  # fmt: skip
        else:
            add(
                "context",
                "k/v all-gather + gradient reduce-scatter",
                (attention_forwards + 1) * per_layer_steps,
                tp * cp,
            )
    replicas = dp * cp
    if replicas > 1:
        ring = (replicas - 1) / replicas
        layer, root = unit_parameters
        layers = model.num_layers * layer
        unit = precision.unit_bytes
        gathers = micro_batches * ring * ((layers + root) + layers) * unit
        reduces = micro_batches * ring * (layers + root) * 4
        first = micro_batches * ring * (root + layer) * unit
        link = group_link(layout.gpus, hardware.gpus_per_node)
        busy = sum(item.seconds for item in items if item.hidden_by and item.link == link)  # the CP ring on this link
        window = max(0.0, compute_seconds - busy)
        overlapped = (gathers - first + reduces) / bandwidth[link]
        exposed = max(0.0, overlapped - window)
        name = "bf16" if unit == 2 else "fp32"
        hidden = "the step's compute (next layer prefetched)"
        add("data", f"FSDP2 weight all-gathers ({name}), forward + backward", gathers - first, layout.gpus, hidden,
            exposed=exposed * (gathers - first) / (gathers - first + reduces))  # fmt: skip
        add("data", "FSDP2 gradient reduce-scatters (fp32), every micro-batch", reduces, layout.gpus, hidden,
            exposed=exposed * reduces / (gathers - first + reduces))  # fmt: skip
        add("data", "first all-gather of each micro-batch (root + layer 1)", first, layout.gpus)
    return items
