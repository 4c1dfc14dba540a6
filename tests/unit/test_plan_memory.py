"""The memory/FLOPs planner against figures computed by hand for Llama2-7B at 131072 tokens,
and the planner's CLI.

    python -m pytest tests/unit/test_plan_memory.py -q

Hand figures (Llama2-7B: h 4096, 32 layers, 32 heads of 128, FFN 11008, vocabulary 32000):
- parameters 6,738,415,616 (the published count); per layer 4h^2 + 3*h*11008 = 202,375,168
  matmul weights + 2h norm weights. At TP 4: 32 * (202,375,168/4 + 8192) + 2*32000*4096/4 + 4096
  = 1,684,803,584 per GPU.
- FLOPs per token, forward: matmuls 2*(32*202,375,168 + 4096*32000) = 13,214,154,752; causal
  attention 2*131072*4096*32 = 34,359,738,368. Training 3x: 142,721,679,360; full recompute 4x.
- Activations at TP 4 x CP 4, micro-batch 1, bf16 (2 bytes), sdpa backend, per layer (s = 32768
  tokens per rank): norms 2*3*s*4096*2 = 1,610,612,736; SwiGLU 5*s*2752*2 = 901,775,360; HARPE
  cos/sin 2*(8+8)*s*128*2 = 268,435,456; gathered k/v 2*131072*8*128*2 = 536,870,912; q
  s*8*128*2 = 67,108,864; outputs 2x that; softmax statistics 4*s*8 = 1,048,576.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_harpe.config import load_config
from megatron_harpe.training.memory import (
    GIB,
    PRECISIONS,
    Hardware,
    Layout,
    config_layout,
    candidate_layouts,
    estimate_memory,
    estimate_step,
    forward_flops_per_token,
    rank_layouts,
)

REPO = Path(__file__).resolve().parents[2]
LLAMA = REPO / "configs" / "llama2_7b_128k_harpe.yaml"
PAPER_LAYOUT = Layout(tensor=4, context=4, data=2, micro_batch=1)
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


SDPA = ["model.attention_backend=sdpa", "parallel.sequence_parallel=false", "parallel.cp_comm_type=auto"]


@pytest.fixture(scope="module")
def llama():
    """The 7B preset on the sdpa path (the path CPU runs measure)."""
    return load_config(LLAMA, SDPA).validate(world_size=32)


@pytest.fixture(scope="module")
def preset():
    """The 7B preset as written: TE attention, p2p CP, sequence parallelism (the CUDA plan)."""
    return load_config(LLAMA).validate(world_size=32, require_backend=False)


def test_parameters_and_their_bytes(llama) -> None:
    assert estimate_memory(llama, Layout()).parameters == 6_738_415_616
    memory = estimate_memory(llama, PAPER_LAYOUT)  # the trainer on GPU: bf16 params, fp32 main grads and weights
    assert memory.precision == PRECISIONS["bf16"]
    assert memory.parameters == 1_684_803_584
    assert memory.weights == 2 * 1_684_803_584
    assert memory.gradients == 4 * 1_684_803_584
    assert memory.optimizer == memory.optimizer_unsharded == 12 * 1_684_803_584  # main weights + 2 moments
    assert memory.optimizer_sharded == 12 * 1_684_803_584 // 8  # over DP 2 x CP 4

    autocast = estimate_memory(llama, Layout(4, 4, 2, optimizer_sharding=True), PRECISIONS["autocast"])
    assert autocast.weights == 6 * 1_684_803_584  # fp32 weights + their bf16 copies
    assert autocast.optimizer == 8 * 1_684_803_584 // 8
    assert estimate_memory(llama, PAPER_LAYOUT, device="cpu").precision == PRECISIONS["bf16"]  # precision: bf16 on CPU too


def test_flops_per_token(llama) -> None:
    matmul, attention = forward_flops_per_token(llama, 131072)
    assert (matmul, attention) == (13_214_154_752, 34_359_738_368)
    step = estimate_step(llama, PAPER_LAYOUT, Hardware())
    assert step.model_flops_per_token == 142_721_679_360
    assert step.executed_flops_per_token == step.model_flops_per_token
    full = estimate_step(llama, Layout(4, 4, 2, recompute="full"), Hardware(peak_tflops=989, utilization=0.4))
    assert full.executed_flops_per_token == 4 * (13_214_154_752 + 34_359_738_368)
    assert full.tokens_per_step == 32 * 131072
    assert full.compute_seconds == pytest.approx(32 * 131072 * 190_295_572_480 / (32 * 989e12 * 0.4))
    assert full.step_seconds == pytest.approx(full.compute_seconds + full.exposed_communication_seconds)


def test_communication_of_the_paper_layout(preset) -> None:
    """Hand-computed: TP4 on NVLink (360 GB/s), CP4 and DP x CP 8 across nodes (40 GB/s)."""
    layout = config_layout(preset, 32)
    assert layout == Layout(4, 4, 2, 1, "full", sequence_parallel=True, optimizer_sharding=True, cp_comm="p2p",
                            overlap_grad_reduce=True)
    step = estimate_step(preset, layout, Hardware())
    items = {item.dimension + ":" + item.what.split(",")[0]: item for item in step.communication}
    compute = 32 * 131072 * 190_295_572_480 / (32 * 989e12 * 0.4)
    # TP: 2 all-gathers + 2 reduce-scatters of s*h*e per layer and pass, 3/4 of it sent, 3 passes (2 fwd + bwd), 32 layers x 16 micro-batches
    tensor = items["tensor:layer outputs"]
    assert tensor.sent_bytes == 3 * 4 * 0.75 * 32768 * 4096 * 2 * 32 * 16 == 1152 * GIB
    assert tensor.link == "nvlink" and tensor.exposed_seconds == pytest.approx(1152 * GIB / 360e9)
    # CP p2p: 3 ring steps of local k/v (2 x 32768 x 8 heads x 128 x 2 B) per layer, 4 rounds (2 forwards, backward k/v + grads)
    context = items["context:k/v ring (p2p)"]
    assert context.sent_bytes == 4 * 3 * 2 * 32768 * 8 * 128 * 2 * 32 * 16 == 768 * GIB
    assert context.link == "infiniband" and context.seconds == pytest.approx(768 * GIB / 40e9)
    assert context.exposed_seconds == 0.0  # 20.6 s under 45.5 s of attention (4 x 34.4 of 190.3 GFLOP per token)
    # DP x CP = 8: all-reduce fp32 main gradients (hidden by the last backward: 0.29 s < 2.6 s), owners broadcast bf16 weights (exposed)
    reduce, gather = items["data:gradient all-reduce (fp32)"], items["data:updated weight broadcast from owners"]
    assert reduce.sent_bytes == 2 * 7 / 8 * 1_684_803_584 * 4 and gather.sent_bytes == 7 / 8 * 1_684_803_584 * 2
    assert reduce.exposed_seconds == 0.0 and gather.exposed_seconds == pytest.approx(7 / 8 * 1_684_803_584 * 2 / 40e9)
    assert step.step_seconds == pytest.approx(compute + 1152 * GIB / 360e9 + 7 / 8 * 1_684_803_584 * 2 / 40e9)


def test_step_times_differ_by_their_communication(llama, preset) -> None:
    """The same FLOPs, different traffic: sdpa's synchronous k/v all-gather is exposed, TE's ring is not;
    slower links make the same layout slower."""
    layout = Layout(4, 4, 2, 1, "full")
    sdpa = estimate_step(llama, layout, Hardware())
    te = estimate_step(preset, config_layout(preset, 32), Hardware())
    assert sdpa.compute_seconds == pytest.approx(te.compute_seconds)
    gathered = [item for item in sdpa.communication if item.dimension == "context"][0]
    assert gathered.sent_bytes == 3 * 3 * 2 * 32768 * 8 * 128 * 2 * 32 * 16  # 2 forwards + 1 backward
    assert gathered.exposed_seconds == pytest.approx(gathered.sent_bytes / 40e9)
    assert sdpa.step_seconds > te.step_seconds + 10
    slow = estimate_step(preset, config_layout(preset, 32), Hardware(nvlink_gbs=100, ib_gbs=10))
    assert slow.step_seconds > te.step_seconds


def test_the_paper_preset_fits_30_gib(preset) -> None:
    memory = estimate_memory(preset, config_layout(preset, 32))
    assert memory.optimizer == 12 * 1_684_803_584 // 8  # fp32 main weights and moments, sharded
    assert memory.total <= 30 * GIB


def test_activations_without_recomputation(llama) -> None:
    memory = estimate_memory(llama, PAPER_LAYOUT)
    breakdown = memory.activation_breakdown
    for kind, per_layer in PER_LAYER.items():
        assert breakdown[kind] == 32 * per_layer, kind
    assert breakdown["final norm"] == FINAL_NORM
    assert breakdown["logits (fp32 softmax)"] == LOGITS
    assert memory.activations == 32 * sum(PER_LAYER.values()) + FINAL_NORM + LOGITS == 105_906_176_000


def test_activations_with_full_recomputation(llama) -> None:
    memory = estimate_memory(llama, Layout(4, 4, 2, recompute="full"))
    layer_inputs = 32 * 32768 * 4096 * 2  # 8 GiB: each layer keeps its bf16 input
    assert memory.activations == layer_inputs + sum(PER_LAYER.values()) + FINAL_NORM + LOGITS
    assert memory.activations_by_recompute["none"] == 105_906_176_000
    assert memory.activations_by_recompute["full"] < memory.activations_by_recompute["selective"]


def test_selective_recomputation_drops_the_gathered_keys_and_values(llama) -> None:
    selective = estimate_memory(llama, Layout(4, 4, 2, recompute="selective")).activation_breakdown
    assert "cp gathered k/v" not in selective and "softmax statistics" not in selective
    local_qkv = 32768 * (8 + 2 * 8) * 128 * 2  # the fused QKV output the value view keeps alive
    rotated_qk = 32768 * (8 + 8) * 128 * 2
    assert selective["attention q/k/v"] == 32 * (local_qkv + rotated_qk)


def test_rotary_tables_are_one_sixteenth_of_the_full_table(llama) -> None:
    # SPEC.md: 128k x 32 heads x 128 dims in fp32 is 2 GiB; a TP4 x CP4 rank holds 1/16 of it,
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


def test_layouts_that_fit_are_ranked(llama) -> None:
    hardware = Hardware(memory_gib=80)
    plans = rank_layouts(llama, hardware, gpus=32)
    assert plans, "the paper's run fits 32 x 80 GB"
    assert all(plan.fits(hardware) and plan.layout.gpus == 32 for plan in plans)
    times = [plan.step.step_seconds for plan in plans]
    assert times == sorted(times)
    assert any(plan.layout == Layout(4, 4, 2, 1, "full") for plan in plans)
    assert all(plan.layout.recompute == "full" for plan in plans), "no recomputation needs > 80 GB here"
    eight = rank_layouts(llama, hardware, gpus=8)
    assert eight and all(p.layout.tensor * p.layout.context == 8 for p in eight)  # 128k on one 8-GPU node
    assert rank_layouts(llama, Hardware(memory_gib=24), gpus=1) == []


def test_candidate_layouts_respect_the_model(llama) -> None:
    layouts = candidate_layouts(llama, gpus=64, gpus_per_node=8)
    assert layouts and all(layout.gpus == 64 and layout.tensor <= 8 for layout in layouts)
    assert {layout.tensor for layout in layouts} == {1, 2, 4, 8}
    a2a = candidate_layouts(llama, gpus=64, gpus_per_node=8, backend="te", cp_comm="a2a")
    assert all((32 // layout.tensor) % layout.context == 0 for layout in a2a)  # k/v heads split over CP


def test_cli_plans_the_paper_run(capsys) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    import plan_memory

    assert plan_memory.main(["--config", str(LLAMA), "--gpus", "32", "--gpu-memory", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "6.738B parameters" in out and "4,194,304 tokens per step" in out
    assert "tensor 4 x context 4 x data 2" in out and ": fits" in out
    assert "layouts that fit, fastest first" in out
    assert "exposed communication" in out and "k/v ring (p2p)" in out and "InfiniBand 40 GB/s" in out

    assert plan_memory.main(["--config", str(LLAMA), "--gpus", "1", "--gpu-memory", "24"]) == 1
    assert "no layout fits" in capsys.readouterr().out
    assert plan_memory.main(["--config", str(LLAMA), "--gpus", "32", "--tensor", "3"]) == 2
