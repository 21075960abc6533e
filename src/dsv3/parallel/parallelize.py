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
from torch.distributed.tensor.placement_types import _StridedShard

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
    if layout.dp > 1 or layout.tp > 1:  # (with TP alone too: the optimizer's fused step takes DTensors or
        apply_fsdp(model, par)          # plain tensors, not both; FSDP over one rank makes them all DTensors)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> float:
    """torch.nn.utils.clip_grad_norm_, for gradients on one process or spread over ranks (DTensors: dense ones
    sharded over "dp", experts over ("dp_mod_ep", "ep"), TP ones over "tp"; under pipeline parallelism each
    rank holding some stages, summed over `pp_group`). Every rank gets the same norm. -> it, before clipping.

    Squares are summed in float64: torch sums a float32 gradient's squares in float32, whose error (1e-5
    relative on a 2048 x 256 embedding) depends on how the gradient is split, and clipping passes it on to
    every weight; runs over different layouts then drift apart (a routing decision flips) where they need not.
    Each gradient's local part counts once per mesh dimension it is sharded over, not per replica."""
    parameters = [p for p in parameters if p.grad is not None]
    sums: dict = {}  # (mesh, its dimensions the gradient is sharded over) -> sum of squares of the local parts
    for p in parameters:
        g = p.grad
        mesh = getattr(g, "device_mesh", None)
        sharded = () if mesh is None else tuple(i for i, pl in enumerate(g.placements) if _is_shard(pl))
        local = g.to_local() if mesh is not None else g
        sq = torch.linalg.vector_norm(local, dtype=torch.float64).square()
        sums[(mesh, sharded)] = sums.get((mesh, sharded), 0) + sq
    total_sq = torch.zeros((), dtype=torch.float64, device=parameters[0].grad.device if parameters else "cpu")
    for (mesh, sharded), sq in sums.items():
        for dim in sharded:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq += sq
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = math.sqrt(total_sq.item())
    coef = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grads_with_norm_
    if coef < 1:
        for p in parameters:
            p.grad.mul_(coef)
    return total


def _is_shard(placement) -> bool:
    """Shard, or the _StridedShard FSDP2 gives a parameter already sharded on another dimension (experts)."""
    return placement.is_shard() or isinstance(placement, _StridedShard)


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


