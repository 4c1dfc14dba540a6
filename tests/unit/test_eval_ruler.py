"""RULER's 13 tasks: oracle 100 / random ~0 on each, pinned prompts, the slot rule, Wilson
intervals, chat templates, order-insensitive teacher forcing, haystack and QA handling.

Run: pytest tests/unit/test_eval_ruler.py
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics

import pytest

from megatron_harpe.eval.backends.base import encode_continuation, encode_prompt
from megatron_harpe.eval.backends.synthetic import OracleBackend, RandomBackend, read_ideal_answer
from megatron_harpe.eval.cells import sample_factory
from megatron_harpe.eval.scoring import string_match_part, wilson_interval
from megatron_harpe.eval.suite import mean_label, run_eval_suite, score_sample
from megatron_harpe.eval.tasks.chat import PLAIN, resolve_prompt_format
from megatron_harpe.eval.tasks.haystack import haystack_info, load_prose_sentences, wonderwords_lists
from megatron_harpe.eval.tasks.niah import NIAH_TASKS, build_niah_sample
from megatron_harpe.eval.tasks.registry import RULER_TASKS
from megatron_harpe.eval.tasks.samples import DEPTHS, format_answer, random_slots
from megatron_harpe.eval.testing import ByteTokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
QA_FILES = {"qa_1": os.path.join(DATA, "qa_squad_tiny.json"), "qa_2": os.path.join(DATA, "qa_hotpot_tiny.json")}
DEFAULT_HAYSTACK_SHA256 = "71f640e4807106a88e0d64abcf4cab4c540bdd91dad780784e1694f20976c556"
# sha256 of prompt + answers for (task, ByteTokenizer, length 2048, sample 0, seed 42): the same
# command gives the same prompts on any machine; a change here changes every published number
PROMPT_HASHES = {
    "niah_single_1": "9e910e9e94d74ff87368276fec3f3669a606e85aef4c680721925c0e6ae23f08",
    "niah_single_2": "4685f46eda87a7f5d1c026992b9f3c298ae45f764d1b126747c93a8a81c6d376",
    "niah_single_3": "9a268921d95e1455eb44d39ea269cf54c59187b9e2cfab575b082ece979b2b19",
    "niah_multikey_1": "184dc8c0766bded38907b7d28b8c1d050e029f2d0df4dbadd0ca1617c51f8d6b",
    "niah_multikey_2": "9979a33a7c698cac47ef02c6d450b9cfcc349cdc913ad3e5ddf7b9caa4119e49",
    "niah_multikey_3": "bebab46f6c737f971030819e8b3f649920e31b3861bc4223750557f80ee073f3",
    "niah_multivalue": "659a045f8407626093f17ef4a8c67e987ca21823a06a35b0f52205aa3cd26d4c",
    "niah_multiquery": "9e603d7a87be39dac6bf4bedd0bc18220d863aa21b1dc8d9cf51bb00658baa56",
    "vt": "bcd8f05ee56060805e84d0a83dcfd36ac1aead3ed119021429d0644b9ba808ae",
    "cwe": "731203db86bab9b67bc083d3f8a12fde99fc2a9402797f6f71fb8ea4203bb92c",
    "fwe": "1141d6a80aa924b4c95b47099171ee1ddb9e6c45d0d4ee82ba4c4914071278c0",
    "qa_1": "4fc65009b3036c089c4cb6c9b370155d0a278c0e7818e7b7a4d90db7b89f36fe",
    "qa_2": "67b220686d830605e806930ee8a67352f75c5b3920ac32e27c4e1849037928eb",
}


def _digest(sample) -> str:
    return hashlib.sha256((sample.prompt + "\0" + "\x1f".join(sample.answers)).encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


def _make(task: str, tokenizer, chat=PLAIN, seed: int = 42, fill: str = "tight"):
    return sample_factory(task, tokenizer, seed, None, load_prose_sentences(), chat, QA_FILES, fill)


@pytest.mark.parametrize("scoring", ["generate", "teacher_forcing"])
def test_oracle_scores_100_and_random_about_0_on_all_13_tasks(tokenizer, scoring):
    oracle = run_eval_suite(
        OracleBackend(tokenizer),
        ["ruler"],
        [2048, 3000],
        samples=4,
        seed=3,
        scoring=scoring,
        progress=False,
        qa_files=QA_FILES,
    )
    assert list(oracle["tasks"]) == list(RULER_TASKS) and oracle["mean_label"] == "RULER-13 mean"
    for task, by_length in oracle["tasks"].items():
        for length, cell in by_length.items():
            assert cell["score"] == 100.0, (task, length, cell["scores"])
            assert cell["interval"][1] == 100.0 and cell["interval"][0] > 40
    noise = run_eval_suite(
        RandomBackend(tokenizer, seed=1),
        ["ruler"],
        [2048],
        samples=4,
        seed=3,
        scoring=scoring,
        progress=False,
        qa_files=QA_FILES,
    )
    for task, by_length in noise["tasks"].items():
        assert by_length["2048"]["score"] <= 5.0, (task, by_length["2048"]["scores"])


@pytest.mark.parametrize("task", RULER_TASKS)
def test_prompts_are_pinned(tokenizer, task):
    sample = _make(task, tokenizer)(2048, 0)
    assert sample.prompt_tokens + sample.answer_budget <= 2048
    assert _digest(sample) == PROMPT_HASHES[task], f"{task}: {_digest(sample)}"


def test_default_haystack_is_shipped_long_and_hashed(tmp_path):
    info = haystack_info()
    assert info["sha256"] == DEFAULT_HAYSTACK_SHA256
    # ~3.5-4.5 characters per Llama-2 token in English: > 128k tokens without repeating
    assert info["characters"] > 128 * 1024 * 5
    essays = tmp_path / "PaulGrahamEssays.json"  # RULER's essay file format, read as is
    essays.write_text(json.dumps({"text": "First essay sentence here. " * 10 + "\n\nAnother one, in an essay. " * 20}))
    assert load_prose_sentences(str(essays))[0] == "First essay sentence here."
    assert haystack_info(str(essays))["sha256"] != info["sha256"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"essays": []}))
    with pytest.raises(ValueError, match="'text' field"):
        load_prose_sentences(str(broken))


def test_keys_come_from_the_wonderwords_lists(tokenizer):
    lists = wonderwords_lists()
    assert len(lists["adjective"]) * len(lists["noun"]) > 6_000_000
    sample = build_niah_sample(NIAH_TASKS["niah_multikey_2"], tokenizer, 6000, index=0, seed=9)
    keys = [
        line.split(" for ", 1)[1].split(" is: ")[0] for line in sample.prompt.split("\n") if line.startswith("One of")
    ]
    assert len(keys) > 30
    adjectives, nouns = set(lists["adjective"]), set(lists["noun"])
    assert all(
        any(key[:i] in adjectives and key[i + 1 :] in nouns for i in range(len(key)) if key[i] == "-") for key in keys
    )
    # RULER's vocabulary is large: distractors rarely share a word with the queried key
    query = sample.prompt.split("special magic number for ")[-1].split(" mentioned")[0]
    assert sum(key.split("-")[0] == query.split("-")[0] for key in keys) <= 3


def test_slot_rule_for_noise_and_needle_haystacks(tokenizer):
    slots = random_slots(5, 200, 3)
    assert slots == sorted(slots) and len(set(slots)) == 3 and all(0 <= s < 200 for s in slots)
    assert slots == random_slots(5, 200, 3) and slots != random_slots(6, 200, 3)
    draws = [random_slots(seed, 1000, 1)[0] for seed in range(2000)]
    assert abs(statistics.mean(draws) / 1000 - 0.5) < 0.03
    assert len(set(draws)) > 800  # uniform over 1000 slots, not the 40-point depth grid
    for name in ("niah_single_1", "niah_multikey_2", "niah_multikey_3"):
        task = NIAH_TASKS[name]
        fractions = []
        for index in range(12):
            sample = build_niah_sample(task, tokenizer, 4000, index=index, seed=1)
            lines = sample.prompt.split("\n")[1:-1]
            answer_line = next(i for i, line in enumerate(lines) if sample.answers[0] in line)
            assert answer_line == sample.slots[0]  # the needle sits after `slot` haystack units
            fractions.append(sample.slots[0] / sample.haystack_units)
        assert len({round(100 * f) for f in fractions} - set(DEPTHS)) > 0 or len(set(fractions)) > 8
    prose = build_niah_sample(NIAH_TASKS["niah_single_2"], tokenizer, 4000, index=0, seed=1)
    assert prose.slots is None and set(prose.depths) <= set(DEPTHS)


def test_wilson_interval_matches_hand_values():
    # hand values: p=5/10 -> [0.2366, 0.7634]; 0/10 -> [0, 0.2775]; 10/10 -> [0.7225, 1]; 45/50 -> [0.7864, 0.9565]
    assert wilson_interval([100.0] * 5 + [0.0] * 5) == pytest.approx((23.66, 76.34), abs=0.01)
    assert wilson_interval([0.0] * 10) == pytest.approx((0.0, 27.75), abs=0.01)
    assert wilson_interval([100.0] * 10) == pytest.approx((72.25, 100.0), abs=0.01)
    assert wilson_interval([100.0] * 45 + [0.0] * 5) == pytest.approx((78.64, 95.65), abs=0.01)
    with pytest.raises(ValueError):
        wilson_interval([])


def test_string_match_part():
    assert string_match_part("It was the Copper market.", ["copper", "tin"]) == 100.0
    assert string_match_part("no idea", ["copper", "tin"]) == 0.0


CHAT = (
    "{% for message in messages %}<|user|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_wraps_the_question_and_keeps_the_answer_prefix(tokenizer, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT)
    assert resolve_prompt_format(tokenizer, "auto") is PLAIN  # no template of its own
    chat = resolve_prompt_format(tokenizer, str(template))
    assert chat("Q?", " The answer is") == "<|user|>Q?<|end|><|assistant|> The answer is"
    sample = _make("niah_single_2", tokenizer, chat)(2048, 0)
    assert sample.prompt.startswith("<|user|>A special magic number is hidden")
    assert "mentioned in the provided text?<|end|><|assistant|> The special magic number for " in sample.prompt
    assert sample.prompt.endswith("mentioned in the provided text is")
    results = run_eval_suite(
        OracleBackend(tokenizer),
        ["niah_multivalue", "vt", "cwe"],
        [3000],
        samples=2,
        progress=False,
        chat_template=str(template),
    )
    assert all(by_length["3000"]["score"] == 100.0 for by_length in results["tasks"].values())
    prompt = results["provenance"]["prompt"]
    assert prompt["chat_template"] == str(template) and prompt["sha256"] == hashlib.sha256(CHAT.encode()).hexdigest()
    with pytest.raises(ValueError, match="Jinja chat template"):
        resolve_prompt_format(tokenizer, str(tmp_path / "missing.jinja"))


def test_tokenizer_chat_template_auto_and_bos_once(tmp_path):
    from megatron_harpe.eval.backends.hf import HFTokenizer
    from megatron_harpe.eval.testing import save_tiny_tokenizer

    save_tiny_tokenizer(str(tmp_path))
    hf_tokenizer = HFTokenizer.from_pretrained(str(tmp_path))
    hf_tokenizer.hf_tokenizer.chat_template = "{{ bos_token }}" + CHAT
    chat = resolve_prompt_format(hf_tokenizer, "auto")
    assert chat.name == "tokenizer"
    prompt = chat("Q?", " A")
    assert prompt == "<s><|user|>Q?<|end|><|assistant|> A"
    ids = encode_prompt(hf_tokenizer, prompt)
    assert ids[0] == hf_tokenizer.bos_id and ids[1] != hf_tokenizer.bos_id  # BOS written once
    assert resolve_prompt_format(hf_tokenizer, "none") is PLAIN


class ReorderingModel(OracleBackend):
    """Writes the expected values in reverse order; knows only the first `keep` of them and
    writes wrong values after those. Under teacher forcing it continues whatever was forced."""

    def __init__(self, tokenizer, keep: int | None = None):
        super().__init__(tokenizer)
        self.keep = keep

    def _beliefs(self, prompt: str):
        values, style = read_ideal_answer(prompt)
        known = list(reversed(values))[: self.keep]
        return values, style, known + [f"#{i}wrong" for i in range(len(values) - len(known))]

    def _ideal_answer_ids(self, prompt_ids):
        prompt = self.tokenizer.decode(prompt_ids)
        _, style, beliefs = self._beliefs(prompt)
        return encode_continuation(self.tokenizer, prompt, format_answer(style, beliefs))

    def teacher_forced_match(self, prompt_ids, answer_ids):
        prompt = self.tokenizer.decode(prompt_ids)
        values, style, beliefs = self._beliefs(prompt)
        predictions = []
        for position in range(len(answer_ids)):
            forced = answer_ids[:position]
            text = self.tokenizer.decode(forced)
            written = sorted((value for value in values if value in text), key=text.index)
            order = (written + [belief for belief in beliefs if belief not in written])[: len(values)]
            full = encode_continuation(self.tokenizer, prompt, format_answer(style, order))
            ok = full[:position] == forced and position < len(full)
            predictions.append(full[position] if ok else self.tokenizer.eos_id)
        return predictions


@pytest.mark.parametrize("task", ["niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"])
def test_teacher_forcing_does_not_fix_the_answer_order(tokenizer, task):
    make = _make(task, tokenizer)
    sample = make(3000, 1)
    assert len(sample.answers) > 1
    reordered = ReorderingModel(tokenizer)
    assert score_sample(reordered, sample, "generate")[0] == 100.0
    assert score_sample(reordered, sample, "teacher_forcing")[0] == 100.0
    half = len(sample.answers) // 2
    partial = ReorderingModel(tokenizer, keep=half)
    expected = 100.0 * half / len(sample.answers)
    assert score_sample(partial, sample, "generate")[0] == pytest.approx(expected)
    assert score_sample(partial, sample, "teacher_forcing")[0] == pytest.approx(expected)


def test_qa_tasks_skip_without_data_and_the_headline_says_so(tokenizer, capsys):
    results = run_eval_suite(OracleBackend(tokenizer), ["ruler"], [2048], samples=1, progress=True)
    assert set(results["skipped"]) == {"qa_1", "qa_2"} and "qa_1" not in results["tasks"]
    assert "not RULER-13" in results["mean_label"]
    assert "qa_1, qa_2 skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--qa-squad"):
        run_eval_suite(OracleBackend(tokenizer), ["qa_1"], [2048], samples=1, progress=False)
    assert mean_label(list(NIAH_TASKS), {}) == "NIAH-8 mean"
    assert mean_label(["niah_single_1", "vt"], {}).startswith("mean of 2 tasks")


def test_qa_samples_follow_ruler(tokenizer):
    from megatron_harpe.eval.tasks.qa import load_qa_dataset

    squad = load_qa_dataset("qa_1", QA_FILES["qa_1"])
    assert len(squad.questions) == 12  # the 4 unanswerable questions are dropped
    sample = _make("qa_1", tokenizer)(2048, 0)
    assert sample.metric == "part" and sample.answers == ["copper", "copper market"]
    assert "Document 1:\n" in sample.prompt and sample.prompt.endswith(
        "Question: What trade did the market of Varnholt deal in? Answer:"
    )
    gold = squad.documents[squad.questions[0].gold[0]]
    assert gold in sample.prompt
    hotpot = _make("qa_2", tokenizer)(1500, 2)
    assert hotpot.answers == ["stone bridges"]
    with pytest.raises(ValueError, match="lower --samples"):
        _make("qa_2", tokenizer)(1500, 99)
    bad = os.path.join(DATA, "qa_hotpot_tiny.json")
    with pytest.raises(ValueError, match="SQuAD"):
        load_qa_dataset("qa_1", bad)


def test_same_command_same_prompts_and_samples_differ(tokenizer):
    for task in ("vt", "cwe", "fwe"):
        make = _make(task, tokenizer)
        first, again, other = make(3000, 0), make(3000, 0), make(3000, 1)
        assert first.prompt == again.prompt and first.prompt != other.prompt
        assert first.prompt_tokens + first.answer_budget <= 3000
        assert first.prompt_tokens + first.answer_budget > 3000 - 200  # filled, not a stub
    long = _make("cwe", tokenizer)(16000, 0)  # RULER's full setting from 4096 tokens: 30 / 3 repeats
    counts = [long.prompt.rsplit("Below is a numbered", 1)[1].count(f". {word} ") for word in long.answers]
    assert min(counts) >= 29 and long.prompt_tokens + long.answer_budget <= 16000


def test_ruler_chat_template_follows_the_model_family(tmp_path):
    from megatron_harpe.eval.backends.hf import HFTokenizer
    from megatron_harpe.eval.testing import save_tiny_tokenizer

    save_tiny_tokenizer(str(tmp_path))
    tokenizer = HFTokenizer.from_pretrained(str(tmp_path))
    assert resolve_prompt_format(tokenizer, "ruler").name == "ruler:base"  # no chat template: a base model
    tokenizer.hf_tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    llama3 = resolve_prompt_format(tokenizer, "ruler")
    assert llama3.name == "ruler:meta-llama3" and llama3.info["chat_template"] == "ruler:meta-llama3"
    assert llama3("Q?", " A") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n A"
    )
    # no date header, no system prompt: what the tokenizer's own template would have added is absent
    assert "Cutting Knowledge" not in llama3("Q?", "")
    lwm = resolve_prompt_format(tokenizer, "ruler:lwm-chat")
    assert lwm("Q", " A") == "You are a helpful assistant. USER: Q ASSISTANT:  A"
    assert lwm("Q", " A", singular=True) == "You is a helpful assistant. USER: Q ASSISTANT:  A"  # RULER's rewording
    tokenizer.hf_tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match="RULER has no template for this model's chat format"):
        resolve_prompt_format(tokenizer, "ruler")
    with pytest.raises(ValueError, match="ruler:nonsense: RULER has no such template"):
        resolve_prompt_format(tokenizer, "ruler:nonsense")
