"""AdamW construction: decay/no-decay groups, hyper-parameters, validation.

Run: pytest tests/unit/test_optimizer.py
"""

from __future__ import annotations

import pytest
import torch

from megatron_harpe.training.optimizer import build_optimizer, split_parameter_groups


class TinyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(11, 8)
        self.norm = torch.nn.RMSNorm(8)
        self.proj = torch.nn.Linear(8, 8, bias=True)
        self.out = torch.nn.Linear(8, 11, bias=False)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(self.norm(self.embedding(tokens))))


def _names_by_group(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in optimizer.param_groups}


def test_matrices_decay_norms_and_biases_do_not() -> None:
    model = TinyBlock()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    groups = _names_by_group(model, optimizer)
    assert groups == {
        "decay": {"embedding.weight", "proj.weight", "out.weight"},
        "no_decay": {"norm.weight", "proj.bias"},
    }
    decay_of = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay_of == {"decay": 0.1, "no_decay": 0.0}
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.AdamW)


def test_norm_weight_is_not_decayed_by_a_step() -> None:
    model = TinyBlock()
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
    optimizer = build_optimizer(model, lr=0.5, weight_decay=0.5)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # zero gradients: only weight decay can move weights
    weight_before = model.proj.weight.detach().clone()
    optimizer.step()
    assert torch.equal(model.norm.weight, torch.ones(8))
    assert torch.allclose(model.proj.weight, weight_before * (1 - 0.5 * 0.5))


def test_tied_weight_appears_once() -> None:
    model = TinyBlock()
    model.out.weight = model.embedding.weight
    decay, no_decay = split_parameter_groups(model)
    params = [p for _, p in decay + no_decay]
    assert len(params) == len({id(p) for p in params}) == 4


def test_fused_kernel_chosen_on_cpu_and_training_reduces_loss() -> None:
    torch.manual_seed(0)
    model = TinyBlock()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.01)
    assert all(g["fused"] for g in optimizer.param_groups)
    tokens = torch.randint(0, 11, (4, 6))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "train.lr"),
        (dict(weight_decay=-0.1), "train.weight_decay"),
        (dict(betas=(0.9, 1.0)), "train.adam_beta2"),
        (dict(eps=0.0), "train.adam_eps"),
    ],
)
def test_bad_hyperparameters_name_the_key(kwargs: dict, message: str) -> None:
    settings = dict(lr=1e-3, weight_decay=0.1) | kwargs
    with pytest.raises(ValueError, match=message):
        build_optimizer(TinyBlock(), **settings)


def test_frozen_model_is_refused() -> None:
    model = TinyBlock().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3, weight_decay=0.1)
