"""How a task's question becomes the prompt text: plain (base models) or inside a chat template.

    from megatron_harpe.eval.tasks.chat import PLAIN, resolve_prompt_format
    prompt_format = resolve_prompt_format(tokenizer, "auto")   # or "none", or a Jinja file
    prompt = prompt_format(question, answer_prefix)

RULER builds every prompt as `model_template.format(task_template=question) + answer_prefix`:
the question sits in the user turn and the answer prefix ("The special magic number for ...
is") follows the assistant turn's opening, so the model continues the prefix. Here the user turn
is rendered with the tokenizer's own chat template (`apply_chat_template`, one user message,
`add_generation_prompt=True`), or with a Jinja template from a file; "none" is RULER's "base"
template (question and answer prefix back to back). "auto" takes the tokenizer's template when
it has one, else none: pass "none" for a base model whose tokenizer ships a template. A
tokenizer's own template may add a default system prompt (Llama-3.1's date header, Qwen's or
SmolLM2's system message) that RULER's prompts never had: "ruler" uses RULER's own template of
the model's family instead (`ruler_rules.RULER_TEMPLATES`, picked from the tokenizer's chat
template; "base" without one), "ruler:NAME" a named one.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from megatron_harpe.eval.backends.base import Tokenizer
from megatron_harpe.eval.tasks.ruler_rules import RULER_TEMPLATES, family_of
from megatron_harpe.eval.tasks.ruler_rules import singular as singular_wording


class PromptFormat:
    """question + answer prefix -> prompt text; `info` says which template made it.
    `render_singular` (RULER's templates) renders a question that expects one value, whose
    template RULER rewords to the singular, its own words included."""

    def __init__(
        self,
        name: str = "none",
        render: Callable[[str], str] | None = None,
        template: str | None = None,
        render_singular: Callable[[str], str] | None = None,
    ):
        self.name = name
        self.render = render
        self.template = template
        self.render_singular = render_singular

    def __call__(self, question: str, answer_prefix: str, singular: bool = False) -> str:
        render = self.render_singular if singular and self.render_singular is not None else self.render
        if render is None:
            return question + answer_prefix
        return render(question) + answer_prefix

    @property
    def info(self) -> dict[str, Any]:
        if self.template is None:
            return {"chat_template": "none"}
        return {"chat_template": self.name, "sha256": hashlib.sha256(self.template.encode("utf-8")).hexdigest()}


PLAIN = PromptFormat()


def _render_with_jinja(template: str, tokenizer: Tokenizer) -> Callable[[str], str]:
    """A chat template rendered without transformers (a tokenizer that is not Hugging Face)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    compiled = environment.from_string(template)
    decode = tokenizer.decode

    def render(question: str) -> str:
        return compiled.render(
            messages=[{"role": "user", "content": question}],
            add_generation_prompt=True,
            bos_token=decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else "",
            eos_token=decode([tokenizer.eos_id]) if tokenizer.eos_id is not None else "",
        )

    return render


def ruler_prompt_format(name: str) -> PromptFormat:
    """RULER's model template `name` (ruler_rules.RULER_TEMPLATES); "base" is the plain format."""
    if name not in RULER_TEMPLATES:
        raise ValueError(
            f"--chat-template ruler:{name}: RULER has no such template; choose one of {', '.join(RULER_TEMPLATES)}"
        )
    template = RULER_TEMPLATES[name]
    worded = singular_wording(template)
    return PromptFormat(
        f"ruler:{name}",
        lambda question: template.replace("{task_template}", question),
        template,
        render_singular=lambda question: worded.replace("{task_template}", question),
    )


def resolve_prompt_format(tokenizer: Tokenizer, spec: str) -> PromptFormat:
    """`spec`: "none", "auto" (the tokenizer's chat template if it has one), "ruler" (RULER's
    template of the model's family, recognised from the tokenizer's chat template: see
    ruler_rules.FAMILY_MARKERS; "base" when it has none), "ruler:NAME" (that RULER template) or
    a file holding a Jinja chat template."""
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    own_template = getattr(hf_tokenizer, "chat_template", None) if hf_tokenizer is not None else None
    if spec == "ruler" or spec.startswith("ruler:"):
        if spec == "ruler" and isinstance(own_template, dict):
            raise ValueError("the tokenizer has several named chat templates: pass --chat-template ruler:NAME")
        return ruler_prompt_format(spec[len("ruler:") :] if ":" in spec else family_of(own_template))
    if spec == "none" or (spec == "auto" and not own_template):
        return PLAIN
    if spec == "auto":
        template, name = own_template, "tokenizer"
    else:
        if not os.path.isfile(spec):
            raise ValueError(f"--chat-template {spec!r}: expected auto, none or a file holding a Jinja chat template")
        with open(spec, encoding="utf-8") as handle:
            template, name = handle.read(), os.path.abspath(spec)
    if not isinstance(template, str):
        raise ValueError("the tokenizer has several named chat templates: pass one as a file with --chat-template FILE")
    if hf_tokenizer is None:
        render = _render_with_jinja(template, tokenizer)
    else:

        def render(question: str) -> str:
            return hf_tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
            )

    try:
        render("probe")
    except Exception as error:  # a template error surfaces here, not in the middle of a run
        raise ValueError(f"chat template from {name} does not render one user message: {error}") from error
    return PromptFormat(name, render, template)
