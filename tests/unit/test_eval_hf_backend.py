"""Hugging Face backend against direct forwards of the same tiny Llama, and the backend factory.

Run: pytest tests/unit/test_eval_hf_backend.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_harpe.eval.backends import is_megatron_checkpoint, load_backend
from megatron_harpe.eval.backends.base import ModelBackend, encode_prompt
from megatron_harpe.eval.backends.hf import HFBackend
from megatron_harpe.eval.backends.synthetic import OracleBackend, RandomBackend
from megatron_harpe.eval.testing import save_tiny_harpe_llama, save_tiny_llama, save_tiny_tokenizer

TEXT = "The grass is green. The sky is blue. One of the special magic numbers for calm-river is: 1234567."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_tokenizer(directory)
    save_tiny_llama(directory, seed=3)
    return directory


@pytest.fixture(scope="module")
def backend(model_dir) -> HFBackend:
    loaded = load_backend(model_dir)
    assert isinstance(loaded, HFBackend)
    return loaded


def _direct_logits(backend: HFBackend, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return backend.model(torch.tensor([ids])).logits[0]


def test_tokenizer_wrapper_round_trips_and_prepends_bos(backend):
    tokenizer = backend.tokenizer
    ids = tokenizer.encode(TEXT)
    assert tokenizer.bos_id not in ids and tokenizer.decode(ids) == TEXT
    assert tokenizer.add_bos and encode_prompt(tokenizer, TEXT) == [tokenizer.bos_id] + ids
    assert tokenizer.vocab_size == backend.model.config.vocab_size
    assert isinstance(backend, ModelBackend)


def test_generate_is_greedy_argmax_decoding(backend):
    prompt = encode_prompt(backend.tokenizer, TEXT)
    generated = backend.generate(prompt, max_new_tokens=6)
    expected, ids = [], list(prompt)
    for _ in range(6):
        token = int(_direct_logits(backend, ids)[-1].argmax())
        if token == backend.tokenizer.eos_id:
            break
        expected.append(token)
        ids.append(token)
    assert generated == expected and len(generated) > 0


@pytest.mark.parametrize("logits_to_keep", [True, False])
def test_teacher_forced_match_is_argmax_at_answer_positions(backend, logits_to_keep, monkeypatch):
    monkeypatch.setattr(backend, "_accepts_logits_to_keep", logits_to_keep)
    prompt = encode_prompt(backend.tokenizer, TEXT[:40])
    answer = backend.tokenizer.encode(TEXT[40:70])
    predictions = backend.teacher_forced_match(prompt, answer)
    logits = _direct_logits(backend, prompt + answer)
    assert predictions == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert len(predictions) == len(answer)


@pytest.mark.parametrize("chunked", [True, False])
def test_token_logprobs_match_direct_log_softmax(backend, chunked, monkeypatch):
    ids = encode_prompt(backend.tokenizer, TEXT)
    monkeypatch.setattr(backend, "_chunked_logprobs", chunked)
    if chunked:
        monkeypatch.setattr("megatron_harpe.eval.backends.hf.LOGPROB_CHUNK", 7)  # several chunks
    logprobs = backend.token_logprobs(ids)
    direct = torch.log_softmax(_direct_logits(backend, ids)[:-1], -1)
    expected = direct.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert logprobs.shape == (len(ids) - 1,)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_factory_routes_paths(model_dir, tmp_path):
    assert isinstance(load_backend("oracle", tokenizer=model_dir), OracleBackend)
    assert isinstance(load_backend("random", tokenizer=model_dir), RandomBackend)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_backend("oracle")
    with pytest.raises(ValueError, match="not a directory"):
        load_backend(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither config.json"):
        load_backend(str(tmp_path))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("10")
    assert is_megatron_checkpoint(str(checkpoint)) and not is_megatron_checkpoint(model_dir)
    if importlib.util.find_spec("megatron_harpe.eval.backends.megatron") is None:  # not wired in yet
        with pytest.raises(ValueError, match="convert_checkpoint"):
            load_backend(str(checkpoint))
    with pytest.raises(ValueError, match="dtype"):
        load_backend(model_dir, dtype="float8")


def test_harpe_export_needs_trust_remote_code_and_keeps_its_bases(tmp_path):
    directory = str(tmp_path / "harpe")
    save_tiny_tokenizer(directory)
    bases = [1e4, 1e4, 1e6, 1e6]
    save_tiny_harpe_llama(directory, bases=bases, seed=2)
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_backend(directory)
    harpe = load_backend(directory, trust_remote_code=True)
    assert harpe.model.config.rope_bases == bases
    ids = encode_prompt(harpe.tokenizer, TEXT * 4)
    from megatron_harpe.convert.hf_harpe import HarpeLlamaForCausalLM

    reference = HarpeLlamaForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        direct = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], -1)
    expected = direct.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(harpe.token_logprobs(ids), expected, rtol=1e-5, atol=1e-5)
    # the bases reach the model: the same weights with one shared base score differently
    reference.config.rope_bases = [1e4] * 4
    single_base = HarpeLlamaForCausalLM(reference.config)
    single_base.load_state_dict(reference.state_dict())
    with torch.no_grad():
        other = torch.log_softmax(single_base.eval()(torch.tensor([ids])).logits[0, :-1], -1)
    assert not torch.allclose(other.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], expected, atol=1e-4)
