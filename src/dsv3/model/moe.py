"""DeepSeekMoE (DeepSeek-V3 report §2.1.2): fine-grained routed experts plus always-on shared experts, a
sigmoid gate with group-limited routing, and the auxiliary-loss-free balancing bias.

Shape suffixes: N tokens (B sequences of T), D hidden size, E routed experts, K experts per token, G expert
groups, S = N*K routed (token, expert) pairs, I one expert's hidden size, L MoE layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..quant import fp8
from .layers import KeepDtype, PackedWeights, autocast_dtype, cast, linear, local_shard, pack, packed

_GROUPED_MM = hasattr(F, "grouped_mm")  # torch >= 2.8
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what grouped_mm accepts


class Gate(KeepDtype):
    """Scores every expert for every token and picks K of them.

    V3 (`noaux_tc`): sigmoid scores in float32; the balancing bias is added for *choosing* only; a group's
    score is the sum of its two best biased scores; the `topk_group` best groups are kept; the top-K experts
    of those are chosen; their weights are the unbiased scores, normalised to sum 1, times
    `routed_scaling_factor`. V2 (`greedy`, `group_limited_greedy`): softmax scores, a group scored by its
    best expert, no bias.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = config.n_routed_experts, config.num_experts_per_tok
        self.method, self.score_func = config.topk_method, config.scoring_func
        self.n_groups = 1 if config.topk_method == "greedy" else config.n_group
        self.topk_groups = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # §2.1.2: b_i, a buffer (not trained by the optimiser) kept in float32: updates of 1e-3 vanish in bf16
        bias = torch.zeros(self.n_experts, dtype=torch.float32) if self.method == "noaux_tc" else None
        self.register_buffer("bias", bias)

    def pinned(self) -> tuple[str, ...]:
        return ("bias",)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (weights_NK float32, experts_NK int64, scores_NE float32, the unbiased affinities)."""
        logits_NE = F.linear(cast(x_ND, torch.float32), cast(self.weight, torch.float32))
        if self.score_func == "sigmoid":
            scores_NE = logits_NE.sigmoid()
        else:
            scores_NE = logits_NE.softmax(dim=-1)
        choice_NE = scores_NE if self.bias is None else scores_NE + self.bias  # the bias selects, never weights
        if self.n_groups > 1:
            N = choice_NE.shape[0]
            choice_NGe = choice_NE.view(N, self.n_groups, -1)
            if self.method == "noaux_tc":
                group_NG = choice_NGe.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_NG = choice_NGe.amax(dim=-1)
            keep_NG = group_NG.topk(self.topk_groups, dim=-1).indices
            mask_NG = torch.ones_like(group_NG, dtype=torch.bool).scatter_(1, keep_NG, False)
            choice_NE = choice_NGe.masked_fill(mask_NG[..., None], float("-inf")).view(N, -1)
        experts_NK = choice_NE.topk(self.topk, dim=-1).indices
        weights_NK = scores_NE.gather(1, experts_NK)
        if self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_NK * self.route_scale, experts_NK, scores_NE


class Experts(KeepDtype):
    """The routed experts' SwiGLU weights, stacked: w1 (gate_proj) and w3 (up_proj) of shape (E, I, D), w2
    (down_proj) of shape (E, D, I). Optionally FP8 with (E, ceil(.. / 128), ceil(.. / 128)) block scales."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        for name in ("w1", "w2", "w3"):
            self.register_buffer(f"{name}_scale_inv", None)
        self.w13: PackedWeights | None = None  # (E, 2I, D): w1 and w3 stacked per expert, after pack_projections()
        # an inference engine may install faster paths for the experts of a few tokens on its device
        # (infer/cpu_kernels.py): kernel(experts, x_ND, weights_NK, experts_NK, out_ND) -> out_ND, or None to
        # leave them to `MoE.routed`'s grouped GEMMs
        self.kernel = None

    def pack_projections(self, contiguous_only: bool = False) -> None:
        """Keep each expert's w1 and w3 in one (2I, D) matrix (w1, w3 become views): one grouped GEMM, not two.
        The views are not contiguous (w1 and w3 alternate per expert), so contiguous_only leaves them."""
        if not self.is_fp8 and not contiguous_only:
            pack(self, "w13", [self.w1, self.w3], dim=1)

    @property
    def is_fp8(self) -> bool:
        return self.w1_scale_inv is not None

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's three weight matrices."""
        return 3 * self.dim * self.inter_dim * self.w2.element_size()

    def pinned(self) -> tuple[str, ...]:
        return ("w1", "w2", "w3", "w1_scale_inv", "w2_scale_inv", "w3_scale_inv") if self.is_fp8 else ()

    def to_fp8(self) -> None:
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.empty(w.shape, dtype=fp8.FP8, device=w.device),
                                             requires_grad=False))
            setattr(self, f"{name}_scale_inv", torch.empty(fp8.scale_shape(w.shape), device=w.device))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (w1, w2, w3), e counted among the experts this process holds."""
        if not self.is_fp8:
            return tuple(local_shard(w)[e] for w in (self.w1, self.w2, self.w3))
        return tuple(fp8.weight_dequant(getattr(self, n)[e], getattr(self, f"{n}_scale_inv")[e], dtype)
                     for n in ("w1", "w2", "w3"))

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor, weight_S: torch.Tensor | None = None) -> torch.Tensor:
        """x_SD holds each expert's tokens contiguously, expert 0 first, counts_E[e] of them for expert e. With
        weight_S, row s of the output is scaled by weight_S[s] (its gate value): w2 is linear, so the I-wide
        hidden activation is scaled before w2 rather than the D-wide output after it (half the work, and in
        training half the saved tensor). Under expert parallelism the weights are split over processes (see
        `local_shard`): the experts here are this process's, and counts_E has one entry for each of them."""
        if self.is_fp8 or not _GROUPED_MM or x_SD.dtype not in _GROUPED_DTYPES:
            return self.forward_loop(x_SD, counts_E.tolist(), weight_S)
        # One grouped GEMM per weight instead of a loop: the same per-expert products in a fixed handful of ops
        # whatever the routing (through the loop a decode step touching 11 experts issued ~250 ops), and
        # autograd's backward is grouped too (on CPUs a loop of GEMMs over the groups, with no copies).
        offs = counts_E.cumsum(0, dtype=torch.int32)
        w1, w2, w3 = (local_shard(w) for w in (self.w1, self.w2, self.w3))
        w13 = packed(self, "w13")
        w13 = None if w13 is None else w13.tensor
        dtype = autocast_dtype(x_SD)
        if dtype is not None:  # grouped_mm is not on autocast's list: cast as it casts a matmul
            x_SD, w1, w2, w3 = (cast(t, dtype) for t in (x_SD, w1, w2, w3))
            w13 = None if w13 is None else cast(w13, dtype)
        if w13 is not None:
            gate, up = F.grouped_mm(x_SD, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.silu(F.grouped_mm(x_SD, w1.transpose(1, 2), offs=offs))
            h = h * F.grouped_mm(x_SD, w3.transpose(1, 2), offs=offs)
        if weight_S is not None:
            h = cast(h * weight_S[:, None], h.dtype)
        y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs)
        return _ContiguousGrad.apply(y) if torch.is_grad_enabled() else y

    def forward_loop(self, x_SD: torch.Tensor, counts_E: list[int], weight_S: torch.Tensor | None = None) -> torch.Tensor:
        """The reference: a loop over experts, each a dense GEMM on its own tokens (and the FP8 path, its
        weights dequantised one expert at a time)."""
        outs, start = [], 0
        for e, n in enumerate(counts_E):
            if n == 0:
                continue
            w1, w2, w3 = self.expert_weights(e, x_SD.dtype)
            x = x_SD[start:start + n]
            h = F.silu(linear(x, w1)) * linear(x, w3)
            if weight_S is not None:
                h = cast(h * weight_S[start:start + n, None], h.dtype)
            outs.append(linear(h, w2))
            start += n
        if not outs:
            return x_SD.new_empty(0, self.dim)
        return torch.cat(outs)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's CPU backward rejects an
    expanded one (what `y.sum().backward()` passes)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class TokenDispatcher:
    """Takes the (token, expert) pairs of a MoE layer to the experts and their outputs back: the seam where
    expert parallelism swaps in all-to-all (parallel/expert_parallel.py); this one, for one process, moves
    nothing between processes.

        x_SD, weight_S, counts_E, handle = dispatcher.dispatch(x_ND, weights_NK, experts_NK)
        y_SD = experts(x_SD, counts_E, weight_S)          # rows grouped by expert, counts_E[e] for expert e
        out_ND = dispatcher.combine(y_SD, handle, out_ND)  # each pair's output added into its token's row

    Here: sort the S = N*K pairs by expert (stable, so a token's pairs keep their order), gather their rows;
    combine is one index_add. `handle` is what combine needs of dispatch (here the pairs' token ids)."""

    def __init__(self, n_experts: int, topk: int):
        self.n_experts, self.topk = n_experts, topk

    def dispatch(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor):
        """-> (x_SD, weight_S, counts_E, token_S)."""
        expert_S = experts_NK.flatten()
        order_S = expert_S.argsort(stable=True)
        token_S = order_S // self.topk
        if expert_S.device.type == "cpu":
            counts_E = torch.bincount(expert_S, minlength=self.n_experts)
        else:  # CUDA's bincount reads the largest id back to the host, which a CUDA graph cannot do
            counts_E = expert_S.new_zeros(self.n_experts).index_add_(0, expert_S, torch.ones_like(expert_S))
        return x_ND.index_select(0, token_S), weights_NK.flatten().index_select(0, order_S), counts_E, token_S

    def combine(self, y_SD: torch.Tensor, token_S: torch.Tensor, out_ND: torch.Tensor) -> torch.Tensor:
        """Add each pair's (gate-weighted) output into its token's row of out_ND."""
        return out_ND.index_add_(0, token_S, cast(y_SD, out_ND.dtype))


class MoE(nn.Module):
    """y = sum_k g_k * expert_k(x) + shared(x). Routed tokens go to their experts and back through
    `dispatcher` (a TokenDispatcher: on one process, a sort by expert and an index_add; under expert
    parallelism, all-to-all between the processes that hold the experts)."""

    def __init__(self, config: ModelConfig, shared_experts: nn.Module | None):
        super().__init__()
        self.n_experts, self.topk = config.n_routed_experts, config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = shared_experts
        self.dispatcher = TokenDispatcher(self.n_experts, self.topk)

    def forward(self, x: torch.Tensor, stats: RoutingStats | None = None) -> torch.Tensor:
        """x (..., D) -> (..., D). With `stats` (training), the layer records its routing there."""
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        weights_NK, experts_NK, scores_NE = self.gate(x_ND)
        # the routed outputs are added into the shared experts' output (one op, not a zero-fill and an add)
        shared_ND = None if self.shared_experts is None else cast(self.shared_experts(x_ND), x_ND.dtype)
        y_ND = self.routed(x_ND, weights_NK, experts_NK, shared_ND, fast=stats is None)
        if stats is not None:
            B = shape[0] if x.dim() == 3 else 1  # sequences, for the sequence-wise loss
            stats.record(self, scores_NE.view(B, -1, self.n_experts), experts_NK.view(B, -1, self.topk))
        return y_ND.view(shape)

    def routed(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
               out_ND: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
        """-> out_ND (zeros if not given) plus each token's gate-weighted routed experts' outputs. fast: an
        installed inference kernel may take them (outside autograd); training leaves them to the reference."""
        kernel = self.experts.kernel
        if kernel is not None and fast and not torch.is_grad_enabled():
            y = kernel(self.experts, x_ND, weights_NK, experts_NK, torch.zeros_like(x_ND) if out_ND is None else out_ND)
            if y is not None:
                return y
        x_SD, weight_S, counts_E, handle = self.dispatcher.dispatch(x_ND, weights_NK, experts_NK)
        y_SD = self.experts(x_SD, counts_E, weight_S)  # each pair's output already times its gate value
        return self.dispatcher.combine(y_SD, handle, torch.zeros_like(x_ND) if out_ND is None else out_ND)

    def routed_reference(self, x_ND, weights_NK, experts_NK) -> torch.Tensor:
        """The plain per-expert loop (as HF computes it), kept to hold `routed` to."""
        y_ND = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            tok, k = torch.where(experts_NK == e)
            if tok.numel() == 0:
                continue
            w1, w2, w3 = self.experts.expert_weights(e, x_ND.dtype)
            h = linear(F.silu(linear(x_ND[tok], w1)) * linear(x_ND[tok], w3), w2)
            y_ND.index_add_(0, tok, (h * weights_NK[tok, k, None]).to(x_ND.dtype))
        return y_ND


class RoutingStats:
    """What one training forward records about routing, handed back to the caller instead of left on the
    modules (under pipelining several micro-batches are in flight at once, each with its own record). Per MoE
    layer: the tokens each expert received, counted from the gate's choice, and, when `balance_loss` asks
    for one, the layer's balance loss (before its weight alpha). Use a new one for every forward:

        stats = RoutingStats("sequence")
        logits, mtp_logits = model.forward_with_mtp(input_ids, stats=stats)
        loss = loss + alpha * stats.balance_loss_sum()
        loads_LE = stats.loads(moe_layers(model))

    balance_loss: None, "sequence" (V3's complementary sequence-wise loss) or "batch" (the classic auxiliary
    loss: the whole batch as one sequence).
    """

    KINDS = (None, "sequence", "batch")

    def __init__(self, balance_loss: str | None = None):
        if balance_loss not in self.KINDS:
            raise ValueError(f"balance_loss={balance_loss!r}: expected one of {self.KINDS}")
        self.balance_loss = balance_loss
        self.counts: dict[nn.Module, torch.Tensor] = {}  # per MoE layer: tokens per expert (E,), int64
        self.losses: dict[nn.Module, torch.Tensor] = {}  # per MoE layer: its balance loss, a scalar

    def record(self, moe: MoE, scores_BTE: torch.Tensor, experts_BTK: torch.Tensor) -> None:
        """Called by each MoE layer in its forward. A block recomputed in backward (model.recompute) routes the
        same tokens a second time: that record is dropped, so nothing counts twice; its loss is still computed,
        as the recomputation must save the same tensors as the forward it replays."""
        experts = experts_BTK.flatten()
        if experts.device.type == "cpu":
            counts_E = torch.bincount(experts, minlength=moe.n_experts)
        else:  # as MoE.dispatch: CUDA's bincount would read the largest id back to the host
            counts_E = experts.new_zeros(moe.n_experts).index_add_(0, experts, torch.ones_like(experts))
        loss = None
        if self.balance_loss is not None:
            if self.balance_loss == "batch":
                scores_BTE, experts_BTK = scores_BTE.flatten(0, 1)[None], experts_BTK.flatten(0, 1)[None]
            loss = balance_loss(scores_BTE, experts_BTK, moe.n_experts)
        if moe in self.counts:
            return
        self.counts[moe] = counts_E
        if loss is not None:
            self.losses[moe] = loss

    def loads(self, layers: list[MoE], device: torch.device | None = None) -> torch.Tensor:
        """-> (len(layers), E) tokens routed to each expert of each layer; zeros for a layer this forward did
        not run (the MTP modules' when only the main model ran, another pipeline stage's), on `device`
        (default: where the counts are)."""
        if not layers:
            return torch.zeros(0, 0, dtype=torch.long, device=device)
        device = device or next((c.device for c in self.counts.values()), None)
        return torch.stack([self.counts[m] if m in self.counts else
                            torch.zeros(m.n_experts, dtype=torch.long, device=device) for m in layers])

    def balance_loss_sum(self) -> torch.Tensor | None:
        """The sum over MoE layers of their balance losses, or None when none was asked for (or no MoE ran)."""
        return torch.stack(list(self.losses.values())).sum() if self.losses else None


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's MoE layers in module order (main blocks, then the MTP modules')."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def balance_loss(scores_BTE: torch.Tensor, experts_BTK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The complementary sequence-wise balance loss of the V3 report (eqs. 17-20), without its weight alpha:
    per sequence, f_i = E / (K T) * (tokens choosing expert i), P_i = mean over the sequence of the
    normalised affinity s_i / sum_j s_j; loss = sum_i f_i P_i, averaged over sequences. With the whole batch
    as one sequence (B = 1) it is the classic batch-wise auxiliary loss. f carries no gradient; P does."""
    B, T, K = experts_BTK.shape
    counts_BE = torch.zeros(B, n_experts, device=scores_BTE.device).scatter_add_(
        1, experts_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device))
    f_BE = counts_BE * (n_experts / (K * T))
    p_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f_BE * p_BE).sum(dim=-1).mean()
