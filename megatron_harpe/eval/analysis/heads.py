"""How far each attention head reaches, per layer and head, next to the head's RoPE base.

    from megatron_harpe.eval.analysis.heads import analyze_heads
    from megatron_harpe.eval.backends import load_backend
    backend = load_backend("runs/demo_cpu/checkpoints")           # or a Hugging Face directory
    analysis = analyze_heads(backend, documents, length=512, thresholds=(64, 256))
    analysis.to_dict()["correlation"]        # base vs mean distance; CLI: tools/analyze_heads.py

The measure, for a causal attention-probability row p(q, .) of query position q:
  attended distance   sum_k p(q, k) * (q - k)
  share beyond T      sum over k with q - k > T of p(q, k)
  first-token mass    p(q, 0)  (an "attention sink" looks far without reading far text)
each averaged over the queries at positions >= `min_query_position` (only late queries can
reach far back), over documents and per (layer, head).

Capture leaves the model untouched: the probabilities are recomputed from the post-RoPE
queries and keys the attention already receives, softmax(q k^T * scale + causal mask), in
blocks of heads x queries so no dense [heads, s, s] tensor exists at long lengths; keys are
shared by the query heads of a k/v group as in the model. Megatron checkpoints get a forward
pre-hook on every layer's `core_attention` and the forward stops after the last layer (no
vocabulary logits). Hugging Face models run with a registered attention function that records
and then calls the model's own attention (sdpa or eager).

Parallelism: tensor parallelism works (each rank measures its own heads, the sums are added
over the TP group); context parallelism is refused, run with --context-parallel 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

DEFAULT_THRESHOLDS = (4096, 32768)
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # scores per block: 64 MiB in fp32, a few such temporaries live at once
HF_ATTENTION_NAME = "megatron_harpe_head_analysis"


class DistanceAccumulator:
    """Running sums of the attention-distance statistics, one cell per (layer, head)."""

    def __init__(self, num_layers: int, num_heads: int, thresholds: Sequence[int] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = tuple(int(t) for t in thresholds)
        shape = (num_layers, num_heads)
        self.queries = torch.zeros(shape, dtype=torch.float64)
        self.distance = torch.zeros(shape, dtype=torch.float64)
        self.first_token = torch.zeros(shape, dtype=torch.float64)
        self.beyond = torch.zeros((len(self.thresholds), *shape), dtype=torch.float64)

    def add_probabilities(
        self,
        layer: int,
        heads: slice,
        probabilities: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
    ) -> None:
        """Add attention rows `probabilities` [h, nq, nk] (each row sums to 1, zero where a key
        follows its query) of the heads `heads` of `layer`."""
        probabilities = probabilities.float()
        offsets = query_positions[:, None].to(probabilities) - key_positions[None, :].to(probabilities)  # [nq, nk]
        # "hqk,qk->h" contracts q and k at once: a matrix-vector product, no [h, nq, nk] temporary
        self.distance[layer, heads] += torch.einsum("hqk,qk->h", probabilities, offsets.clamp(min=0)).double().cpu()
        for index, threshold in enumerate(self.thresholds):
            far = (offsets > threshold).to(probabilities)
            self.beyond[index, layer, heads] += torch.einsum("hqk,qk->h", probabilities, far).double().cpu()
        first = key_positions == 0
        if bool(first.any()):
            self.first_token[layer, heads] += probabilities[:, :, first].sum(dim=(1, 2)).double().cpu()
        self.queries[layer, heads] += probabilities.size(1)

    def add_query_key(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        query_positions: torch.Tensor,
        head_offset: int = 0,
        max_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        """Add the causal attention of post-RoPE `query` [hq, nq, d] at `query_positions` over
        `key` [hk, nk, d] at positions 0..nk-1; query head h reads key head h // (hq // hk)."""
        heads, _, _ = query.shape
        if heads % key.size(0):
            raise ValueError(f"{heads} query heads cannot share {key.size(0)} key heads evenly")
        group = heads // key.size(0)
        key_positions = torch.arange(key.size(1), device=key.device)
        query_positions = query_positions.to(key.device)
        length = key.size(1)
        head_block = max(1, min(heads, max_elements // max(1, length * 64)))
        rows = max(1, max_elements // (head_block * length))
        for first_head in range(0, heads, head_block):
            head_index = torch.arange(first_head, min(first_head + head_block, heads), device=key.device)
            block_keys = key[head_index // group].float()  # [h, nk, d]
            for start in range(0, query.size(1), rows):
                positions = query_positions[start : start + rows]
                visible = int(positions.max()) + 1
                scores = (
                    torch.einsum(
                        "hqd,hkd->hqk", query[head_index, start : start + rows].float(), block_keys[:, :visible]
                    )
                    * scale
                )
                scores.masked_fill_(key_positions[None, :visible] > positions[:, None], float("-inf"))
                heads_here = slice(head_offset + first_head, head_offset + first_head + len(head_index))
                self.add_probabilities(layer, heads_here, scores.softmax(dim=-1), positions, key_positions[:visible])

    def all_reduce(self, group: Any) -> None:
        """Sum with the other ranks of `group` (they hold other heads or other queries)."""
        from megatron_harpe import collectives

        for tensor in (self.queries, self.distance, self.first_token, self.beyond):
            collectives.all_reduce(tensor, group=group)  # host float64 accumulators: moved for NCCL

    def means(self) -> dict[str, Any]:
        """{"mean_distance": [L, H], "first_token_mass": [L, H], "share_beyond": {T: [L, H]}};
        NaN where no query was seen."""
        count = self.queries.masked_fill(self.queries == 0, float("nan"))
        return {
            "mean_distance": self.distance / count,
            "first_token_mass": self.first_token / count,
            "share_beyond": {t: self.beyond[i] / count for i, t in enumerate(self.thresholds)},
        }


def attention_distance_stats(
    probabilities: torch.Tensor,
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
    min_query_position: int = 0,
) -> dict[str, Any]:
    """The statistics of a full causal attention pattern [heads, s, s] (query q at row q, key k
    at column k), averaged over the queries at positions >= min_query_position; values [heads]."""
    if probabilities.dim() != 3 or probabilities.size(1) != probabilities.size(2):
        raise ValueError(f"expected attention probabilities [heads, s, s], got shape {tuple(probabilities.shape)}")
    length = probabilities.size(1)
    if not 0 <= min_query_position < length:
        raise ValueError(f"min_query_position {min_query_position} must lie in 0..{length - 1}")
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    if bool((probabilities[:, future].abs() > 1e-6).any()):
        raise ValueError("the attention pattern puts mass on future keys: a causal pattern is zero above the diagonal")
    if not torch.allclose(probabilities.sum(-1), torch.ones(()).to(probabilities), atol=1e-4):
        raise ValueError("attention rows must each sum to 1 (probabilities after softmax)")
    accumulator = DistanceAccumulator(1, probabilities.size(0), thresholds)
    positions = torch.arange(length)
    accumulator.add_probabilities(
        0, slice(None), probabilities[:, min_query_position:], positions[min_query_position:], positions
    )
    means = accumulator.means()
    return {
        "mean_distance": means["mean_distance"][0],
        "first_token_mass": means["first_token_mass"][0],
        "share_beyond": {t: share[0] for t, share in means["share_beyond"].items()},
    }


def correlations(bases: Sequence[float], distances: Sequence[float]) -> dict[str, float | None]:
    """Pearson (on log10 base) and Spearman correlation between base and mean distance; None
    when either side is constant (a single-base model) or fewer than 3 points are finite."""
    x = np.log10(np.asarray(bases, dtype=np.float64))
    y = np.asarray(distances, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    result: dict[str, float | None] = {"points": int(keep.sum()), "pearson_log_base": None, "spearman": None}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    result["pearson_log_base"] = float(np.corrcoef(x, y)[0, 1])
    result["spearman"] = float(np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1])
    return result


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse = np.unique(values, return_inverse=True)
    return np.bincount(inverse, weights=ranks)[inverse] / np.bincount(inverse)[inverse]


# ---------------------------------------------------------------- capture from a running model


class _DecoderDone(Exception):
    """Raised after the last transformer layer: the analysis needs no vocabulary logits."""


def _softmax_scale(core_attention: torch.nn.Module) -> float:
    config = core_attention.config
    return getattr(core_attention, "softmax_scale", None) or config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)


@contextlib.contextmanager
def megatron_capture(
    model: torch.nn.Module,
    accumulator: DistanceAccumulator,
    min_query_position: int,
    max_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[None]:
    """Within the block, a forward of the megatron GPTModel `model` (TP allowed, CP=1) adds every
    layer's attention statistics to `accumulator` and stops with `_DecoderDone` after the decoder."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    handles = []
    for layer_index, layer in enumerate(model.decoder.layers):
        core_attention = layer.self_attention.core_attention

        def record(module, args, kwargs, layer_index=layer_index, scale=_softmax_scale(core_attention)) -> None:
            query = args[0] if args else kwargs["query"]  # [s, b, local heads, d], after RoPE
            key = args[1] if len(args) > 1 else kwargs["key"]
            positions = torch.arange(query.size(0), device=query.device)
            selected = positions >= min_query_position
            for sample in range(query.size(1)):
                accumulator.add_query_key(
                    layer_index,
                    query[selected, sample].transpose(0, 1),
                    key[:, sample].transpose(0, 1),
                    scale,
                    positions[selected],
                    head_offset=tp_rank * query.size(2),
                    max_elements=max_elements,
                )

        handles.append(core_attention.register_forward_pre_hook(record, with_kwargs=True))

    def stop(module, args, output) -> None:
        raise _DecoderDone

    handles.append(model.decoder.register_forward_hook(stop))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_active_hf_recorder: dict[str, Any] = {}


def _recording_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function registered with transformers: records, then runs the model's own."""
    recorder = _active_hf_recorder.get("current")
    if recorder is None:
        raise RuntimeError(f"attention implementation {HF_ATTENTION_NAME!r} is only usable inside hf_capture()")
    for option in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(option) is not None:
            raise ValueError(
                f"this model's attention uses {option}: the head analysis measures plain causal softmax attention only"
            )
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    positions = torch.arange(query.size(2), device=query.device)
    selected = positions >= recorder["min_query_position"]
    for sample in range(query.size(0)):  # query [b, heads, s, d], key [b, k/v heads, s, d]
        recorder["accumulator"].add_query_key(
            module.layer_idx,
            query[sample][:, selected],
            key[sample],
            scale,
            positions[selected],
            max_elements=recorder["max_elements"],
        )
    return recorder["delegate"](module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@contextlib.contextmanager
def hf_capture(
    model: torch.nn.Module,
    accumulator: DistanceAccumulator,
    min_query_position: int,
    max_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[None]:
    """Within the block, forwards of the transformers model `model` add every layer's attention
    statistics to `accumulator`; attention itself still runs the model's configured kernel."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = model.config._attn_implementation
    if original not in ("eager", "sdpa"):
        raise ValueError(
            f"the head analysis wraps eager or sdpa attention, this model uses {original!r}: "
            "load it with attn_implementation='sdpa'"
        )

    def delegate(module: torch.nn.Module):
        if original == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sys.modules[type(module).__module__].eager_attention_forward

    AttentionInterface.register(HF_ATTENTION_NAME, _recording_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _active_hf_recorder["current"] = dict(
        accumulator=accumulator, min_query_position=min_query_position, max_elements=max_elements, delegate=delegate
    )
    model.set_attn_implementation(HF_ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(original)
        _active_hf_recorder.pop("current", None)


# ---------------------------------------------------------------- the analysis of a backend


@dataclasses.dataclass
class HeadAnalysis:
    """Per (layer, head) statistics of one model over some documents; tensors are [layers, heads]."""

    model: str
    position: str
    bases: list[float]
    thresholds: tuple[int, ...]
    length: int
    documents: int
    min_query_position: int
    mean_distance: torch.Tensor
    first_token_mass: torch.Tensor
    share_beyond: dict[int, torch.Tensor]

    def correlation(self) -> dict[str, float | None]:
        layers = self.mean_distance.size(0)
        return correlations(self.bases * layers, self.mean_distance.flatten().tolist())

    def by_base(self) -> list[dict[str, float]]:
        """One row per distinct base: the statistics averaged over its heads in every layer."""
        bases = torch.tensor(self.bases, dtype=torch.float64)
        rows = []
        for base in sorted(set(self.bases)):
            heads = bases == base
            row = {"base": base, "heads": int(heads.sum()), "mean_distance": float(self.mean_distance[:, heads].mean())}
            row.update({f"share_beyond_{t}": float(share[:, heads].mean()) for t, share in self.share_beyond.items()})
            row["first_token_mass"] = float(self.first_token_mass[:, heads].mean())
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        layers, heads = self.mean_distance.shape
        cells = [
            {
                "layer": layer,
                "head": head,
                "base": self.bases[head],
                "mean_distance": float(self.mean_distance[layer, head]),
                "share_beyond": {str(t): float(share[layer, head]) for t, share in self.share_beyond.items()},
                "first_token_mass": float(self.first_token_mass[layer, head]),
            }
            for layer in range(layers)
            for head in range(heads)
        ]
        return {
            "model": self.model,
            "position": self.position,
            "length": self.length,
            "documents": self.documents,
            "min_query_position": self.min_query_position,
            "queries_per_head": self.documents * (self.length - self.min_query_position),
            "thresholds": list(self.thresholds),
            "layers": layers,
            "heads": heads,
            "bases": self.bases,
            "correlation": self.correlation(),
            "by_base": self.by_base(),
            "cells": cells,
        }


def _megatron_description(backend: Any) -> tuple[int, int, list[float], str]:
    config = backend.config
    return (
        config.model.num_layers,
        config.model.num_attention_heads,
        [float(b) for b in config.position.query_head_bases(config.model)],
        config.position.type,
    )


def _hf_description(backend: Any) -> tuple[int, int, list[float], str]:
    config = backend.model.config
    heads = config.num_attention_heads
    if getattr(config, "rope_bases", None):
        return config.num_hidden_layers, heads, [float(b) for b in config.rope_bases], "harpe"
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(
            f"{backend.name}: its config has no rope_bases, rope_parameters.rope_theta or rope_theta; "
            "the head analysis needs a rotary model"
        )
    return config.num_hidden_layers, heads, [float(theta)] * heads, str(parameters.get("rope_type", "default"))


def check_request(length: int, min_query_position: int | None, thresholds: Sequence[int]) -> int:
    """Validate the analysis options; returns the first query position that counts."""
    if length < 2:
        raise ValueError(f"--length {length} is too short: attention distances need at least 2 tokens")
    min_query_position = length // 2 if min_query_position is None else min_query_position
    if not 0 <= min_query_position < length:
        raise ValueError(
            f"--min-query-position {min_query_position} must lie in 0..{length - 1} (the length is {length})"
        )
    if any(t < 0 for t in thresholds):
        raise ValueError(f"--thresholds {list(thresholds)} must be non-negative distances in tokens")
    return min_query_position


def analyze_heads(
    backend: Any,
    documents: Sequence[Sequence[int]],
    length: int,
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
    min_query_position: int | None = None,
    max_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = False,
) -> HeadAnalysis:
    """Measure every head of a `MegatronBackend` or `HFBackend` on the first `length` tokens of
    each document. Queries at positions >= min_query_position (default length // 2) count."""
    from tqdm import tqdm

    from megatron_harpe.eval.backends.hf import HFBackend

    min_query_position = check_request(length, min_query_position, thresholds)
    short = [len(ids) for ids in documents if len(ids) < length]
    if not documents or short:
        raise ValueError(
            f"every document needs at least {length} tokens ({len(short)} of {len(documents)} are "
            "shorter): pass longer documents or a smaller --length"
        )
    is_hf = isinstance(backend, HFBackend)
    if is_hf:
        num_layers, num_heads, bases, position = _hf_description(backend)
    elif hasattr(backend, "config") and hasattr(backend.model, "decoder"):
        if backend.cp_size != 1:
            raise ValueError(
                "the head analysis runs with --context-parallel 1 (each CP rank would see only part "
                "of the keys); split a large model with --tensor-parallel instead"
            )
        num_layers, num_heads, bases, position = _megatron_description(backend)
    else:
        raise ValueError(
            f"{backend.name} is not a model: the head analysis needs a megatron_harpe checkpoint or "
            "a Hugging Face model directory"
        )
    accumulator = DistanceAccumulator(num_layers, num_heads, thresholds)
    capture = hf_capture if is_hf else megatron_capture
    with torch.no_grad(), capture(backend.model, accumulator, min_query_position, max_elements):
        for ids in tqdm(documents, desc="documents", disable=not progress, leave=False):
            tokens = torch.tensor([list(ids[:length])], dtype=torch.long, device=backend.device)
            if is_hf:
                backend.model.get_decoder()(input_ids=tokens, use_cache=False)
            else:
                with contextlib.suppress(_DecoderDone):
                    backend.model(tokens, torch.arange(length, device=backend.device)[None], None)
    if not is_hf and backend.model.config.tensor_model_parallel_size > 1:
        from megatron.core import parallel_state

        accumulator.all_reduce(parallel_state.get_tensor_model_parallel_group())
    means = accumulator.means()
    return HeadAnalysis(
        model=backend.name,
        position=position,
        bases=bases,
        thresholds=accumulator.thresholds,
        length=length,
        documents=len(documents),
        min_query_position=min_query_position,
        mean_distance=means["mean_distance"],
        first_token_mass=means["first_token_mass"],
        share_beyond=means["share_beyond"],
    )
