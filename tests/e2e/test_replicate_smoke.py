"""The CPU replication (experiments/replicate) end to end at smoke scale, and its task format.

Run: pytest tests/e2e/test_replicate_smoke.py   (the smoke run takes ~20 s on an idle 2-core
     machine, up to 90 s on a busy one; it is part of the default suite, as issue 9 asks)

The smoke run goes through the real entry points (prepare_data.py, pretrain_harpe.py,
evaluate.py) with a tiny model, one seed and a few steps, and checks that every method
trained for its planned steps with its own position encoding and was evaluated at every length.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_harpe.data.tokenizer import load_tokenizer
from megatron_harpe.eval.tasks.synthetic_kv import (
    ANSWER_BUDGET,
    KEYS,
    answer_mask,
    build_synthetic_kv_sample,
    training_document,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "experiments" / "replicate" / "run.py"
METHODS = ("harpe", "abf", "abf_multistage", "pi", "none")
DOCUMENT_MASKING = ("harpe_docmask", "abf_multistage_docmask")  # the same runs with documents masked


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("kv") / "tokenizer.json"))


def latest_value(words: list[str], key: str, before: int) -> list[str]:
    """What a perfect reader answers: the digits after the last `set KEY` before `before`."""
    starts = [i for i in range(before) if words[i] == "set" and words[i + 1] == key]
    assert starts, f"{key} was never set"
    return words[starts[-1] + 2 : starts[-1] + 5]


@pytest.mark.parametrize("length", [64, 300, 1024])
def test_prompt_fills_the_length_and_the_answer_is_the_needle(tokenizer, length):
    for index in range(5):
        sample = build_synthetic_kv_sample(tokenizer, length, index, seed=7)
        assert len(sample.prompt_ids) + ANSWER_BUDGET == length
        assert sample.prompt_ids[0] == tokenizer.bos_id
        words = sample.prompt.split()
        assert words[-2] == "get" and words[-1] in KEYS
        assert latest_value(words, words[-1], len(words) - 2) == sample.answers[0].split()
        assert sum(word == "set" for word in words) == 6  # the queried needle and five distractors
        assert tokenizer.decode(tokenizer.encode(sample.prompt)) == sample.prompt


def test_depth_places_the_queried_needle(tokenizer):
    shallow = build_synthetic_kv_sample(tokenizer, 1024, 0, seed=1, fixed_depth=0).prompt.split()
    deep = build_synthetic_kv_sample(tokenizer, 1024, 0, seed=1, fixed_depth=100).prompt.split()
    for words, expect_early in ((shallow, True), (deep, False)):
        key = words[-1]
        position = words.index(key)  # first occurrence: the needle
        assert (position < len(words) * 0.1) == expect_early, (position, len(words))


def test_samples_are_reproducible_and_differ_by_index(tokenizer):
    first = build_synthetic_kv_sample(tokenizer, 256, 3, seed=5)
    again = build_synthetic_kv_sample(tokenizer, 256, 3, seed=5)
    other = build_synthetic_kv_sample(tokenizer, 256, 4, seed=5)
    assert first.prompt == again.prompt and first.prompt != other.prompt


def test_too_short_length_names_the_minimum(tokenizer):
    with pytest.raises(ValueError, match="evaluate at length >="):
        build_synthetic_kv_sample(tokenizer, 30, 0, seed=0)


def test_training_documents_answer_queries_with_the_latest_value():
    rng = random.Random(0)
    for words_wanted in (126, 1022):
        words = training_document(words_wanted, rng).split()
        assert len(words) == words_wanted
        queries = [i for i in range(len(words) - 4) if words[i] == "get"]
        assert queries, "a document should hold queries"
        for i in queries:
            assert words[i + 2 : i + 5] == latest_value(words, words[i + 1], i)


def test_answer_mask_marks_exactly_the_answer_digits(tokenizer):
    words = training_document(1022, random.Random(1)).split()
    ids = tokenizer.encode(" ".join(words))
    mask = answer_mask(ids)
    queries = [i for i in range(len(words)) if words[i] == "get"]
    marked = {i + k for i in queries for k in (2, 3, 4) if i + k < len(words)}
    assert set(map(int, mask.nonzero()[0])) == marked and len(marked) >= 3 * (len(queries) - 1)
    assert all(words[i].isdigit() for i in marked)


@pytest.mark.parametrize("method", ["abf_multistage", "harpe_multistage"])
def test_multistage_runs_the_tokens_and_steps_of_one_stage_at_full_scale(method):
    sys.path.insert(0, str(REPO / "experiments" / "replicate"))
    from methods import FULL, extension_config

    data = {"extension_prefix": "x", "extension_mask": "m", "tokenizer": "t", "vocab_size": 128}
    single = extension_config("abf", FULL, data, "base", "out", seed=1)["train"]
    tokens_per_step = single["global_batch_size"] * FULL.target_length
    steps = -(-single["train_tokens"] // tokens_per_step)
    stages = extension_config(method, FULL, data, "base", "out", seed=1)["stages"]
    assert [stage["seq_length"] for stage in stages] == [
        FULL.target_length // 4,
        FULL.target_length // 2,
        FULL.target_length,
    ]
    if method == "harpe_multistage":  # the curriculum alone: HARPE's single-stage bases in every stage
        harpe = extension_config("harpe", FULL, data, "base", "out", seed=1)["position"]
        assert all(stage["position"] == harpe for stage in stages)
    assert all(stage["global_batch_size"] * stage["seq_length"] == tokens_per_step for stage in stages)
    assert sum(stage["tokens"] for stage in stages) == steps * tokens_per_step
    assert sum(stage["tokens"] // tokens_per_step for stage in stages) == steps


def test_smoke_run_trains_and_evaluates_every_method(tmp_path):
    output, workdir = tmp_path / "results", tmp_path / "work"
    environment = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        str(RUN),
        "--output",
        str(output),
        "--workdir",
        str(workdir),
        "--smoke",
        "--jobs",
        "0",
        "--methods",
        ",".join(METHODS + DOCUMENT_MASKING),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scale = json.loads((output / "scale.json").read_text())
    target, base_length = scale["target_length"], scale["base_length"]

    steps_per_method = {}
    for method in METHODS + DOCUMENT_MASKING:
        config = yaml.safe_load((output / "configs" / f"{method}_seed1.yaml").read_text())
        checkpoint = workdir / "checkpoints" / f"{method}_seed1"
        steps = int((checkpoint / "latest_checkpointed_iteration.txt").read_text())
        stages = config.get("stages") or [{"seq_length": target, "tokens": config["train"]["train_tokens"]}]
        batch = config["train"]["global_batch_size"]
        assert (
            steps
            == sum(
                -(-stage["tokens"] // (stage.get("global_batch_size", batch) * stage["seq_length"])) for stage in stages
            )
            > 0
        )
        steps_per_method[method] = steps
        assert config["data"]["loss_mask_prefixes"] == [str(workdir / "data" / "extension_answer_mask")]
        assert config["checkpoint"]["pretrained"] == str(workdir / "checkpoints" / "base_seed1")
        log = (workdir / "logs" / f"{method}_seed1.log").read_text()
        assert "continual pretraining from the weights of" in log and f"step {steps}/{steps}" in log

        results = json.loads((workdir / "eval" / f"{method}_seed1" / "results.json").read_text())
        cells = results["tasks"]["synthetic_kv"]
        assert sorted(int(length) for length in cells) == sorted(scale["eval_lengths"])
        assert all(len(cell["scores"]) == scale["eval_samples"] for cell in cells.values())

    assert len(set(steps_per_method.values())) == 1, steps_per_method  # equal tokens in equal optimizer steps
    for masked in DOCUMENT_MASKING:  # the method's own run, documents masked
        config = yaml.safe_load((output / "configs" / f"{masked}_seed1.yaml").read_text())
        plain = yaml.safe_load((output / "configs" / f"{masked.removesuffix('_docmask')}_seed1.yaml").read_text())
        flags = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
        assert all(config["data"].pop(flag) for flag in flags) and not any(plain["data"].get(flag) for flag in flags)
        assert {**config, "checkpoint": None} == {**plain, "checkpoint": None}
        assert "reset_attention_mask: true" in (workdir / "logs" / f"{masked}_seed1.log").read_text()
    ratio = target / 131072
    harpe = yaml.safe_load((output / "configs" / "harpe_seed1.yaml").read_text())["position"]
    assert harpe["type"] == "harpe" and harpe["base_min"] == pytest.approx(1e6 * ratio)
    assert yaml.safe_load((output / "configs" / "abf_seed1.yaml").read_text())["position"]["base"] == pytest.approx(
        5e6 * ratio
    )
    pi = yaml.safe_load((output / "configs" / "pi_seed1.yaml").read_text())["position"]
    assert pi["type"] == "pi" and pi["scaling_factor"] == target / base_length == 8
    stages = yaml.safe_load((output / "configs" / "abf_multistage_seed1.yaml").read_text())["stages"]
    assert [s["seq_length"] for s in stages] == [target // 4, target // 2, target]
    assert [s["position"]["base"] for s in stages] == pytest.approx([1e6 * ratio, 2e6 * ratio, 5e6 * ratio])
    # the trained HARPE checkpoint carries its per-head bases
    saved = yaml.safe_load(next((workdir / "checkpoints" / "harpe_seed1").glob("iter_*/config.yaml")).read_text())
    bases = saved["position"]["bases"]
    assert len(bases) == scale["num_attention_heads"] and len(set(bases)) == len(bases)
    assert min(bases) >= 1e6 * ratio - 1e-6 and max(bases) <= 5e6 * ratio + 1e-6

    table = (output / "results.md").read_text()
    for row in ("base (no extension)", *METHODS, *DOCUMENT_MASKING):
        assert f"| {row} |" in table
    assert "Document masking: exact match of `<method>_docmask` minus `<method>`" in table
    assert "First-digit accuracy" in table and "minus abf_multistage's, paired by seed" in table
    assert (output / "results.png").stat().st_size > 1000

    # retention at the base length: exact match and held-out perplexity, before and after extension
    heldout = workdir / "data" / f"heldout_{base_length}.jsonl"
    assert len(heldout.read_text().splitlines()) == scale["heldout_documents"]
    perplexities = {}
    for name in ["base_seed1", *(f"{method}_seed1" for method in METHODS + DOCUMENT_MASKING)]:
        ppl = json.loads((workdir / "eval" / f"{name}_ppl" / "results.json").read_text())["perplexity"][
            str(base_length)
        ]
        assert ppl["documents"] == scale["heldout_documents"] and ppl["tokens"] == scale["heldout_documents"] * (
            base_length - 1
        )
        perplexities[name] = ppl["ppl"]
    assert all(1.0 < value < 200 for value in perplexities.values()), perplexities  # a word-level vocabulary of ~90
    retention_section = table.split("Retention at the base length")[1]
    summary = json.loads((output / "summary.json").read_text())["retention_at_base_length"]
    for method in METHODS + DOCUMENT_MASKING:
        row = next(line for line in retention_section.splitlines() if line.startswith(f"| {method} |"))
        assert row.count("±") == 6 or "| - |" in row  # before, after, kept (when the base scored), ppl x3
        ratio = summary[method]["ppl_ratio"][0]
        assert ratio == pytest.approx(perplexities[f"{method}_seed1"] / perplexities["base_seed1"])
    commands = (output / "commands.md").read_text()
    runs = 1 + len(METHODS + DOCUMENT_MASKING)  # the base model and every extension
    assert commands.count("pretrain_harpe.py --config") == runs
    assert commands.count("tools/evaluate.py --model") == 2 * runs
    assert commands.count("--task ppl --lengths " + str(base_length)) == runs
    assert commands.count("tools/prepare_data.py tokenize") == 2


def test_paired_differences_cancel_the_spread_between_base_models():
    sys.path.insert(0, str(REPO / "experiments" / "replicate"))
    from report import BASE_ROW, paired_differences

    rows = {  # seed 1's base model retrieves, seed 2's barely: HARPE is 10 points ahead on both
        BASE_ROW: {"per_seed": {1: {128: 90.0}, 2: {128: 5.0}}},
        "abf_multistage": {"per_seed": {1: {128: 80.0, 1024: 50.0}, 2: {128: 10.0, 1024: 0.0}}},
        "harpe": {"per_seed": {1: {128: 90.0, 1024: 60.0}, 2: {128: 20.0, 1024: 0.0}}},
    }
    differences = paired_differences(rows, "abf_multistage", (128, 1024))
    assert set(differences) == {"harpe"}
    assert differences["harpe"][128] == (10.0, 0.0, 2)
    assert differences["harpe"][1024] == (5.0, pytest.approx(7.0711, abs=1e-3), 1)
