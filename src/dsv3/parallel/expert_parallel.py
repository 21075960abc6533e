"""Expert parallelism (V3 report §3.2): each of the `ep` ranks of an EP group holds E/ep routed experts of
every MoE layer and reads its own data; the (token, expert) pairs travel to the rank holding their expert and
their outputs come back, by all-to-all.

    apply_ep(model, ep_mesh)     # experts split into DTensors Shard(0) over "ep"; all-to-all dispatchers

One MoE layer's forward on rank r (E experts, L = E/ep of them local, P = ep ranks):

    1. route: the gate picks K experts for each of r's N tokens; the pairs are sorted by expert (as on one
       process), so the rows bound for rank p are contiguous: experts p*L .. (p+1)*L-1
    2. counts: all-to-all of the (E,) counts: r learns how many rows each rank sends to each of its L experts
    3. tokens: all-to-all of the rows (and their gate weights), uneven splits; r receives them grouped by
       source rank, then by expert, and regroups them by expert, then by source
    4. r's experts run on their rows (one grouped GEMM each, as on one process)
    5. combine: the outputs go back in source order by the inverse all-to-all, and are added into their
       tokens' rows as on one process

Both all-to-alls carry autograd: in backward the gradients travel the other way. In FP8 training
(`--precision fp8`, experts in FP8: quant/training.py) the rows go out as V3 sends them (§3.3): e4m3 with one
power-of-two scale per 128 values, half the bytes of BF16; the experts quantise their input with the same
tiles and scales, so they compute exactly what they would from the unquantised rows. Combine and every
gradient travel in the activations' own precision. Every rank computes the
same thing as one process on its tokens; only the grouping of a GEMM's rows differs (tokens of several ranks
meet at one expert), so results equal one process's within float32 reordering.

The balancing bias stays on every rank (a buffer, identical everywhere: the trainer sums the expert loads
over the data-parallel ranks before each update). Routing is computed on every rank for its own tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch import nn

from ..model.moe import MoE, TokenDispatcher, moe_layers


class AllToAllDispatcher(TokenDispatcher):
    """A TokenDispatcher over the ranks of `group`, rank p holding experts p*L .. (p+1)*L-1."""

    def __init__(self, n_experts: int, topk: int, group: dist.ProcessGroup, fp8_recipe=None,
                 backward_group: dist.ProcessGroup | None = None):
        super().__init__(n_experts, topk)
        self.group = group
        # the backward's all-to-alls on a group of their own (the same ranks): DualPipeV's overlap runs one
        # micro-batch's backward beside another's forward, and each group then sees one stream of collectives
        self.backward_group = backward_group or group
        self.fp8_recipe = fp8_recipe  # rows dispatched in FP8 with this recipe's activation tiles (None: as they are)
        self.ep = dist.get_world_size(group)
        self.local = n_experts // self.ep

    def dispatch(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor):
        """-> (rows for this rank's experts grouped by expert, their gate weights, (L,) counts, handle)."""
        x_SD, weight_S, counts_E, token_S = super().dispatch(x_ND, weights_NK, experts_NK)
        P, L = self.ep, self.local
        recv_E = torch.empty_like(counts_E)  # [p * L + l]: rows rank p sends to my expert l
        dist.all_to_all_single(recv_E, counts_E, group=self.group)
        send_P, recv_PL = counts_E.view(P, L).sum(1), recv_E.view(P, L)
        send, recv = send_P.tolist(), recv_PL.sum(1).tolist()  # the split sizes, on the host
        if self.fp8_recipe is None:
            x_RD = _AllToAll.apply(x_SD, recv, send, self.group, self.backward_group)
        else:
            x_RD = _Fp8AllToAll.apply(x_SD, recv, send, self.group, self.backward_group, self.fp8_recipe)
        w_R = _AllToAll.apply(weight_S, recv, send, self.group, self.backward_group)
        order = _source_major_to_expert_major(recv_PL)
        return x_RD.index_select(0, order), w_R.index_select(0, order), recv_PL.sum(0), (token_S, order, send, recv)

    def combine(self, y_RD: torch.Tensor, handle, out_ND: torch.Tensor) -> torch.Tensor:
        token_S, order, send, recv = handle
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_SD = _AllToAll.apply(y_RD.index_select(0, inverse), send, recv, self.group,  # back in the order sent
                               self.backward_group)
        return super().combine(y_SD, token_S, out_ND)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Uneven all-to-all along dim 0."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0 over `group`; its backward, the all-to-all the other way, over
    `backward_group`."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, backward_group):
        ctx.splits, ctx.group = (out_splits, in_splits), backward_group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None, None


class _Fp8AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows quantised to e4m3 with 1x128 tile scales (the FP8 training recipe's), received
    dequantised; the gradient comes back unquantised (the identity's, straight through the quantiser: the
    experts quantise these rows to the same values anyway)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, backward_group, recipe):
        from ..quant import fp8
        from ..quant.training import ops
        o = ops(x)
        q, scale = o.act_quant(x.contiguous(), recipe.block, recipe.act_scale_fmt)
        q_out = q.new_empty((sum(out_splits), q.shape[1])).view(torch.uint8)
        s_out = scale.new_empty((sum(out_splits), scale.shape[1]))
        dist.all_to_all_single(q_out, q.view(torch.uint8), out_splits, in_splits, group=group)
        dist.all_to_all_single(s_out, scale.contiguous(), out_splits, in_splits, group=group)
        ctx.splits, ctx.group = (out_splits, in_splits), backward_group
        return fp8.act_dequant(q_out.view(fp8.FP8), s_out, x.dtype, recipe.block)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None, None, None


def _source_major_to_expert_major(counts_PL: torch.Tensor) -> torch.Tensor:
    """Rows arrive as blocks (source p, expert l) in p-major order, block (p, l) counts_PL[p, l] rows long;
    -> the permutation that lists them l-major (expert by expert, each expert's rows by source rank)."""
    flat = counts_PL.flatten()
    starts_PL = (flat.cumsum(0) - flat).view_as(counts_PL)  # where each block begins among the rows received
    starts, lengths = starts_PL.T.flatten(), counts_PL.T.flatten()  # the blocks, l-major
    block_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=flat.device), lengths)
    first_row_of_block = lengths.cumsum(0) - lengths
    within = torch.arange(int(lengths.sum()), device=flat.device) - first_row_of_block[block_of_row]
    return starts[block_of_row] + within


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split every MoE layer's routed experts over `ep_mesh` (rank p keeps experts p*E/ep .. (p+1)*E/ep - 1,
    as DTensors Shard(0), so checkpoints know the whole) and route its tokens by all-to-all."""
    ep = ep_mesh.size()
    backward_group = _twin_group(ep_mesh)
    for moe in moe_layers(model):
        if moe.n_experts % ep:
            raise ValueError(f"--ep {ep} must divide the routed experts per layer ({moe.n_experts})")
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name)
            experts.register_parameter(name, nn.Parameter(distribute_tensor(w.data, ep_mesh, [Shard(0)]),
                                                          requires_grad=w.requires_grad))
        recipe = getattr(experts, "recipe", None)  # Float8Experts (--precision fp8) carry their FP8 recipe
        moe.dispatcher = AllToAllDispatcher(moe.n_experts, moe.topk, ep_mesh.get_group(), fp8_recipe=recipe,
                                            backward_group=backward_group)


def _twin_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """A second process group with the ranks of this rank's group of 1-D sub-mesh `mesh`. new_group is
    collective over the world: every rank creates the twin of every such group, keeps its own."""
    root = mesh._get_root_mesh()
    dim = root.mesh_dim_names.index(mesh.mesh_dim_names[0])
    table = root.mesh.movedim(dim, -1).reshape(-1, root.mesh.shape[dim])  # one row per group of that dimension
    mine = None
    for ranks in table.tolist():
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def is_expert_parallel(moe: MoE) -> bool:
    return isinstance(moe.dispatcher, AllToAllDispatcher)
