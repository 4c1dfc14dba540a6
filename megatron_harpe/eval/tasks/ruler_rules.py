"""The rules of NVIDIA/RULER our generators follow, in one place: which RULER, its fixed-seed
shuffles, its per-family prompt templates, and how it sizes a prompt ("fill").

    from megatron_harpe.eval.tasks.ruler_rules import RULER_VERSION, fixed_shuffle, ruler_template
    docs = fixed_shuffle(docs, seed)            # random.Random(seed).shuffle: one permutation per length

Version: RULER at commit 4f6507e (2024-04-25, "add evaluation scripts"), the code behind its
published table. Our prompts follow its `scripts/data/synthetic/{niah,variable_tracking,
common_words_extraction,freq_words_extraction,qa}.py`, `constants.py`, `template.py` and
`synthetic.yaml` of that commit; where later RULER differs (HEAD: vt's one statement per line,
its randomised vt example, cwe's few-shot loop, binary-search sizing) we say so in
docs/evaluation.md.

Fixed-seed shuffles: RULER shuffles needles, documents (qa), word lists (cwe, fwe) with
`random.Random(random_seed).shuffle(...)`, a new generator with the run's seed each time, so a
list of a given length is always permuted the same way. For qa this decides where the gold
document sits: at a given document count, at the same depth in every sample. CPython's
Mersenne Twister makes `fixed_shuffle(items, 42)` the very permutation RULER applies with seed 42.

Fill: RULER sizes a task's haystack once per (task, length) on a probe sample, in whole steps
(`RULER_INCREMENTS`: 500 words of essay, 25 noise paragraphs or distractor needles, 5 below 4096
tokens, 10 vt noise paragraphs, 10 cwe words, 10 qa documents), measuring prompt + answer
text, then gives every sample that size less whole steps until it fits: prompts are often
shorter than the length ("--fill ruler"). "--fill tight" (our default) fits each sample
exactly: the largest haystack whose prompt leaves the answer budget free.
"""

from __future__ import annotations

import random
from typing import TypeVar

RULER_VERSION = {
    "repository": "NVIDIA/RULER",
    "commit": "4f6507e",
    "date": "2024-04-25",
    "label": "RULER 4f6507e (April 2024, the code behind its published table)",
}
T = TypeVar("T")

# RULER's model templates (scripts/data/template.py): the task goes in {task_template}, the
# answer prefix follows the whole. "base" is the plain format of base models.
RULER_TEMPLATES = {
    "base": "{task_template}",
    "meta-chat": "[INST] {task_template} [/INST]",
    "vicuna-chat": "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: {task_template} ASSISTANT:",
    "lwm-chat": "You are a helpful assistant. USER: {task_template} ASSISTANT: ",
    "command-r-chat": "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>{task_template}<|END_OF_TURN_TOKEN|>"
    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "chatglm-chat": "[gMASK]sop<|user|> \n {task_template}<|assistant|> \n ",
    "RWKV": "User: hi\n\nAssistant: Hi. I am your assistant and I will provide expert full response in full details. "
    "Please feel free to ask any question and I will always answer it\n\nUser: {task_template}\n\nAssistant:",
    "Phi3": "<|user|>\n{task_template}<|end|>\n<|assistant|>\n",
    "meta-llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{task_template}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "jamba": "<|startoftext|><|bom|><|system|> <|eom|><|bom|><|user|> {task_template}<|eom|><|bom|><|assistant|>",
    "nemotron5-instruct": "<SPECIAL_10>System\n\n<SPECIAL_11>User\n{task_template}\n<SPECIAL_11>Assistant\n",
}
# (a marker in the tokenizer's own chat template, the RULER template of that family), first match wins
FAMILY_MARKERS = (
    ("<|start_header_id|>", "meta-llama3"),
    ("[INST]", "meta-chat"),
    ("<|START_OF_TURN_TOKEN|>", "command-r-chat"),
    ("[gMASK]", "chatglm-chat"),
    ("<|bom|>", "jamba"),
    ("<SPECIAL_11>", "nemotron5-instruct"),
    ("<|end|>", "Phi3"),
    ("ASSISTANT:", "vicuna-chat"),
)
# RULER's rewording of a NIAH prompt that expects one value, applied to the whole template
# (model template included) before the task's fields are filled in (niah.py)
SINGULAR_REWORDING = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))


def fixed_shuffle(items: list[T], seed: int) -> list[T]:
    """A copy of `items` permuted as RULER's `random.Random(seed).shuffle(items)` permutes it."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def singular(text: str) -> str:
    for old, new in SINGULAR_REWORDING:
        text = text.replace(old, new)
    return text


def family_of(chat_template: str | None) -> str:
    """RULER's template name for a tokenizer whose own chat template is `chat_template` ("base"
    without one); a ValueError when RULER has no template of that family."""
    if not chat_template:
        return "base"
    for marker, name in FAMILY_MARKERS:
        if marker in chat_template:
            return name
    raise ValueError(
        "RULER has no template for this model's chat format (its templates: "
        f"{', '.join(RULER_TEMPLATES)}): pass --chat-template ruler:NAME, auto, none or a Jinja file"
    )


def ruler_increment(haystack: str, length: int) -> int:
    """RULER's sizing step for a haystack kind at a length (see module docstring)."""
    if haystack == "essay":
        return 500
    if haystack in ("noise", "needles"):
        return 5 if length < 4096 else 25
    if haystack in ("vt", "cwe", "qa"):
        return 10
    raise ValueError(f"no RULER increment for haystack {haystack!r}")
