"""Evaluating a megatron checkpoint directly: TP/CP-sharded backends agree with one process,
and evaluation during training lands in TensorBoard next to the training scalars."""

from __future__ import annotations

import pytest
import torch

from megatron_harpe import parallel
from megatron_harpe.config import Config, from_dict

pytestmark = pytest.mark.distributed


def _train(tree):
    from megatron_harpe.training.loop import train

    return train(from_dict(Config, tree))


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("backend")
    tree = {
        "model": dict(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=4096,
            max_position_embeddings=64,
        ),
        "position": {"type": "harpe", "bases": [100.0, 10000.0]},
        "data": {"prefixes": [demo_data.prefix], "tokenizer": str(demo_data.tokenizer), "seq_length": 64},
        "train": {"micro_batch_size": 2, "global_batch_size": 2, "train_tokens": 2 * 2 * 64, "lr": 1e-2},
        "checkpoint": {"save": str(root / "ckpt")},
        "logging": {"tensorboard_dir": str(root / "tb")},
        "eval": {"interval": 2, "tasks": ["passkey"], "lengths": [192], "samples": 2},
    }
    parallel.run_on_ranks(_train, 1, tree)
    return root


def _backend_outputs(path, tp, cp, ids, answer):
    from megatron_harpe.eval.backends import load_backend

    backend = load_backend(path, tensor_parallel=tp, context_parallel=cp)
    return {
        "logits": backend.logits(ids).cpu(),
        "last": backend.logits(ids, last=3).cpu(),
        "teacher": backend.teacher_forced_match(ids, answer),
        "logprobs": backend.token_logprobs(ids),
        "generated": backend.generate(ids, 5),
    }


@pytest.mark.slow  # CI time; evaluation under TP/SP/CP stays in test_eval_layouts
def test_sharded_backends_match_one_process(trained):
    path = str(trained / "ckpt")
    ids = torch.randint(0, 4000, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    answer = ids[-4:]
    reference = parallel.run_on_ranks(_backend_outputs, 1, path, 1, 1, ids, answer)[0]
    assert reference["logits"].shape == (37, 4096)
    torch.testing.assert_close(reference["last"], reference["logits"][-3:])
    for tp, cp in [(1, 2), (2, 1)]:
        result = parallel.run_on_ranks(_backend_outputs, tp * cp, path, tp, cp, ids, answer)[0]
        torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result["last"], reference["last"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(result["logprobs"], reference["logprobs"], atol=1e-4, rtol=1e-4)
        assert result["teacher"] == reference["teacher"]
        assert result["generated"] == reference["generated"]


def test_evaluation_during_training_is_logged(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags
    passkey = [tag for tag in tags if tag.startswith("eval/passkey")]
    assert passkey, tags
    assert [event.step for event in events.Scalars(passkey[0])] == [2]


def _perplexities(path, export_dir, documents):
    from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_harpe.eval.backends import load_backend
    from megatron_harpe.eval.perplexity import perplexity_by_length

    megatron = load_backend(path)
    convert_megatron_to_hf(path, export_dir)  # fp32, as trained
    hf = load_backend(export_dir, trust_remote_code=True)
    return [perplexity_by_length(backend, documents, [48, 96], stride=16, progress=False) for backend in (megatron, hf)]


def test_megatron_checkpoint_and_its_hf_export_give_the_same_perplexity(trained, tmp_path):
    generator = torch.Generator().manual_seed(2)
    documents = [torch.randint(5, 4000, (120,), generator=generator).tolist() for _ in range(2)]
    megatron, hf = parallel.run_on_ranks(_perplexities, 1, str(trained / "ckpt"), str(tmp_path / "hf"), documents)[0]
    for length in (48, 96):
        assert megatron[length]["tokens"] == hf[length]["tokens"] > 0
        assert megatron[length]["ppl"] == pytest.approx(hf[length]["ppl"], rel=1e-4)
    assert megatron[48]["ppl"] != pytest.approx(megatron[96]["ppl"], rel=1e-6)  # lengths really differ
