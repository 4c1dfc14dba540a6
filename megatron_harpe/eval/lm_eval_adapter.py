"""lm-evaluation-harness on our models: an `LM` over the megatron backend, a progress proxy, and
quiet set-up.

    from megatron_harpe.eval.lm_eval_adapter import MegatronLM, ProgressLM, quiet_lm_eval
    lm = ProgressLM(MegatronLM(load_backend("ckpt/harpe")))
    with quiet_lm_eval("out/lm_eval.log"):
        results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], num_fewshot=10)

`MegatronLM` subclasses lm-eval's `TemplateLM`, so the harness's own code turns every request into
tokens (context/continuation split, moved trailing spaces, an empty context conditioned on the
prefix token, rolling windows); the wrapper only scores token ids with the backend's public
calls:
- `loglikelihood`: one forward of context + continuation[:-1] through `backend.logits(ids, last=n)`
  (only the continuation's n rows are gathered, under TP and CP alike); the sum of their log
  probabilities and whether every continuation token is the argmax;
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows of the model's maximum length over
  the text encoded as lm-eval's HF model encodes it, each window scored as above;
- `generate_until`: greedy `backend.generate` (the KV cache under TP/CP), in growing chunks so a
  stop sequence ends the work early, cut at the first stop sequence exactly as lm-eval's HF
  model cuts it.
Tokenization follows the model's tokenizer like lm-eval's Hugging Face model does: BOS first
when the tokenizer adds one (and only once: a context that already starts with it keeps one).

Under torchrun every rank runs the same harness on the same requests (each reports rank 0 of a
world of one to lm-eval), so every forward is collective; rank 0 writes the results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

import torch
from lm_eval.api.model import LM, TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron_harpe import cli
from megatron_harpe.eval.backends.base import encode_prompt

DEFAULT_MAX_GEN_TOKENS = 256  # lm-eval's default when a task gives none
FIRST_GENERATION_CHUNK = 16
REQUESTS_PER_PROGRESS_STEP = 32


class MegatronLM(TemplateLM):
    """lm-eval `LM` over a backend with `logits(ids, last)`, `generate` and a `tokenizer`
    (`MegatronBackend`: a megatron_harpe checkpoint, sharded with TP/CP or not)."""

    def __init__(self, backend: Any, max_length: int | None = None) -> None:
        super().__init__()
        if not hasattr(backend, "logits"):
            raise ValueError(
                f"backend {backend.name} has no logits(): lm-eval needs the megatron backend "
                "(Hugging Face directories run through lm-eval's own model)"
            )
        self.backend = backend
        self.model_tokenizer = backend.tokenizer
        self._max_length = max_length or backend.config.model.max_position_embeddings

    # -- what lm-eval reads --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.model_tokenizer.eos_id
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token: lm-eval needs one")
        return eos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (lm-eval's HF model's rule)."""
        bos = self.model_tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(
            getattr(getattr(self.model_tokenizer, "hf_tokenizer", None), "name_or_path", "")
            or type(self.model_tokenizer).__name__
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """BOS as the model's tokenizer adds it (once), unless add_special_tokens=False."""
        if add_special_tokens is False:
            return self.model_tokenizer.encode(string)
        return encode_prompt(self.model_tokenizer, string)

    def tok_decode(self, tokens: list[int]) -> str:
        vocab = self.model_tokenizer.vocab_size  # a TP-padded vocabulary has ids that spell nothing
        return self.model_tokenizer.decode([token for token in tokens if 0 <= token < vocab])

    # -- scoring ----------------------------------------------------------------------------
    def _continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would write it, from the
        last max_length + 1 tokens (lm-eval's left truncation)."""
        ids = (context + continuation)[-(self.max_length + 1) :][:-1]
        logits = self.backend.logits(ids, last=len(continuation)).float()  # [n, vocab]
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(continuation, device=logprobs.device)
        total = float(logprobs.gather(1, targets[:, None]).sum())
        greedy = bool((logprobs.argmax(dim=-1) == targets).all())
        return total, greedy

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = []
        for key, context, continuation in requests:
            if not continuation:
                raise ValueError(f"empty continuation in request {key!r}")
            answer = self._continuation_logprob(context, continuation)
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in (request.args for request in requests):
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(self._continuation_logprob(context, continuation)[0] for context, continuation in windows)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        eos_text = (
            self.model_tokenizer.decode([self.eot_token_id])
            if self.eot_token_id < self.model_tokenizer.vocab_size
            else None
        )
        for context, gen_kwargs in (request.args for request in requests):
            options = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKENS)
            if options.get("do_sample") or float(options.get("temperature") or 0.0) > 0.0:
                raise ValueError(
                    f"the megatron backend decodes greedily only: the task asks for sampling ({gen_kwargs})"
                )
            stops = handle_stop_sequences(options.pop("until", None), eos=eos_text or None)
            budget = int(options.pop("max_gen_toks"))
            if budget >= self.max_length:
                raise ValueError(f"the task asks for {budget} new tokens, more than the model's {self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - budget) :]
            text = self._generate_until_stop(prompt, budget, stops)
            text = postprocess_generated_text(text, stops, None)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def _generate_until_stop(self, prompt: list[int], budget: int, stops: list[str]) -> str:
        """Greedy continuation of up to `budget` tokens, computed in chunks of growing size so a
        stop sequence ends it early; greedy decoding of prompt + the first k tokens continues
        with exactly the tokens an uninterrupted run would write."""
        generated: list[int] = []
        chunk = FIRST_GENERATION_CHUNK
        while len(generated) < budget:
            step = min(chunk, budget - len(generated))
            new = self.backend.generate(prompt + generated, max_new_tokens=step)
            generated += new
            if len(new) < step:  # stopped at EOS
                break
            if any(stop and stop in self.tok_decode(generated) for stop in stops):
                break
            chunk *= 2
        return self.tok_decode(generated)


class ProgressLM(LM):
    """Any lm-eval `LM` with one progress bar of ours: requests go to it in small groups (each
    scored exactly as alone; the wrapped model's own bars stay off)."""

    def __init__(self, lm: LM, stream: Any = None, enabled: bool = True, label: str = "short tasks") -> None:
        super().__init__()
        self.lm = lm
        self.stream = stream
        self.enabled = enabled
        self.label = label

    def __getattr__(self, name: str) -> Any:  # rank, world_size, tokenizer_name, chat templates ...
        return getattr(self.__dict__["lm"], name)

    @property
    def rank(self) -> int:
        return self.lm.rank

    @property
    def world_size(self) -> int:
        return self.lm.world_size

    @property
    def device(self) -> Any:
        return self.lm.device

    def set_cache_hook(self, cache_hook: Any) -> None:
        self.lm.set_cache_hook(cache_hook)

    def _in_groups(self, method: str, requests: list) -> list:
        results: list = []
        with tqdm(
            total=len(requests), desc=f"{self.label}: {method}", file=self.stream, disable=not self.enabled, leave=False
        ) as bar:
            for start in range(0, len(requests), REQUESTS_PER_PROGRESS_STEP):
                group = requests[start : start + REQUESTS_PER_PROGRESS_STEP]
                results += getattr(self.lm, method)(group, disable_tqdm=True)
                bar.update(len(group))
        return results

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._in_groups("loglikelihood", requests)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._in_groups("loglikelihood_rolling", requests)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._in_groups("generate_until", requests)


LIBRARY_LOGGERS = ("lm_eval", "datasets", "evaluate", "huggingface_hub", "urllib3", "filelock", "fsspec", "absl")


@contextlib.contextmanager
def quiet_lm_eval(log_path: str | None) -> Iterator[Any]:
    """Keep the harness's logging, progress bars, warnings and subprocess chatter (its `git
    describe`) off the terminal: everything written to stderr while inside goes to `log_path`
    (nothing is hidden with --verbose). Yields a stream on the real terminal for our own bar."""
    os.environ.setdefault("LMEVAL_LOG_LEVEL", "ERROR")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if cli.verbose() or log_path is None:
        yield sys.stderr
        return
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            terminal.close()
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
