"""AdamW with its states sharded over the DP x CP ranks (ZeRO stage 1), on any device.

    optimizer = ShardedAdamW(model, ctx.dp_cp_group, lr=2e-5, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

Each parameter's moments live on one rank of the group (its owner; parameters are dealt to the
least-loaded rank, largest first, the same on every rank). After the gradients are reduced,
every rank updates the parameters it owns and broadcasts them to the others. Llama2-7B at TP4:
12.6 GiB of fp32 moments per GPU unsharded, 1.6 GiB over DP x CP = 8.

Why this and not megatron-core's `DistributedDataParallel` + `DistributedOptimizer`: those
allocate their buffers on CUDA unconditionally, so they would run for the first time on a
user's cluster. This class is plain torch.distributed through `megatron_harpe.collectives`
(NCCL on GPU, gloo on CPU), so the parity tests (tests/distributed/test_training.py) run the
same code a GPU run does. What it costs against megatron's: gradients are all-reduced, not
reduce-scattered, and the updated weights broadcast from each owner rather than all-gathered
(the same bytes received, up to twice the bytes sent), and the broadcast is not overlapped
with the next forward.

Checkpoints: `sharded_state(model_sharded_state, placeholders)` describes the owned moments as
the same global tensors the replicated AdamW saves (`optimizer.state.exp_avg.<param>`), written
by their owner only, so a checkpoint saved sharded loads replicated and the other way round,
under any DP x CP size (dist_checkpointing reshards).

bf16 parameters (`fp32_main_weights=True`, training/mixed_precision.py): each owner keeps an
fp32 main weight per owned parameter, whose `.grad` is the parameter's fp32 `main_grad`; the
step updates the main weights, copies them into the bf16 parameters and broadcasts those (bf16:
half the bytes). `shard=False` owns everything on every rank (the replicated optimizer of this
mode). The checkpoint's model tensors then hold the fp32 main weights, each written by its
owner (`weights_for_checkpoint`), so an fp32 run and a bf16-params run load each other's
checkpoints and an export loses nothing.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_harpe import collectives
from megatron_harpe.training.grads import DEFAULT_BUCKET_NUMEL, _buckets
from megatron_harpe.training.optimizer import _kernel_options, build_optimizer

MOMENTS = ("exp_avg", "exp_avg_sq")


def partition(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first to the least-loaded rank (ties: lowest rank)."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(ranks), key=lambda r: (load[r], r))
        owners[index] = owner
        load[owner] += sizes[index]
    return owners


class ShardedAdamW:
    """The parts of the torch.optim.Optimizer interface the trainer, the learning-rate schedule
    and the checkpoint use. `param_groups` holds every parameter (the schedule sets lr there);
    the inner AdamW only the owned ones."""

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup | None, *, shard: bool = True,
                 fp32_main_weights: bool = False, **adamw) -> None:  # fmt: skip
        full = build_optimizer(model, **adamw)  # validates; holds no state until a step
        self.param_groups = full.param_groups
        self.defaults = full.defaults
        self.group = group
        self.ranks = dist.get_world_size(group) if dist.is_initialized() and shard else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() and shard else 0
        self.params = [param for group_ in self.param_groups for param in group_["params"]]
        self.owners = partition([param.numel() for param in self.params], self.ranks)
        local_groups = [
            {**{k: v for k, v in group_.items() if k != "params"},
             "params": [p for p in group_["params"] if self.owners[self._index(p)] == self.rank]}
            for group_ in self.param_groups
        ]  # fmt: skip
        self.main: dict[int, torch.nn.Parameter] = {}
        """id of an owned parameter -> its fp32 main weight (bf16 parameters only)."""
        if fp32_main_weights:
            for group_ in local_groups:
                group_["params"] = [self._make_main(param) for param in group_["params"]]
        owned = [p for group_ in local_groups for p in group_["params"]]
        hyper = {k: v for k, v in full.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
        self.local = torch.optim.AdamW(local_groups, **hyper, **_kernel_options(owned or self.params))
        self.fp32_main_weights = fp32_main_weights

    def _make_main(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        if not hasattr(param, "main_grad"):
            raise RuntimeError("fp32_main_weights needs the model's fp32 main_grad buffers: call "
                               "mixed_precision.attach_main_grads(model) before building the optimizer")  # fmt: skip
        main = torch.nn.Parameter(param.detach().to(torch.float32, copy=True))
        main.grad = param.main_grad  # the same tensor: reduced and clipped in place before the step
        self.main[id(param)] = main
        return main

    def _optimized(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        """The tensor AdamW updates for `param`: its fp32 main weight, else the parameter itself."""
        return self.main.get(id(param), param)

    def _index(self, param: torch.nn.Parameter) -> int:
        if not hasattr(self, "_indices"):
            self._indices = {id(p): i for i, p in enumerate(self.params)}
        return self._indices[id(param)]

    @property
    def state(self):
        return self.local.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Under bf16 parameters the fp32 main gradients are zeroed in place (they are buffers)."""
        for param in self.params:
            if self.fp32_main_weights:
                param.main_grad.zero_()
                param.grad = None
            elif set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned parameters (gradients already reduced), then send them to all."""
        for full, local in zip(self.param_groups, self.local.param_groups):
            local.update({k: v for k, v in full.items() if k != "params"})
        self.local.step()
        for param in self.params:
            if id(param) in self.main:
                param.copy_(self.main[id(param)])  # fp32 -> bf16, rounded to nearest
        if self.ranks > 1:
            self._broadcast_updated()

    def _broadcast_updated(self) -> None:
        for owner in range(self.ranks):
            source = dist.get_global_rank(self.group, owner)
            owned = [p for p, o in zip(self.params, self.owners) if o == owner]
            for bucket in _buckets(owned, DEFAULT_BUCKET_NUMEL):
                flat = _flatten_dense_tensors([p.data for p in bucket])
                collectives.broadcast(flat, src=source, group=self.group)
                if owner != self.rank:
                    for param, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                        param.data.copy_(value)

    # ------------------------------------------------------------------------------ checkpoints

    def sharded_state(self, model_sharded: dict, placeholders: dict | None) -> dict:
        """This rank's part of the optimizer checkpoint (see the module docstring); for loading,
        `placeholders` is the saved common part, whose moments get empty tensors to fill."""
        param_to_sharded = get_param_id_to_sharded_param_map(model_sharded, self.params)
        stepped = placeholders["tensor_state_keys"] if placeholders is not None else None
        tensor_state = {}
        for index, (param, owner) in enumerate(zip(self.params, self.owners)):
            if owner != self.rank:
                continue
            optimized = self._optimized(param)
            if placeholders is None:
                values = {key: self.local.state[optimized][key] for key in MOMENTS if key in self.local.state.get(optimized, {})}
            else:
                values = {key: torch.empty_like(optimized) for key in stepped.get(index, ())}
            for key, value in values.items():
                sharded = make_sharded_optimizer_tensor(param_to_sharded[index], value, prefix=f"optimizer.state.{key}")
                if self.ranks > 1:
                    sharded.replica_id = _owner_writes(sharded.replica_id)
                tensor_state.setdefault(index, {})[key] = sharded
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": LocalNonpersistentObject(list(range(len(group["params"]))))}
                  for group in self.param_groups]  # fmt: skip
        state = {"tensor_state": tensor_state, "param_groups": groups}
        if placeholders is None:  # what any loader needs before it asks for tensors: every rank steps every param
            step = next((s["step"] for s in self.local.state.values() if "step" in s), None)
            done = step is not None
            state["tensor_state_keys"] = {i: list(MOMENTS) for i in range(len(self.params))} if done else {}
            state["scalar_state"] = {i: {"step": step.detach().cpu().clone()} for i in range(len(self.params))} if done else {}
        return state

    def load_sharded(self, loaded: dict, common: dict) -> None:
        """Install the moments of the owned parameters and the saved hyperparameters."""
        if len(loaded["param_groups"]) != len(self.param_groups) or any(
            len(saved["params"]) != len(current["params"])
            for saved, current in zip(loaded["param_groups"], self.param_groups)
        ):
            raise ValueError("the optimizer's parameter groups differ from the checkpoint's: build it the same way as when saving")
        for saved, current in zip(loaded["param_groups"], self.param_groups):
            current.update({k: v for k, v in saved.items() if k != "params"})
        fused = bool(self.local.defaults.get("fused"))
        for index, moments in loaded["tensor_state"].items():
            param = self._optimized(self.params[index])
            step = torch.as_tensor(common["scalar_state"][index]["step"], dtype=torch.float32)
            self.local.state[param] = {
                "step": step.to(param.device) if fused else step,
                **{key: value.to(device=param.device, dtype=param.dtype) for key, value in moments.items()},
            }

    # ---------------------------------------------------------------- fp32 main weights in checkpoints

    def weights_for_checkpoint(self, model_sharded: dict, loading: bool) -> tuple[dict, dict[str, torch.nn.Parameter]]:
        """bf16 parameters: the model's checkpoint entries with the fp32 main weights in place of
        the bf16 parameters. Saving: each owner writes its main weights (other ranks leave the
        entry out). Loading: every rank reads fp32 values for all its parameters (empty
        tensors to fill). Also returns {entry key: parameter} of the replaced entries, for
        `load_main_weights`. Without fp32 main weights: `model_sharded` unchanged."""
        if not self.fp32_main_weights:
            return model_sharded, {}
        by_id = {id(param): param for param in self.params}
        replaced, entries = {}, {}
        for key, entry in model_sharded.items():
            param = by_id.get(id(getattr(entry, "data", None)))
            if param is None:  # _extra_state, frozen parameters
                replaced[key] = entry
                continue
            entries[key] = param
            if loading:
                value = torch.empty_like(param, dtype=torch.float32)
            elif id(param) in self.main:
                value = self.main[id(param)].detach()
            else:
                continue  # its owner writes it
            changes = {"data": value} | ({"dtype": torch.float32} if hasattr(entry, "dtype") else {})
            if not loading and self.ranks > 1:
                changes["replica_id"] = _owner_writes(entry.replica_id)
            replaced[key] = replace(entry, **changes)
        return replaced, entries

    @torch.no_grad()
    def load_main_weights(self, loaded_model: dict, entries: dict[str, torch.nn.Parameter]) -> None:
        """Set the owned fp32 main weights from the loaded fp32 values (the bf16 parameters are
        loaded by `model.load_state_dict`)."""
        for key, param in entries.items():
            if id(param) in self.main:
                self.main[id(param)].copy_(loaded_model[key])


def _owner_writes(replica_id):
    """megatron's replica ids of model tensors are (0, TP replica, DP x CP rank): only DP x CP
    rank 0 writes a weight. An optimizer moment exists on its owner only, which writes it
    whatever its DP x CP rank."""
    if isinstance(replica_id, int):
        return 0
    return (*replica_id[:-1], 0)
