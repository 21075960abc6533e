"""FSDP2 (`fully_shard`) for DeepSeek-V3: every parameter sharded over the data-parallel ranks, gathered one
block at a time for its forward and backward, its gradient reduce-scattered back (ZeRO-3).

Units, innermost first (each `fully_shard` call takes the parameters not already in a unit below it):
- the routed experts of each MoE layer, when expert parallelism holds them: sharded over "dp_mod_ep" only
  (the ep ranks already hold different experts); their gradients are divided by the whole dp degree, as
  every data-parallel rank's tokens reached them;
- each transformer block, main and MTP (the MTP module's own projections and norms stay with the root:
  the trainer calls them outside the block);
- the root: embedding, final norm, head, MTP projections and norms.

The balancing biases are buffers, not parameters: FSDP leaves them whole on every rank.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..model.model import DeepSeekV3
from .expert_parallel import is_expert_parallel
from .mesh import Parallel


def apply_fsdp(model: DeepSeekV3, par: Parallel, param_dtype=None, reduce_dtype=None) -> None:
    """Shard `model` over par's data-parallel ranks (in place). param_dtype/reduce_dtype: FSDP's mixed
    precision (None: as the parameters; the trainer's bf16 runs autocast instead)."""
    # The experts' output is a view (model/moe.py's _ContiguousGrad); FSDP warns that an in-place op on it
    # would skip its backward hook. The dispatcher only reads it (index_select, all-to-all, index_add).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Experts\) returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dp = par.layout.dp
    layers = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    mtp = list(model.mtp.values() if isinstance(model.mtp, nn.ModuleDict) else model.mtp) if hasattr(model, "mtp") else []
    for block in [*layers, *(m.block for m in mtp)]:
        if block.is_moe and is_expert_parallel(block.ffn):
            experts = fully_shard(block.ffn.experts, mesh=par.dp_mod_ep_mesh, mp_policy=mp)
            experts.set_gradient_divide_factor(dp)
        fully_shard(block, mesh=par.dp_mesh, mp_policy=mp)
    if isinstance(model, DeepSeekV3):
        fully_shard(model, mesh=par.dp_mesh, mp_policy=mp)
        # the training forward is forward_with_mtp, not forward: the root gathers its parameters for it too
        register_fsdp_forward_method(model, "forward_with_mtp")
        return
    # a pipeline rank's stages (parallel/pipeline.py): no root forward runs, so each module the stages call
    # directly is a unit of its own: the embedding, the final norm and head, each MTP module and its norm
    for m in mtp:
        fully_shard(m.norm, mesh=par.dp_mesh, mp_policy=mp)
        fully_shard(m, mesh=par.dp_mesh, mp_policy=mp)
    for name in ("embed", "norm", "head"):
        if hasattr(model, name):
            fully_shard(getattr(model, name), mesh=par.dp_mesh, mp_policy=mp)
