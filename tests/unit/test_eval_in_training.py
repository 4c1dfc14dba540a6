"""Evaluation during training refuses, before training starts, prompts that cannot fit."""

from __future__ import annotations

import pytest

from megatron_harpe.config import Config, from_dict


def _config(demo_data, **eval_keys) -> Config:
    return from_dict(Config, {
        "data": {"prefixes": [demo_data.prefix], "tokenizer": str(demo_data.tokenizer), "seq_length": 512},
        "train": {"train_tokens": 4096},
        "eval": {"interval": 10, **eval_keys},
    }).validate()  # fmt: skip


def test_every_prompt_is_built_at_launch(demo_data):
    from megatron_harpe.eval.in_training import check_eval_prompts

    check_eval_prompts(_config(demo_data, tasks=["passkey", "niah_single_1"]))  # each stage's length: 512
    check_eval_prompts(_config(demo_data, tasks=["passkey"], lengths=[160], max_new_tokens=8))
    with pytest.raises(ValueError, match="eval.tasks passkey at length 96 .*the prompt without any haystack"):
        check_eval_prompts(_config(demo_data, tasks=["passkey"], lengths=[96]))
    with pytest.raises(ValueError, match="eval.tasks niah_single_1 at length 160"):  # its 128-token answer budget
        check_eval_prompts(_config(demo_data, tasks=["niah_single_1"], lengths=[160]))
