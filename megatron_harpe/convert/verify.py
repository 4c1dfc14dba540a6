"""Check that a megatron checkpoint and a Hugging Face model compute the same function: the
largest logit difference on the same tokens (both in fp32), whether greedy continuations agree
(HF with its KV cache through `generate()`, megatron by recomputation), and the largest difference
between the logits of HF's cached decoding steps and megatron's full forward over the same
continuation (so a broken KV cache fails even when the argmax happens to survive it).

    report = verify_conversion("runs/demo_cpu/checkpoints", "runs/demo_cpu/hf")
    print(report.summary()); assert report.ok(tolerance=1e-4)

For HF -> megatron, `hf_config` rebuilds the HF source with the position encoding the
checkpoint trains with (so the comparison checks the weights even when the encoding changes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM, PretrainedConfig

from megatron_harpe.convert.hf_harpe import HarpeLlamaConfig, HarpeLlamaForCausalLM
from megatron_harpe.convert.megatron_side import load_megatron_model, megatron_greedy, megatron_logits


@dataclasses.dataclass
class VerifyReport:
    max_abs_logit_diff: float
    max_abs_logit: float
    megatron_tokens: list[int]
    hf_tokens: list[int]
    prompt_length: int
    max_abs_cached_logit_diff: float = 0.0
    nonfinite_logits: tuple[str, ...] = ()
    """Which side's logits hold NaN/inf ("megatron", "HF"): then nothing is compared."""

    @property
    def greedy_agree(self) -> bool:
        return self.megatron_tokens == self.hf_tokens and not self.nonfinite_logits

    def ok(self, tolerance: float) -> bool:
        return self.greedy_agree and max(self.max_abs_logit_diff, self.max_abs_cached_logit_diff) <= tolerance

    def summary(self) -> str:
        if self.nonfinite_logits:  # an argmax over NaN agrees with anything: say nothing about agreement
            return (
                f"the logits of {' and '.join(self.nonfinite_logits)} hold NaN/inf over {self.prompt_length} tokens: "
                "the weights are not finite (or overflow), so the two cannot be compared"
            )
        return (
            f"largest logit difference {self.max_abs_logit_diff:.3e} (largest |logit| {self.max_abs_logit:.3g}) "
            f"over {self.prompt_length} tokens, {self.max_abs_cached_logit_diff:.3e} in HF's cached decoding steps; "
            "greedy continuations "
            + ("agree" if self.greedy_agree else "DIFFER")
            + f": megatron {self.megatron_tokens} / HF {self.hf_tokens}"
        )


def load_hf_model(
    hf_dir: str | Path, hf_config: PretrainedConfig | None = None, trust_remote_code: bool = True
) -> torch.nn.Module:
    """The HF model in fp32; with `hf_config`, its weights under that configuration instead."""
    if hf_config is None:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    else:
        model_class = HarpeLlamaForCausalLM if isinstance(hf_config, HarpeLlamaConfig) else LlamaForCausalLM
        model = model_class.from_pretrained(hf_dir, config=hf_config, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_cached_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation with the KV cache (end-of-sequence does not stop it) and the fp32 logits
    of each decoding step, [new_tokens, vocab]."""
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, use_cache=True,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=generation)
    return output.sequences[0, prompt.size(1) :].tolist(), torch.cat(output.logits).float()


def hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    return hf_cached_greedy(model, prompt, new_tokens)[0]


def verify_conversion(
    megatron_checkpoint: str | Path,
    hf_dir: str | Path,
    *,
    hf_config: PretrainedConfig | None = None,
    prompt_length: int = 32,
    new_tokens: int = 8,
    seed: int = 0,
    trust_remote_code: bool = True,
) -> VerifyReport:
    megatron_model, spec = load_megatron_model(megatron_checkpoint, dtype=torch.float32)
    hf_model = load_hf_model(hf_dir, hf_config, trust_remote_code)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.model.vocab_size, (2, prompt_length), generator=generator)

    megatron = megatron_logits(megatron_model, tokens)
    with torch.no_grad():
        hf = hf_model(tokens).logits.float()
    hf_tokens, cached_logits = hf_cached_greedy(hf_model, tokens[:1], new_tokens)
    continuation = torch.cat([tokens[:1], torch.tensor([hf_tokens])], dim=1)[:, :-1]
    recomputed = megatron_logits(megatron_model, continuation)[0, prompt_length - 1 :]
    nonfinite = tuple(side for side, logits in (("megatron", megatron), ("HF", hf)) if not torch.isfinite(logits).all())
    return VerifyReport(
        nonfinite_logits=nonfinite,
        max_abs_logit_diff=(megatron - hf).abs().max().item(),
        max_abs_logit=hf.abs().max().item(),
        megatron_tokens=megatron_greedy(megatron_model, tokens[:1], new_tokens),
        hf_tokens=hf_tokens,
        prompt_length=prompt_length,
        max_abs_cached_logit_diff=(recomputed - cached_logits).abs().max().item(),
    )
