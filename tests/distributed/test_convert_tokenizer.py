"""A chat model through hf-to-megatron and megatron-to-hf keeps every tokenizer file and
setting: the chat template applies on the export, special token ids (unk included) and the
generation config survive, and the megatron backend finds the source tokenizer by itself and
generates (KV cache) what the HF backend generates.

    python -m pytest tests/distributed/test_convert_tokenizer.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megatron_harpe import parallel

pytestmark = pytest.mark.distributed

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the key?"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    from megatron_harpe.eval.testing import save_tiny_llama, save_tiny_tokenizer

    source = tmp_path_factory.mktemp("chat") / "hf"
    save_tiny_tokenizer(str(source))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(source)
    save_tiny_llama(str(source), seed=3)
    config = json.loads((source / "config.json").read_text())
    config["unk_token_id"] = tokenizer.unk_token_id
    (source / "config.json").write_text(json.dumps(config))
    generation = json.loads((source / "generation_config.json").read_text())
    generation.update(max_length=321, repetition_penalty=1.1)
    (source / "generation_config.json").write_text(json.dumps(generation))
    return source


def _round_trip(source: str, checkpoint: str, export: str, prompt: str):
    from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_harpe.eval.backends import load_backend
    from megatron_harpe.eval.backends.base import encode_prompt

    convert_hf_to_megatron(source, checkpoint)
    convert_megatron_to_hf(checkpoint, export)
    megatron = load_backend(checkpoint)  # no tokenizer given: the checkpoint's own
    hf = load_backend(source)
    ids = encode_prompt(megatron.tokenizer, prompt)
    return {
        "ids": ids,
        "hf_ids": encode_prompt(hf.tokenizer, prompt),
        "megatron": megatron.generate(ids, 8),
        "hf": hf.generate(ids, 8),
    }


def test_chat_model_round_trip_keeps_tokenizer_and_generates_alike(chat_model: Path, tmp_path: Path) -> None:
    checkpoint, export = tmp_path / "ckpt", tmp_path / "export"
    prompt = "The key is under the mat. Where is the key?"
    result = parallel.run_on_ranks(_round_trip, 1, str(chat_model), str(checkpoint), str(export), prompt)[0]

    assert (checkpoint / "hf_source" / "chat_template.jinja").is_file()
    assert (export / "chat_template.jinja").is_file()
    source_tokenizer, export_tokenizer = (
        AutoTokenizer.from_pretrained(chat_model),
        AutoTokenizer.from_pretrained(export),
    )
    rendered = export_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == source_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|system|>Be brief.</s><|user|>")
    assert export_tokenizer.unk_token_id == source_tokenizer.unk_token_id is not None

    source_config = json.loads((chat_model / "config.json").read_text())
    export_config = json.loads((export / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert export_config[key] == source_config[key], key
    export_generation = json.loads((export / "generation_config.json").read_text())
    assert export_generation["max_length"] == 321 and export_generation["repetition_penalty"] == 1.1

    assert result["ids"] == result["hf_ids"]  # the megatron backend found the source tokenizer
    assert result["megatron"] == result["hf"] and len(result["megatron"]) > 0
