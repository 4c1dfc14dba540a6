"""The file-read safetensors reader returns what safetensors' own loader returns, for every
dtype the converter meets, and reports truncated files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_harpe.convert.hf_files import HFWeights
from megatron_harpe.convert.streaming import SafetensorsReader


def test_reader_equals_safetensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "bf16": torch.randn(4, 2, generator=generator).bfloat16(),
        "f16": torch.randn(7, generator=generator).half(),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reader = SafetensorsReader(path)
    expected = load_file(str(path))
    assert sorted(reader.keys()) == sorted(tensors)
    for name, tensor in expected.items():
        read = reader.get_tensor(name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape == torch.Size(reader.shape(name))
        assert torch.equal(read, tensor), name


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsReader(path).get_tensor("w")


def test_hf_weights_reads_through_it(tmp_path):
    save_file({"model.norm.weight": torch.ones(8)}, str(tmp_path / "model.safetensors"))
    weights = HFWeights(tmp_path)
    assert weights.shape("model.norm.weight") == (8,)
    assert torch.equal(weights.get("model.norm.weight"), torch.ones(8))
