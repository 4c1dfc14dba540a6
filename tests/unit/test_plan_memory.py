"""The memory/FLOPs planner against figures computed by hand for Llama2-7B at 131072 tokens,
and the planner's CLI.

    python -m pytest tests/unit/test_plan_memory.py -q

Hand figures (Llama2-7B: h 4096, 32 layers, 32 heads of 128, FFN 11008, vocabulary 32000):
- parameters 6,738,415,616 (the published count); per layer 4h^2 + 3*h*11008 = 202,375,168
  matmul weights + 2h norm weights. At TP 4: 32 * (202,375,168/4 + 8192) + 2*32000*4096/4 + 4096
  = 1,684,803,584 per GPU: one layer 50,601,984, the root unit (embedding, output layer, final
  norm) 65,540,096.
- The engine (FSDP2 over DP x CP = 8): 16 bytes per parameter sharded 8 ways; at the peak two
  layers all-gathered in bf16, the root in bf16, one layer's and the root's bf16 gradients, one
  layer's fp32 reduce-scatter input.
- FLOPs per token, forward: matmuls 2*(32*202,375,168 + 4096*32000) = 13,214,154,752 of which the
  output layer 262,144,000; causal attention 2*131072*4096*32 = 34,359,738,368. Training 3x:
  142,721,679,360; full recompute adds the layers' forward (not the output layer's).
- Activations at TP 4 x CP 4, micro-batch 1, bf16 (2 bytes), sdpa backend, per layer (s = 32768
  tokens per rank): norms 2*3*s*4096*2 = 1,610,612,736; SwiGLU 5*s*2752*2 = 901,775,360; gathered
  k/v 2*131072*8*128*2 = 536,870,912; q s*8*128*2 = 67,108,864; outputs 2x that; softmax
  statistics 4*s*8 = 1,048,576.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_harpe.config import load_config
from megatron_harpe.planner.engine_memory import GIB, Headroom
from megatron_harpe.planner.memory import (
    PRECISIONS,
    Hardware,
    Layout,
    candidate_layouts,
    config_layout,
    estimate_memory,
    estimate_step,
    forward_flops_per_token,
    rank_layouts,
    unit_parameters,
)

REPO = Path(__file__).resolve().parents[2]
LLAMA = REPO / "configs" / "llama2_7b_128k_harpe.yaml"
PAPER_LAYOUT = Layout(tensor=4, context=4, data=2, micro_batch=1)
PER_RANK, LAYER, ROOT = 1_684_803_584, 50_601_984, 65_540_096
PER_LAYER = {
    "norms": 1_610_612_736,
    "mlp": 901_775_360,
    "cp gathered k/v": 536_870_912,
    "attention q/k/v": 67_108_864,
    "attention output": 134_217_728,
    "softmax statistics": 1_048_576,
}
FINAL_NORM = 3 * 32768 * 4096 * 2
LOGITS = 4 * 32768 * 8000
LAYER_FORWARD = 2 * 32 * 202_375_168 + 34_359_738_368  # what full recompute of all layers adds per token

SDPA = ["model.attention_backend=sdpa", "parallel.sequence_parallel=false", "parallel.cp_comm_type=auto"]


@pytest.fixture(scope="module")
def llama():
    """The 7B preset on the sdpa path (the path CPU runs measure)."""
    return load_config(LLAMA, SDPA).validate(world_size=32)


@pytest.fixture(scope="module")
def preset():
    """The 7B preset as written: TE attention, p2p CP, sequence parallelism (the CUDA plan)."""
    return load_config(LLAMA).validate(world_size=32, require_backend=False)


def test_parameters_and_the_engine_bytes(llama) -> None:
    assert estimate_memory(llama, Layout()).parameters == 6_738_415_616
    assert unit_parameters(llama, 4) == (LAYER, ROOT) and 32 * LAYER + ROOT == PER_RANK
    memory = estimate_memory(llama, PAPER_LAYOUT)  # the trainer on GPU: bf16 compute, fp32 state
    assert memory.precision == PRECISIONS["bf16"]
    assert memory.parameters == PER_RANK
    assert memory.sharded == {"fp32 weights": 4 * PER_RANK // 8, "fp32 gradients": 4 * PER_RANK // 8,
                              "AdamW moments (2 x fp32)": 8 * PER_RANK // 8}  # fmt: skip
    assert sum(memory.unit_buffers.values()) == 2 * 2 * LAYER + 2 * ROOT + 2 * LAYER + 2 * ROOT + 4 * LAYER
    assert memory.autocast_copies == 0
    # no full copy of the gradients anywhere: one layer's and the root's, unsharded
    assert sum(v for k, v in memory.unit_buffers.items() if "gradient" in k or "reduce-scatter" in k) < PER_RANK

    autocast = estimate_memory(llama, PAPER_LAYOUT, PRECISIONS["autocast"])
    assert autocast.autocast_copies == 2 * PER_RANK  # bf16 copies of the whole TP shard, forward to backward
    assert sum(autocast.unit_buffers.values()) == 4 * (2 * LAYER + ROOT + LAYER + ROOT)  # fp32 units, no cast
    assert estimate_memory(llama, PAPER_LAYOUT, device="cpu").precision == PRECISIONS["bf16"]  # bf16 on CPU too


def test_headroom_is_counted_on_gpus_only(llama) -> None:
    memory = estimate_memory(llama, PAPER_LAYOUT, hardware=Hardware(headroom=Headroom(1.5, 0.5, 0.2)))
    assert list(memory.headroom.values()) == [int(1.5 * GIB), 4 * GIB // 2, int(0.2 * memory.tensors)]
    assert "4 communicators: TP, CP, DP x CP, default" in list(memory.headroom)[1]
    assert memory.total == memory.tensors + sum(memory.headroom.values())
    one_gpu = estimate_memory(llama, Layout())
    assert "0 communicators" in list(one_gpu.headroom)[1] and list(one_gpu.headroom.values())[1] == 0
    assert estimate_memory(llama, PAPER_LAYOUT, device="cpu").headroom == {}


def test_flops_per_token(llama) -> None:
    matmul, attention = forward_flops_per_token(llama, 131072)
    assert (matmul, attention) == (13_214_154_752, 34_359_738_368)
    step = estimate_step(llama, PAPER_LAYOUT, Hardware())
    assert step.model_flops_per_token == 142_721_679_360
    assert step.executed_flops_per_token == step.model_flops_per_token
    full = estimate_step(llama, Layout(4, 4, 2, recompute="full"), Hardware(peak_tflops=989, utilization=0.4))
    assert full.executed_flops_per_token == 142_721_679_360 + LAYER_FORWARD
    assert full.tokens_per_step == 32 * 131072
    assert full.compute_seconds == pytest.approx(32 * 131072 * (142_721_679_360 + LAYER_FORWARD) / (32 * 989e12 * 0.4))
    assert full.step_seconds == pytest.approx(full.compute_seconds + full.exposed_communication_seconds)
    block = estimate_step(llama, Layout(4, 4, 2, recompute="full", recompute_method="block", recompute_num_layers=8),
                          Hardware())  # fmt: skip
    assert block.executed_flops_per_token == 142_721_679_360 + LAYER_FORWARD / 4
    mlp = estimate_step(llama, Layout(4, 4, 2, recompute="selective", recompute_modules=("mlp",)), Hardware())
    assert mlp.executed_flops_per_token == 142_721_679_360 + 2 * 32 * 3 * 4096 * 11008
    attention_only = estimate_step(llama, Layout(4, 4, 2, recompute="selective"), Hardware())
    assert attention_only.executed_flops_per_token == 142_721_679_360 + 34_359_738_368


def test_communication_of_the_paper_layout(preset) -> None:
    """Hand-computed: TP4 on NVLink (360 GB/s), CP4 and DP x CP 8 across nodes (40 GB/s)."""
    layout = config_layout(preset, 32)
    assert layout == Layout(4, 4, 2, 1, "none", sequence_parallel=True, cp_comm="p2p")
    step = estimate_step(preset, layout, Hardware())
    items = {item.dimension + ":" + item.what.split(",")[0]: item for item in step.communication}
    compute = 32 * 131072 * 142_721_679_360 / (32 * 989e12 * 0.4)
    # TP: 2 all-gathers + 2 reduce-scatters of s*h*e per layer and pass, 3/4 of it sent, 2 passes,
    # 32 layers x 16 micro-batches
    tensor = items["tensor:layer outputs"]
    assert tensor.sent_bytes == 2 * 4 * 0.75 * 32768 * 4096 * 2 * 32 * 16 == 768 * GIB
    assert tensor.link == "nvlink" and tensor.exposed_seconds == pytest.approx(768 * GIB / 360e9)
    # CP p2p: 3 ring steps of local k/v (2 x 32768 x 8 heads x 128 x 2 B) per layer, 3 rounds
    # (forward, backward k/v + grads)
    context = items["context:k/v ring (p2p)"]
    assert context.sent_bytes == 3 * 3 * 2 * 32768 * 8 * 128 * 2 * 32 * 16 == 576 * GIB
    assert context.link == "infiniband" and context.seconds == pytest.approx(576 * GIB / 40e9)
    assert context.exposed_seconds == 0.0  # 15.5 s under the attention's share of 47.3 s
    # DP x CP = 8, FSDP2 every micro-batch: bf16 all-gathers forward (all) and backward (layers), fp32 reduce-scatter
    gathers, reduces = (
        items["data:FSDP2 weight all-gathers (bf16)"],
        items["data:FSDP2 gradient reduce-scatters (fp32)"],
    )
    first = items["data:first all-gather of each micro-batch (root + layer 1)"]
    assert first.sent_bytes == 16 * 7 / 8 * (ROOT + LAYER) * 2
    assert gathers.sent_bytes + first.sent_bytes == pytest.approx(16 * 7 / 8 * (PER_RANK + 32 * LAYER) * 2)
    assert reduces.sent_bytes == pytest.approx(16 * 7 / 8 * PER_RANK * 4)
    assert gathers.link == reduces.link == "infiniband"
    assert gathers.exposed_seconds == reduces.exposed_seconds == 0.0  # 4.6 s beside the ring's 15.5 s, within 47.3 s
    assert first.exposed_seconds == pytest.approx(first.sent_bytes / 40e9)
    assert step.step_seconds == pytest.approx(compute + 768 * GIB / 360e9 + first.sent_bytes / 40e9)


def test_engine_traffic_is_exposed_when_the_link_is_busy(preset) -> None:
    """The engine's all-gathers share InfiniBand with the CP ring: on a slow link they stop hiding."""
    layout = config_layout(preset, 32)
    slow = estimate_step(preset, layout, Hardware(ib_gbs=5))
    data = [item for item in slow.communication if item.dimension == "data" and item.hidden_by]
    assert sum(item.exposed_seconds for item in data) > 0


def test_step_times_differ_by_their_communication(llama, preset) -> None:
    """The same FLOPs, different traffic: sdpa's synchronous k/v all-gather is exposed, TE's ring is not;
    slower links make the same layout slower."""
    layout = Layout(4, 4, 2, 1, "full")
    sdpa = estimate_step(llama, layout, Hardware())
    te = estimate_step(preset, dataclasses.replace(config_layout(preset, 32), recompute="full"), Hardware())
    assert sdpa.compute_seconds == pytest.approx(te.compute_seconds)
    gathered = [item for item in sdpa.communication if item.dimension == "context"][0]
    assert gathered.sent_bytes == 3 * 3 * 2 * 32768 * 8 * 128 * 2 * 32 * 16  # 2 forwards + 1 backward
    assert gathered.exposed_seconds == pytest.approx(gathered.sent_bytes / 40e9)
    assert sdpa.step_seconds > te.step_seconds + 10
    slow = estimate_step(preset, config_layout(preset, 32), Hardware(nvlink_gbs=100, ib_gbs=10))
    assert slow.step_seconds > estimate_step(preset, config_layout(preset, 32), Hardware()).step_seconds


def test_the_paper_preset_runs_the_planners_choice_under_60_s_within_80_gib(preset) -> None:
    """The issue's bar: the preset is the fastest layout that fits 80 GiB with the headroom, and
    its step is under 60 s with the recompute chosen."""
    hardware = Hardware(memory_gib=80)
    layout = config_layout(preset, 32)
    best = rank_layouts(preset, hardware, gpus=32)[0]
    assert best.layout == layout
    assert best.step.step_seconds < 60
    assert best.memory.total <= 80 * GIB and sum(best.memory.headroom.values()) > 4 * GIB


def test_activations_without_recomputation(llama) -> None:
    memory = estimate_memory(llama, PAPER_LAYOUT)
    breakdown = memory.activation_breakdown
    for kind, per_layer in PER_LAYER.items():
        assert breakdown[kind] == 32 * per_layer, kind
    assert breakdown["final norm"] == FINAL_NORM
    assert breakdown["logits (fp32 softmax)"] == LOGITS
    assert memory.activations == 32 * sum(PER_LAYER.values()) + FINAL_NORM + LOGITS == 105_906_176_000
    assert memory.transient["one layer's backward (gradients of its activations)"] == sum(PER_LAYER.values())


def test_activations_with_full_recomputation(llama) -> None:
    memory = estimate_memory(llama, Layout(4, 4, 2, recompute="full"))
    layer_inputs = 32 * 32768 * 4096 * 2  # 8 GiB: each layer keeps its bf16 input
    assert memory.activations == layer_inputs + sum(PER_LAYER.values()) + FINAL_NORM + LOGITS
    assert memory.activations_by_recompute["none"] == 105_906_176_000
    chunks = estimate_memory(llama, Layout(4, 4, 2, recompute="full", recompute_num_layers=4))  # uniform chunks of 4
    assert chunks.activations == layer_inputs // 4 + 4 * sum(PER_LAYER.values()) + FINAL_NORM + LOGITS


@pytest.mark.parametrize("recomputed", [1, 8, 31, 32])
def test_partial_recompute_keeps_the_other_layers(llama, recomputed) -> None:
    """block N: the first N layers keep their inputs, the rest everything; one recomputed layer is
    rebuilt only after the kept layers' backward freed theirs."""
    layout = Layout(4, 4, 2, recompute="full", recompute_method="block", recompute_num_layers=recomputed)
    memory = estimate_memory(llama, layout)
    kept = max(32 - recomputed, 1)
    assert memory.activations == recomputed * 32768 * 4096 * 2 + kept * sum(PER_LAYER.values()) + FINAL_NORM + LOGITS
    assert layout.recompute_label(32) == f"block {recomputed}/32"


def test_selective_recomputation(llama) -> None:
    attention = estimate_memory(llama, Layout(4, 4, 2, recompute="selective")).activation_breakdown
    assert "cp gathered k/v" not in attention and "softmax statistics" not in attention
    local_qkv = 32768 * (8 + 2 * 8) * 128 * 2  # the fused QKV output the value view keeps alive
    rotated_qk = 32768 * (8 + 8) * 128 * 2
    assert attention["attention q/k/v"] == 32 * (local_qkv + rotated_qk)
    mlp = estimate_memory(
        llama, Layout(4, 4, 2, recompute="selective", recompute_modules=("mlp",))
    ).activation_breakdown
    assert "mlp" not in mlp and mlp["norms"] == 32 * PER_LAYER["norms"]  # sdpa: the norms stay separate modules


def test_rotary_tables_are_one_sixteenth_of_the_full_table(llama) -> None:
    # 128k x 32 heads x 128 dims in fp32 is 2 GiB; a TP4 x CP4 rank holds 1/16 of it,
    # plus the cos/sin cached with it (once for all layers): half width, 8 distinct local bases,
    # fp32 and one bf16 copy for the bf16 activations
    angles = 2 * GIB // 16
    cos_sin = 2 * 32768 * 8 * 64 * (4 + 2)
    assert estimate_memory(llama, PAPER_LAYOUT).rotary_tables == angles + cos_sin


def test_sequence_parallelism_splits_the_norms(llama) -> None:
    te = estimate_memory(llama, Layout(4, 4, 2, sequence_parallel=True, cp_comm="p2p"), backend="te")
    assert te.activation_breakdown["norms"] == 32 * 2 * 2 * 32768 * 4096 * 2 // 4  # fused norm: 2 tensors, /TP
    assert "cp gathered k/v" not in te.activation_breakdown  # TE keeps local k/v; the ring is transient
    assert te.transient["cp k/v ring (double-buffered)"] == 2 * 2 * 32768 * 8 * 128 * 2
    mlp = estimate_memory(llama, Layout(4, 4, 2, recompute="selective", recompute_modules=("mlp",),
                                        sequence_parallel=True, cp_comm="p2p"), backend="te")  # fmt: skip
    assert mlp.activation_breakdown["norms"] == 32 * 3 * 32768 * 4096 * 2 // 4  # TE's pre-MLP norm reruns with fc1


def test_layouts_that_fit_are_ranked(llama, preset) -> None:
    hardware = Hardware(memory_gib=80)
    plans = rank_layouts(llama, hardware, gpus=32)
    assert plans, "the paper's run fits 32 x 80 GB"
    assert all(plan.fits(hardware) and plan.layout.gpus == 32 for plan in plans)
    times = [plan.schedule_seconds for plan in plans]
    assert times == sorted(times)
    eight = rank_layouts(llama, hardware, gpus=8)
    assert eight and all(p.layout.gpus == 8 for p in eight)  # 128k on one 8-GPU node
    assert any(p.layout.data > 1 for p in eight)  # ZeRO-3 sharding over DP x CP lets data parallelism fit too
    assert rank_layouts(llama, Hardware(memory_gib=24), gpus=1) == []


def test_partial_recompute_is_the_fewest_layers_that_fit(preset) -> None:
    """On 56 GiB GPUs TP4 x CP4 fits only with recompute: the planner offers the fewest leading
    layers (block) whose recompute makes it fit, and one fewer does not fit."""
    hardware = Hardware(memory_gib=56)
    plans = [plan for plan in rank_layouts(preset, hardware, gpus=32)
             if (plan.layout.tensor, plan.layout.context) == (4, 4)
             and plan.layout.recompute_method == "block"]  # fmt: skip
    (block,) = plans
    fewer = dataclasses.replace(block.layout, recompute_num_layers=block.layout.recompute_num_layers - 1)
    assert not estimate_memory(preset, fewer, hardware=hardware).total <= 56 * GIB
    assert (
        not estimate_memory(preset, dataclasses.replace(block.layout, recompute="none"), hardware=hardware).total
        <= 56 * GIB
    )


def test_candidate_layouts_respect_the_model(llama) -> None:
    layouts = candidate_layouts(llama, gpus=64, gpus_per_node=8)
    assert layouts and all(layout.gpus == 64 and layout.tensor <= 8 for layout in layouts)
    assert {layout.tensor for layout in layouts} == {1, 2, 4, 8}
    a2a = candidate_layouts(llama, gpus=64, gpus_per_node=8, backend="te", cp_comm="a2a")
    assert all((32 // layout.tensor) % layout.context == 0 for layout in a2a)  # k/v heads split over CP


def test_cli_plans_the_paper_run(capsys) -> None:
    from megatron_harpe.commands import plan_memory

    assert plan_memory.main(["--config", str(LLAMA), "--gpus", "32", "--gpu-memory", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "6.738B parameters" in out and "4,194,304 tokens per step" in out
    assert "tensor 4 x context 4 x data 2" in out and "with the headroom: fits" in out
    assert "PyTorch FSDP2" in out and "8 ranks" in out  # the engine, named
    for item in ("CUDA context", "NCCL buffers (4 communicators", "allocator fragmentation (10% of the tensors)"):
        assert "headroom" in out and item in out, item
    assert "nccl#964" in out and "pytorch#107667" in out  # the figures' sources
    assert "layouts that fit with the headroom, fastest schedule first" in out
    assert "exposed communication" in out and "k/v ring (p2p)" in out and "InfiniBand 40 GB/s" in out
    assert "recommended: #1, 49.7 s per step" in out and "the config already runs it" in out
    assert "train.recompute=none" in out

    assert plan_memory.main(["--config", str(LLAMA), "--gpus", "1", "--gpu-memory", "24"]) == 1
    assert "no layout fits" in capsys.readouterr().out
    assert plan_memory.main(["--config", str(LLAMA), "--gpus", "32", "--tensor-parallel", "3"]) == 2
