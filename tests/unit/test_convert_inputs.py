"""Reading HF shards, writing shards, output directories, tokenizers, the run config saved with a
converted checkpoint, and every kind of bad input (rejected before anything is written).

    python -m pytest tests/unit/test_convert_inputs.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_harpe.convert.hf_config import model_config_from_hf
from megatron_harpe.convert.hf_files import (
    HFWeights,
    check_weights_match,
    copy_tokenizer_files,
    staging_directory,
    write_safetensors,
)
from megatron_harpe.convert.hf_to_megatron import build_conversion_config, convert_hf_to_megatron
from megatron_harpe.convert.keymap import expected_hf_shapes

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=2)).save_pretrained(path, max_shard_size="20KB")
    return path


def _state(hf_dir: Path) -> dict[str, torch.Tensor]:
    return LlamaForCausalLM.from_pretrained(hf_dir).state_dict()


def test_reads_sharded_safetensors_and_bin(hf_dir: Path, tmp_path: Path) -> None:
    state = _state(hf_dir)
    weights = HFWeights(hf_dir)
    assert len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]) == len(state)
    assert sorted(weights.names) == sorted(state)
    assert all(torch.equal(weights.get(name), tensor) for name, tensor in state.items())
    torch.save(state, tmp_path / "pytorch_model.bin")
    from_bin = HFWeights(tmp_path)
    assert all(torch.equal(from_bin.get(name), tensor) for name, tensor in state.items())
    assert from_bin.shape("model.embed_tokens.weight") == (64, 32)


def test_missing_shard_and_missing_weights(hf_dir: Path, tmp_path: Path) -> None:
    for item in hf_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        HFWeights(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        HFWeights(tmp_path / "nowhere")


def test_config_that_does_not_match_its_weights(hf_dir: Path) -> None:
    hf = json.loads((hf_dir / "config.json").read_text())
    more_layers = model_config_from_hf({**hf, "num_hidden_layers": 3})
    with pytest.raises(ValueError, match=r"missing \['model.layers.2"):
        check_weights_match(HFWeights(hf_dir), expected_hf_shapes(more_layers))
    wider = model_config_from_hf({**hf, "intermediate_size": 64})
    with pytest.raises(ValueError, match="wrong shapes.*gate_proj"):
        check_weights_match(HFWeights(hf_dir), expected_hf_shapes(wider))
    fewer = model_config_from_hf({**hf, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.1"):
        check_weights_match(HFWeights(hf_dir), expected_hf_shapes(fewer))


def test_written_shards_load_in_transformers(hf_dir: Path, tmp_path: Path) -> None:
    state = _state(hf_dir)
    files = write_safetensors(iter(state.items()), tmp_path, max_shard_bytes=30_000)
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in state.items())
    single = tmp_path / "single"
    single.mkdir()
    assert write_safetensors(iter(state.items()), single) == ["model.safetensors"]


def test_staging_directory_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staging_directory(target) as staging:
            (staging / "half_written").write_text("x")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with staging_directory(target) as staging:
        (staging / "done").write_text("x")
    assert [p.name for p in target.iterdir()] == ["done"]
    with pytest.raises(ValueError, match="not empty"):
        with staging_directory(target):
            pass


def test_sentencepiece_tokenizer_becomes_a_hf_tokenizer(tmp_path: Path) -> None:
    from megatron_harpe.data.tokenizer import train_sentencepiece

    text = ["The grass is green. The sky is blue. Here we go, 12345 times."] * 200
    model = train_sentencepiece(text, tmp_path / "sp", vocab_size=300)
    out = tmp_path / "hf"
    out.mkdir()
    assert copy_tokenizer_files(model, out) == ["tokenizer.model", "tokenizer_config.json"]
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
    sample = "The sky is green, 42 times."
    assert AutoTokenizer.from_pretrained(out)(sample).input_ids == [1] + reference.encode(sample)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="sentencepiece"):
        copy_tokenizer_files(tmp_path / "vocab.txt", out)


def test_conversion_config_takes_model_from_hf_and_position_from_yaml(hf_dir: Path, tmp_path: Path) -> None:
    hf = json.loads((hf_dir / "config.json").read_text())
    default = build_conversion_config(hf)
    assert default.position.type == "abf" and default.position.base == 10000.0
    assert default.model.kv_groups == 2 and default.model.num_layers == 2
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "model": {"num_layers": 2, "max_position_embeddings": 1024},
                "position": {"type": "harpe", "strategy": "uniform", "base_min": 1e4, "base_max": 4e4},
                "train": {"lr": 1e-5},
            }
        )
    )
    config = build_conversion_config(
        hf, config_path=run_yaml, overrides=["position.order=descending"], tensor_parallel=2
    )
    assert config.position.bases == [4e4, 1e4]  # resolved: one base per k/v group, saved explicitly
    assert config.parallel.tensor == 2 and config.train.lr == 1e-5 and config.model.max_position_embeddings == 1024


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(overrides=["model.num_layers=3"]), ValueError, "does not describe the HF model"),
        (dict(tensor_parallel=3), ValueError, "does not divide the model's 4 attention heads"),
        (dict(tensor_parallel=4), ValueError, "does not divide the model's 2 k/v groups"),
        (dict(overrides=["position.type=harpe", "position.bases=[1.0e4]"]), ValueError, "bases"),
        (dict(overrides=["position.typo=harpe"]), ValueError, "unknown config key"),
    ],
)
def test_bad_conversion_requests(hf_dir: Path, tmp_path: Path, kwargs: dict, error: type, message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        convert_hf_to_megatron(hf_dir, out, **kwargs)
    assert not out.exists()


def test_bad_sources_and_destinations(hf_dir: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_hf_to_megatron(hf_dir, occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_hf_to_megatron(tmp_path / "nothing", tmp_path / "out")
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (mistral / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert_hf_to_megatron(mistral, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_of_an_unreadable_dtype_is_rejected_before_writing(hf_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    source = tmp_path / "fp8"
    source.mkdir()
    for item in hf_dir.iterdir():
        (source / item.name).write_bytes(item.read_bytes())
    shard = (
        source
        / json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"][
            "model.layers.1.mlp.down_proj.weight"
        ]
    )
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].to(
        torch.float8_e4m3fn
    )
    save_file(tensors, shard)
    message = "down_proj.weight has dtype F8_E4M3, which the converter does not read"
    model = model_config_from_hf(json.loads((source / "config.json").read_text()))
    with pytest.raises(ValueError, match=message):  # among the checks that precede writing
        check_weights_match(HFWeights(source), expected_hf_shapes(model))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        convert_hf_to_megatron(source, out)
    assert not out.exists()
