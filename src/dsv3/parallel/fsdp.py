"""FSDP2 (`fully_shard`) for DeepSeek-V3: every parameter sharded over the data-parallel ranks, gathered one
block at a time for its forward and backward, its gradient reduce-scattered back (ZeRO-3). Under pipeline
parallelism a stage's parameters stay gathered from its first forward to the end of the step.

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

from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..model.model import DeepSeekV3
from .expert_parallel import is_expert_parallel
from .mesh import Parallel
from .pipeline import StageModel, blocks_of

# The experts' output is a view (model/moe.py's _ContiguousGrad); FSDP warns that an in-place op on it would
# skip its backward hook. The dispatcher only reads it (index_select, all-to-all, index_add).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Experts\) returned a view tensor")


def apply_fsdp(model: DeepSeekV3 | StageModel, par: Parallel, param_dtype=None, reduce_dtype=None) -> None:
    """Shard `model` over par's data-parallel ranks (in place). param_dtype/reduce_dtype: FSDP's mixed
    precision (None: as the parameters; the trainer's bf16 runs autocast instead)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dp = par.layout.dp
    pipelined = not isinstance(model, DeepSeekV3)
    # Under pipeline parallelism a stage runs forward once per micro-batch: parameters stay gathered from the
    # first forward to the end of the step (the schedule reshards them; torchtitan does the same), instead
    # of an all-gather per micro-batch; gradients are reduce-scattered once, after the last backward.
    opts = dict(mesh=par.dp_mesh, mp_policy=mp, reshard_after_forward=not pipelined)
    for block in blocks_of(model):
        if block.is_moe and is_expert_parallel(block.ffn):
            experts = fully_shard(block.ffn.experts, **dict(opts, mesh=par.dp_mod_ep_mesh))
            experts.set_gradient_divide_factor(dp)
        fully_shard(block, **opts)
    if not pipelined:
        fully_shard(model, **opts)
        # the training forward is forward_with_mtp, not forward: the root gathers its parameters for it too
        register_fsdp_forward_method(model, "forward_with_mtp")
        return
    # a pipeline rank's stages (parallel/pipeline.py): each stage is a root of its own (the schedule calls
    # its forward), holding what is not in a block: embedding, final norm, head, MTP projections and norms
    for stage in model.stages:
        fully_shard(stage, **opts)
        register_fsdp_forward_method(stage, "evaluate")  # evaluation's pass, outside the schedule
