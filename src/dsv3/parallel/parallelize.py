"""The parallel layers applied to a model, in one fixed order, and what a training step needs of them.

    par = mesh.start(Layout(ep=2))      # under torchrun
    parallelize(model, par)            # in place; the model's code is unchanged
    ... loss.backward() ...
    grad_norm = clip_grad_norm_(model.parameters(), 1.0)
    loads = sum_over_dp(loads, par)    # the balancing-bias update sees every rank's tokens

Order matters and is fixed:
1. tensor parallelism (parallelize_module on MLA heads and dense MLPs): parameters become DTensors on "tp";
2. expert parallelism: routed experts become DTensors Shard(0) on "ep", their MoE layers dispatch by
   all-to-all;
3. FSDP2 last, over "dp" (experts over "dp_mod_ep"): it shards what the layers above left, each parameter
   along the mesh dimensions it does not already use.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..model.model import DeepSeekV3
from .expert_parallel import apply_ep
from .fsdp import apply_fsdp
from .mesh import Parallel
from .pipeline import StageModel


def parallelize(model: DeepSeekV3 | StageModel, par: Parallel) -> None:
    """Apply the run's layout to `model` (built identically on every rank, on its device), or under pipeline
    parallelism to this rank's stages (pipeline.py cuts them first)."""
    layout = par.layout
    if layout.tp > 1:
        from .tensor_parallel import apply_tp
        apply_tp(model, par.tp_mesh)
    if layout.ep > 1:
        apply_ep(model, par.ep_mesh)
    if layout.dp > 1:
        apply_fsdp(model, par)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, counted=None, pp_group=None) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters spread over several meshes (dense ones over "dp", experts
    over ("dp_mod_ep", "ep"), TP ones with "tp"): each mesh's gradients give one norm (a DTensor, reduced over
    its ranks), the total is their root sum of squares; every rank gets the same. Under pipeline parallelism
    each rank holds some stages: `counted` are the parameters whose gradients it counts (a tied copy left
    out), and the squares are summed over `pp_group`. -> the total norm before clipping."""
    parameters = list(parameters)
    counted = parameters if counted is None else list(counted)
    groups: dict = {}  # mesh (None: plain tensors) -> its parameters
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    kept = {id(p) for p in counted}
    total_sq = torch.zeros((), dtype=torch.float64)
    for mesh, params in groups.items():
        grads = [p.grad for p in params if id(p) in kept]
        if not grads:
            continue
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if mesh is not None:
            norm = norm.full_tensor()
        total_sq += norm.double().cpu() ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = math.sqrt(total_sq.item())
    for params in groups.values():  # DTensor ops take one mesh at a time
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total))
    return total


def sum_over_dp(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    """t summed over the data-parallel ranks (a copy)."""
    t = t.clone()
    dist.all_reduce(t, group=par.dp_mesh.get_group())
    return t


def mean_over_dp(values: dict, par: Parallel) -> dict:
    """A step's logged numbers averaged over the data-parallel ranks (each saw its own micro-batches)."""
    keys = [k for k, v in values.items() if isinstance(v, float)]
    if not keys:
        return values
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=par.dp_mesh.get_group())
    return {**values, **{k: v / par.layout.dp for k, v in zip(keys, t.tolist())}}


