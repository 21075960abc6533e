"""Tensor parallelism (Megatron-style, on DTensor): MLA's heads and the dense MLP's hidden units split over
the processes of a 1-D mesh, applied from outside the model with `parallelize_module`.

The plan, per transformer block (the main model's and the MTP modules'):

    attn.wq_b (or attn.wq)   colwise: each process computes H/tp query heads
    attn.wkv_b               colwise: keys and values of the same H/tp heads from the (replicated) latent
    attn.wo                  rowwise: each process multiplies its heads' outputs; the partial sums are added
    attn.wkv_a               replicated, and the gradient of its rotary-key columns summed (see below)
    ffn (a dense MLP)        w1, w3 colwise, w2 rowwise: each process holds I/tp hidden units
    ffn.shared_experts       the same as the dense MLP
    everything else          replicated: wq_a, wkv_a, the norms, the gate, eh_proj, the embedding and the head

Collectives, for every block, all on the tp mesh:
- forward: one all-reduce after wo and one after w2 (the partial (B, T, D) sums become the output, identical
  on every process). Nothing else moves: the inputs of wq_b, wkv_b, w1 and w3 are already on every process.
- backward, their mirror: the gradient of each replicated activation that enters the split part is a sum
  over heads (or hidden units), so it is all-reduced where it enters. The MLP's input: one all-reduce
  (PrepareModuleInput makes it one DTensor that w1 and w3 share). MLA has three entries: the query latent
  (wq_b's input, or the block input for wq), the kv latent (wkv_b's input) and the rotary key k_R, which
  every head uses: three all-reduces of (q_lora + kv_lora + rope) = 2,112 columns in V3, fewer bytes than
  one of the hidden size (7,168). wo's and w2's inputs are already split: their gradients stay local.
So each replicated parameter gets the full gradient on every process, with no gradient all-reduce of its
own, and each split parameter the gradient of its own slice.

Embedding and head are replicated: every process computes the full logits and the same loss. (A
vocabulary-parallel head with loss parallelism would save their memory and compute; a possible later step.)
The routed experts and the gate are left as they are: expert parallelism places the experts
(expert_parallel.py).

Requirements, checked by `apply_tp`: num_attention_heads, intermediate_size (if a dense layer exists) and the
shared experts' width divisible by tp; Linear layers with plain (not FP8) weights. The model must hold the same
weights on every process (the same seed or checkpoint): the split weights are scattered from rank 0, the
replicated ones are left as they are. Apply it before FSDP2 (which then shards over the data-parallel dim of
a 2-D mesh). This is for training and scoring: `pack_projections` and the inference engine's kernels expect
whole, local weights.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel
from torch.distributed.tensor.parallel import parallelize_module

from ..config import ModelConfig
from ..model.layers import Linear, MLP
from ..model.model import Block, DeepSeekV3
from .pipeline import blocks_of


class _LinearStyle:
    """Lets torch's Colwise/RowwiseParallel take dsv3's Linear. Torch's styles choose their partition by type
    (nn.Linear or nn.Embedding) and refuse other modules; ours computes the same F.linear(x, W, b) with the
    same (out, in) weight, so nn.Linear's partition and hooks (torch's own methods, reused by name: a torch
    that renames them fails tests/test_tensor_parallel.py) apply unchanged. Making dsv3's Linear a subclass
    of nn.Linear instead would change the model for the sake of one parallel layer."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(self, RowwiseParallel):
            self.desired_input_layouts = (Shard(-1),)  # as torch's _apply sets it for nn.Linear
        return distribute_module(
            module, device_mesh, self._partition_linear_fn,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class Colwise(_LinearStyle, ColwiseParallel):
    """Weight split by output rows: Replicate input -> output split on the last dim (local tensor)."""


class Rowwise(_LinearStyle, RowwiseParallel):
    """Weight split by input columns: input split on the last dim -> partial sums, all-reduced."""


def sum_grad(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity in forward; in backward, the gradient summed over the mesh (Megatron's `f`). For a replicated
    activation that the split part of the model consumes outside any colwise layer."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


class RotaryKeyGradSum(ParallelStyle):
    """For MLA's wkv_a, replicated: its last `rope_dim` columns are the rotary key k_R, which every local head
    uses directly (no colwise layer in between), so its gradient on each process covers only the local heads.
    A forward hook passes those columns through `sum_grad`."""

    def __init__(self, rope_dim: int):
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module, _inputs, out):
            kv, k_rope = out.split([out.shape[-1] - self.rope_dim, self.rope_dim], dim=-1)
            return torch.cat([kv, sum_grad(k_rope, device_mesh)], dim=-1)

        module.register_forward_hook(hook)
        return module


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the sizes that do not split over tp processes."""
    sizes = {"num_attention_heads": config.num_attention_heads}
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers)):
        sizes["intermediate_size"] = config.intermediate_size
    if config.n_routed_experts and config.n_shared_experts:
        sizes["moe_intermediate_size * n_shared_experts"] = config.moe_intermediate_size * config.n_shared_experts
    bad = [f"{name}={n}" for name, n in sizes.items() if n % tp]
    if bad:
        raise ValueError(f"tensor parallelism over {tp} processes needs {', '.join(bad)} divisible by {tp}")


def block_plan(block: Block) -> dict[str, ParallelStyle]:
    """The TP plan of one transformer block, by submodule name."""
    attn = block.attn
    plan: dict[str, ParallelStyle] = {
        "attn.wq" if attn.q_lora_rank is None else "attn.wq_b": Colwise(),
        "attn.wkv_a": RotaryKeyGradSum(attn.rope_dim),
        "attn.wkv_b": Colwise(),
        "attn.wo": Rowwise(),
    }
    mlp = block.ffn.shared_experts if block.is_moe else block.ffn
    if mlp is not None:
        prefix = "ffn.shared_experts" if block.is_moe else "ffn"
        assert isinstance(mlp, MLP), f"{prefix} is a {type(mlp).__name__}, expected an MLP"
        plan.update({
            # the input as one Replicate DTensor shared by w1 and w3: one all-reduce of its gradient, not two
            prefix: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            f"{prefix}.w1": Colwise(),
            f"{prefix}.w3": Colwise(),
            f"{prefix}.w2": Rowwise(),
        })
    return plan


def apply_tp(model: DeepSeekV3, tp_mesh: DeviceMesh) -> None:
    """Split MLA's heads and the dense MLPs' (and shared experts') hidden units over `tp_mesh` (1-D), in place,
    in every block of the main model and of the MTP modules. See the module docstring for the plan."""
    tp = tp_mesh.size()
    check_tp(model.config, tp)
    blocks = blocks_of(model)  # a whole model's, or under pipeline parallelism this rank's stages'
    for block in blocks:
        plan = block_plan(block)
        for name, style in plan.items():
            module = block.get_submodule(name)
            if isinstance(style, (Colwise, Rowwise)) and (type(module) is not Linear or module.is_fp8):
                what = "Linear with FP8 weights" if type(module) is Linear else type(module).__name__
                raise ValueError(f"tensor parallelism needs plain Linear layers: block {block.layer_id}'s {name} "
                                 f"is a {what}")
    for block in blocks:
        parallelize_module(block, tp_mesh, block_plan(block))
        if block.is_moe and block.ffn.shared_experts is not None:
            # the MoE adds the routed outputs into the shared experts' output in place (index_add_); autograd
            # forbids that on the view that w2's to_local returns, so the MoE gets a copy of it
            block.ffn.shared_experts.register_forward_hook(lambda _module, _inputs, out: out.clone())
