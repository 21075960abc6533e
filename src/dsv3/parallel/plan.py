"""`dsv3 plan`: size DeepSeek-V3 training on thousands of GPUs, on paper and by simulation, without them.

    dsv3 plan --preset 671B --gpus 2048 --pp 16 --ep 64 --zero 1 --pp-schedule dualpipev

V3 trained on 2048 H800 GPUs (80 GB each; 8 per node, NVLink inside a node, InfiniBand between nodes) with
16-way pipeline parallelism (DualPipe), 64-way expert parallelism over 8 nodes and ZeRO-1 data parallelism,
no tensor parallelism (the V3 report, arXiv 2412.19437, §3.1-3.2). This command takes such a layout and:

1. builds its device mesh on a FAKE process group of --gpus ranks (no communication, no memory), with the
   dimensions of parallel/mesh.py: ("pp", "dp_mod_ep", "ep", "tp"), "dp" = ("dp_mod_ep", "ep") flattened.
   Expert parallelism borrows from data parallelism: each MoE layer's routed experts are split E/ep per rank
   over "ep" and sharded/replicated over "dp_mod_ep"; dense parameters are data-parallel over all of dp;
2. builds the model on the meta device and assigns every parameter to a pipeline stage: layers are split into
   contiguous ranges, at least one per stage, that balance forward FLOPs per token (--layer-split even: by
   count, as dsv3 train's pipeline does); the embedding is on the first stage, the final norm, the output
   head and the MTP modules on the last (V3 reports no split). Stages go to ranks as torch's schedule places
   them (1f1b: stage s on rank s; interleaved1f1b: s on s mod pp; zbv and dualpipev: the V, rank r holds
   stages r and 2pp-1-r, so rank 0 holds the embedding and the head, as V3 places them to share them with
   MTP, §3.2.3; elsewhere the last stage holds a copy of the embedding for MTP);
3. counts bytes per GPU: BF16 weights, FP32 gradients, FP32 master weights + BF16 AdamW moments (the
   report's dtypes, §3.3.1 and §3.3.3), sharded as --zero says; activations kept for backward per token and
   layer, from the model's shapes, with the report's recomputation (RMSNorm and the MLA up-projections,
   §3.2.3) and, with --precision fp8, its FP8 caching (§3.3.2), times the micro-batches each rank holds at
   once under the schedule's own action table;
4. counts all-to-all bytes per micro-batch and MoE layer: dispatch in FP8 with scales, combine in BF16
   (§3.3.3), each token to K experts on no more nodes than its `topk_group` expert groups span on the mesh
   (node-limited routing, §3.2.2: 4 for V3);
5. takes each schedule's action table from torch.distributed.pipelining (`pipeline_order` of
   Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, ScheduleDualPipeV) and simulates it with
   per-action costs F, B, W measured on a scaled-down block on this CPU (or given with --costs), set beside
   the report's formulas (Table 2): 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe (PP/2-1)(F&B+B-3W).

Costs follow the report's notation: F the forward of one chunk, B its FULL backward (input and weight
gradients), W the weight-gradient part of B, F&B an overlapped forward and backward. Everything else is
computed from the config and the layout; what is assumed is printed under the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import PRESETS, ModelConfig
from .mesh import PP_SCHEDULES

GiB = 1024 ** 3
BF16, FP32, INT64 = 2, 4, 8
FP8_TILE = 1 + 4 / 128  # an e4m3 byte plus one FP32 scale per 1x128 tile (§3.3.2)
E5M6_TILE = 1.5 + 4 / 128  # the attention output (o_proj's input): 12 bits plus a scale per tile (§3.3.2)
OPTIMIZER_BYTES = FP32 + 2 * BF16  # FP32 master weights + AdamW moments in BF16 (§3.3.3)

SCHEDULES = PP_SCHEDULES  # (torch class name, stages per rank, how torch places stages on ranks): mesh.py's

# What the V3 report states about its own run (arXiv 2412.19437), printed beside the plan's figures.
REPORT = {
    "gpus": "2048 NVIDIA H800, 8 per node (§3.1)",
    "layout": "PP16 (DualPipe), EP64 over 8 nodes, ZeRO-1 DP, no TP (§3.2)",
    "batch": "15360 sequences of 4K tokens at the end of the batch-size ramp (§4.2)",
    "dtypes": "BF16 AdamW moments, FP32 master weights and gradients (§3.3.3)",
    "routing": "each token to at most 4 nodes; IB 50 GB/s, NVLink 160 GB/s (§3.2.2)",
    "bubble": "DualPipe (PP/2-1)(F&B+B-3W) vs 1F1B (PP-1)(F+B) (Table 2)",
}
IB_GBPS, NVLINK_GBPS = 50, 160  # per GPU, §3.2.2


# ---- the layout ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A training layout over `gpus` ranks: world = pp x dp x tp, ep inside dp."""

    gpus: int
    pp: int
    ep: int = 1
    tp: int = 1
    zero: int = 1  # 1: optimizer states sharded; 2: and gradients; 3: and weights
    schedule: str = "dualpipev"
    micro_batch_size: int = 1  # sequences per micro-batch
    seq_len: int = 4096
    global_batch: int = 15360  # sequences per optimizer step
    precision: str = "fp8"  # fp8: V3's FP8 caching and FP8 dispatch; bf16: everything BF16
    gpus_per_node: int = 8
    layer_split: str = "balanced"  # balanced: by forward FLOPs; even: by layer count, as parallel/pipeline.py

    @property
    def dp(self) -> int:
        return self.gpus // (self.pp * self.tp)

    @property
    def dp_mod_ep(self) -> int:
        return self.dp // self.ep

    @property
    def stages_per_rank(self) -> int:
        return SCHEDULES[self.schedule][1]

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def micro_batches(self) -> int:
        """Micro-batches each pipeline runs per optimizer step."""
        return self.global_batch // (self.dp * self.micro_batch_size)

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.micro_batch_size * self.seq_len

    def check(self, cfg: ModelConfig) -> None:
        """Refuse a layout that cannot run this model, with the numbers at fault."""
        for name in ("gpus", "pp", "ep", "tp", "micro_batch_size", "seq_len", "global_batch", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--pp-schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.zero not in (1, 2, 3):
            raise ValueError(f"--zero {self.zero}: expected 1, 2 or 3")
        if self.precision not in ("fp8", "bf16"):
            raise ValueError(f"--precision {self.precision!r}: expected fp8 or bf16")
        if self.layer_split not in ("balanced", "even"):
            raise ValueError(f"--layer-split {self.layer_split!r}: expected balanced or even")
        if self.gpus % (self.pp * self.tp):
            raise ValueError(f"--gpus {self.gpus} is not divisible by --pp {self.pp} x --tp {self.tp} = "
                             f"{self.pp * self.tp}: the world is pp x dp x tp ranks")
        if self.dp % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the data-parallel degree dp = gpus / (pp x tp) = "
                             f"{self.dp}: expert parallelism borrows its ranks from data parallelism")
        if cfg.n_routed_experts is not None and cfg.n_routed_experts % self.ep:
            raise ValueError(f"--ep {self.ep} must divide n_routed_experts={cfg.n_routed_experts}: each EP rank "
                             "holds E/ep experts of every MoE layer")
        for name, size in (("num_attention_heads", cfg.num_attention_heads), ("intermediate_size",
                           cfg.intermediate_size), ("moe_intermediate_size", cfg.moe_intermediate_size)):
            if size % self.tp:
                raise ValueError(f"--tp {self.tp} must divide {name}={size} (tensor parallelism splits it)")
        if self.n_stages > cfg.num_hidden_layers:
            raise ValueError(f"--pp {self.pp} with {self.schedule} makes {self.n_stages} pipeline stages "
                             f"({self.stages_per_rank} per rank), more than the model's "
                             f"{cfg.num_hidden_layers} layers")
        if self.global_batch % (self.dp * self.micro_batch_size):
            raise ValueError(f"--global-batch {self.global_batch} is not divisible by dp x --micro-batch-size = "
                             f"{self.dp} x {self.micro_batch_size}: every data-parallel rank runs whole "
                             "micro-batches")
        if self.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"--seq-len {self.seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")

    def describe(self) -> str:
        return (f"pp {self.pp} x dp {self.dp} (ep {self.ep} x dp_mod_ep {self.dp_mod_ep}) x tp {self.tp}, "
                f"ZeRO-{self.zero}, {self.schedule}")


# ---- the mesh, on a fake process group ----------------------------------------------------------------------

@contextmanager
def fake_world(world_size: int):
    """A process group of `world_size` ranks in which this process is rank 0 and nothing is sent: collectives
    are no-ops, groups and meshes are built as on a real cluster."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if dist.is_initialized():
        raise RuntimeError("dsv3 plan builds its own fake process group: run it as one process, not under torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_mesh(layout: Layout) -> dict:
    """The training mesh of parallel/mesh.py, ("pp", "dp_mod_ep", "ep", "tp") with "dp" flattened from
    ("dp_mod_ep", "ep"). -> {dim name: this rank's 1-D mesh}."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (layout.pp, layout.dp_mod_ep, layout.ep, layout.tp),
                            mesh_dim_names=("pp", "dp_mod_ep", "ep", "tp"))
    dims = {d: mesh[d] for d in mesh.mesh_dim_names}
    dims["dp"] = mesh["dp_mod_ep", "ep"]._flatten("dp")  # as parallel/mesh.py (torchtitan's way; no public API yet)
    return dims


def mesh_facts(dims: dict, layout: Layout) -> dict:
    """Rank 0's groups, read back from the mesh, and the nodes they span (ranks r // gpus_per_node)."""
    def ranks(dim: str) -> list[int]:  # in the order of the dimension's coordinate
        return [int(r) for r in dims[dim].mesh.flatten().tolist()]

    def nodes(rs: list[int]) -> int:
        return len({r // layout.gpus_per_node for r in rs})

    out = {"shape": {d: dims[d].size() for d in ("pp", "dp_mod_ep", "ep", "tp")}}
    for dim in ("pp", "dp", "ep", "dp_mod_ep", "tp"):
        rs = ranks(dim)
        out[dim] = {"size": len(rs), "ranks_of_rank0": _span(rs), "nodes": nodes(rs), "ranks": rs}
    return out


def _span(rs: list[int]) -> str:
    """[0, 1, ..., 63] -> "0-63"; [0, 128, ..., 1920] -> "0, 128, ... 1920 (stride 128)"."""
    if len(rs) == 1:
        return str(rs[0])
    step = rs[1] - rs[0]
    if all(b - a == step for a, b in zip(rs, rs[1:])):
        return f"{rs[0]}-{rs[-1]}" if step == 1 else f"{rs[0]}, {rs[1]}, ... {rs[-1]} (stride {step})"
    return ", ".join(map(str, rs))


# ---- FLOPs, and stages by layer ranges ------------------------------------------------------------------

def attention_params(cfg: ModelConfig) -> int:
    d, H = cfg.hidden_size, cfg.num_attention_heads
    q = d * H * cfg.qk_head_dim if cfg.q_lora_rank is None else (d + H * cfg.qk_head_dim) * cfg.q_lora_rank
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * d


def block_flops(cfg: ModelConfig, layer_id: int, seq_len: int) -> float:
    """Forward FLOPs per token of block `layer_id`: 2 per multiply-add of its Linears (of the routed experts
    the K chosen), plus causal attention's QK^T and PV over seq_len/2 keys on average."""
    d = cfg.hidden_size
    if cfg.is_moe_layer(layer_id):
        active = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
        active += d * cfg.n_routed_experts  # the gate
    else:
        active = 3 * d * cfg.intermediate_size
    core = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len  # 2 x H (qk + v) x T/2
    return 2 * (attention_params(cfg) + active) + core


def tail_flops(cfg: ModelConfig, seq_len: int) -> float:
    """The last stage's extra forward FLOPs per token: the output head and each MTP module (eh_proj, its
    block and the shared head)."""
    d, L, head = cfg.hidden_size, cfg.num_hidden_layers, 2 * cfg.hidden_size * cfg.vocab_size
    mtp = sum(2 * 2 * d * d + block_flops(cfg, L + k, seq_len) + head for k in range(cfg.num_nextn_predict_layers))
    return head + mtp


def split_layers(cfg: ModelConfig, n_stages: int, seq_len: int, placement: dict[int, int] | None = None,
                 how: str = "balanced") -> list[range]:
    """Contiguous layer ranges, one per stage, at least one layer each. even: as parallel/pipeline.py splits
    them for `dsv3 train`, by count, earlier stages taking the remainder. balanced: by forward FLOPs per token,
    the split with the smallest sum of squared stage costs; the last stage also carries the output head and
    the MTP modules, and another stage on the same rank (the V puts stage 0 there) is charged them too, so
    that it takes fewer layers and the rank's load evens out. The embedding costs no FLOPs."""
    L = cfg.num_hidden_layers
    if how == "even":
        from .pipeline import layer_ranges
        return layer_ranges(L, n_stages)
    prefix = [0.0]
    for i in range(L):
        prefix.append(prefix[-1] + block_flops(cfg, i, seq_len))
    tail = tail_flops(cfg, seq_len)
    last_rank = None if placement is None else placement[n_stages - 1]
    extra = [tail if j == n_stages - 1 or (placement is not None and placement[j] == last_rank) else 0.0
             for j in range(n_stages)]
    # best[j][i]: the smallest sum of squares putting layers [0, i) on stages [0, j); cut[j][i]: where stage j-1 starts
    best = [[math.inf] * (L + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for j in range(1, n_stages + 1):
        for i in range(j, L - (n_stages - j) + 1):
            for k in range(j - 1, i):
                c = best[j - 1][k] + (prefix[i] - prefix[k] + extra[j - 1]) ** 2
                if c < best[j][i]:
                    best[j][i], cut[j][i] = c, k
    ranges, i = [], L
    for j in range(n_stages, 0, -1):
        ranges.append(range(cut[j][i], i))
        i = cut[j][i]
    return ranges[::-1]


def stage_to_rank(layout: Layout) -> dict[int, int]:
    """Where torch's schedule puts each stage, as `dsv3 train` builds its stages (pipeline.stage_ranks)."""
    from .pipeline import stage_ranks

    return dict(enumerate(stage_ranks(layout.pp, layout.schedule)))


# ---- parameters per rank, from the model on the meta device ---------------------------------------------

# Split over "tp" as parallel/tensor_parallel.py splits them (heads, and hidden units of dense MLPs)
_TP_SPLIT = re.compile(r"attn\.(wq|wq_b|wkv_b|wo)\.weight$|ffn\.(shared_experts\.)?w[123]\.weight$")
_ROUTED = re.compile(r"ffn\.experts\.w[123]$")


@dataclass
class RankParams:
    """Parameter elements one GPU holds, by how they are sharded (before ZeRO)."""

    replicated: float = 0  # dense, the same on every tp rank
    tp_split: float = 0  # dense, 1/tp of each on this GPU
    expert: float = 0  # routed experts: E/ep of each MoE layer's experts
    copy: float = 0  # the embedding copy the MTP modules need on the last stage when rank 0 does not hold it

    @property
    def dense(self) -> float:
        """Data-parallel over all of dp."""
        return self.replicated + self.tp_split + self.copy

    @property
    def total(self) -> float:
        return self.dense + self.expert

    def distinct(self, layout: Layout) -> float:
        """The model parameters this GPU's pipeline rank holds, all its tp and ep shards together."""
        return self.replicated + self.tp_split * layout.tp + self.expert * layout.ep


def stage_of_param(name: str, layer_stage: list[int], n_stages: int) -> int:
    if name.startswith("embed."):
        return 0
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return layer_stage[int(m.group(1))]
    return n_stages - 1  # final norm, head, MTP modules


def params_per_rank(model: nn.Module, layout: Layout, ranges: list[range],
                    placement: dict[int, int]) -> list[RankParams]:
    layer_stage = [s for s, r in enumerate(ranges) for _ in r]
    out = [RankParams() for _ in range(layout.pp)]
    for name, p in model.named_parameters():
        rp = out[placement[stage_of_param(name, layer_stage, layout.n_stages)]]
        n = p.numel()
        if _ROUTED.search(name):
            rp.expert += n / layout.ep
        elif _TP_SPLIT.search(name):
            rp.tp_split += n / layout.tp
        else:
            rp.replicated += n
    cfg = model.config
    first, last = placement[0], placement[layout.n_stages - 1]
    if cfg.num_nextn_predict_layers and first != last and not cfg.tie_word_embeddings:
        # MTP embeds the next tokens with the main embedding (§2.2); a rank other than the first needs a copy
        # (its gradient summed with the first stage's, as tied embeddings are). DualPipe avoids it (§3.2.3)
        out[last].copy += cfg.vocab_size * cfg.hidden_size
    return out


# ---- bytes per GPU: weights, gradients, optimizer -------------------------------------------------------

def state_bytes(rp: RankParams, layout: Layout, largest_layer: float) -> dict[str, float]:
    """BF16 weights, FP32 gradients, FP32 master + 2 BF16 moments (§3.3.3), sharded by ZeRO stage: dense
    parameters over dp, the routed experts over the dp/ep ranks that hold the same experts (dp_mod_ep)."""
    sharded = rp.dense / layout.dp + rp.expert / layout.dp_mod_ep
    weights = BF16 * (sharded if layout.zero == 3 else rp.total)
    if layout.zero == 3:  # the layer computing and the next one, gathered
        weights += 2 * BF16 * largest_layer
    grads = FP32 * (sharded if layout.zero >= 2 else rp.total)
    return {"weights": weights, "grads": grads, "optimizer": OPTIMIZER_BYTES * sharded}


def largest_layer_elements(model: nn.Module, layout: Layout) -> float:
    """The largest block's parameters on one GPU (its tp and ep shares), for ZeRO-3's gathered working set."""
    best = 0.0
    for block in list(model.layers) + [m.block for m in model.mtp]:
        n = 0.0
        for name, p in block.named_parameters():
            n += p.numel() / (layout.ep if _ROUTED.search(name) else layout.tp if _TP_SPLIT.search(name) else 1)
        best = max(best, n)
    return best


# ---- activations kept for backward --------------------------------------------------------------------------

@dataclass(frozen=True)
class Cached:
    """A tensor a training forward keeps for backward, per token (per routed copy when `routed`)."""

    what: str
    elements: int
    nbytes: float  # per element
    routed: bool = False  # one per (token, chosen expert) pair, held on the expert's GPU
    tp_split: bool = False  # split over tp (heads, or hidden units of a tp-split MLP)

    def per_token(self, cfg: ModelConfig, tp: int) -> float:
        copies = cfg.num_experts_per_tok if self.routed else 1
        return self.elements * self.nbytes * copies / (tp if self.tp_split else 1)


def layer_cache(cfg: ModelConfig, layer_id: int, precision: str) -> list[Cached]:
    """What block `layer_id` keeps per token. The report's recipe (§3.2.3): every RMSNorm and the MLA
    up-projections (W^UQ, W^UK, W^UV) are recomputed in backward, so their outputs are not kept; a Linear
    that reads a norm's output recomputes it. With fp8 (§3.3.2) Linear inputs are cached in FP8 with 1x128
    tile scales, o_proj's in E5M6, the routed experts keep the SwiGLU input and recompute its output."""
    fp8 = precision == "fp8"
    lin = FP8_TILE if fp8 else BF16
    D, H = cfg.hidden_size, cfg.num_attention_heads
    rows = [Cached("block input (the attention RMSNorm is recomputed from it)", D, BF16)]
    if cfg.q_lora_rank is not None:
        rows.append(Cached("q latent before q_norm (q_norm and W^UQ recomputed)", cfg.q_lora_rank, BF16))
    rows += [
        Cached("kv latent + rope key before kv_norm (kv_norm, W^UK, W^UV recomputed)",
               cfg.kv_lora_rank + cfg.qk_rope_head_dim, BF16),
        Cached(f"attention output = o_proj input ({'E5M6' if fp8 else 'BF16'})", H * cfg.v_head_dim,
               E5M6_TILE if fp8 else BF16, tp_split=True),
        Cached("attention log-sum-exp per head (FP32)", H, FP32, tp_split=True),
        Cached("residual after attention (the FFN RMSNorm is recomputed from it)", D, BF16),
    ]
    if not cfg.is_moe_layer(layer_id):
        I = cfg.intermediate_size
        return rows + [Cached("SwiGLU input: gate_proj and up_proj outputs (BF16)", 2 * I, BF16, tp_split=True),
                       Cached("down_proj input", I, lin, tp_split=True)]
    E, K, Im = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    rows += [Cached("router affinities (FP32, all experts)", E, FP32),
             Cached("chosen experts (int64) and their gate weights (FP32)", K, INT64 + FP32)]
    if cfg.n_shared_experts:
        Is = Im * cfg.n_shared_experts
        rows += [Cached("shared expert: SwiGLU input (BF16)", 2 * Is, BF16, tp_split=True),
                 Cached("shared expert: down_proj input", Is, lin, tp_split=True)]
    rows += [Cached(f"routed: the dispatched token, w1/w3 input ({'FP8' if fp8 else 'BF16'})", D, lin, routed=True),
             Cached(f"routed: SwiGLU input ({'FP8' if fp8 else 'BF16'})", 2 * Im, lin, routed=True),
             Cached("routed: down_proj input" + (" (recomputed from the SwiGLU input)" if fp8 else " (BF16)"),
                    Im, 0 if fp8 else BF16, routed=True)]
    return rows


def tail_cache(cfg: ModelConfig) -> list[Cached]:
    """The last stage's extras per token besides the MTP blocks: the heads' inputs and the logits the
    cross-entropy keeps (FP32; a fused cross-entropy would not keep them), and the MTP modules' inputs."""
    D, heads = cfg.hidden_size, 1 + cfg.num_nextn_predict_layers
    rows = [Cached("final RMSNorm input", D, BF16),
            Cached(f"logits for the cross-entropy, {heads} head(s) (FP32)", heads * cfg.vocab_size, FP32),
            Cached("labels (int64)", 1, INT64)]
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        rows += [Cached(f"MTP {k}: next tokens' embeddings and h (enorm, hnorm inputs)", 2 * D, BF16),
                 Cached(f"MTP {k}: block output (shared_head.norm input)", D, BF16)]
    return rows


def stage_activation_bytes(cfg: ModelConfig, layout: Layout, stage: int, layers: range) -> float:
    """Bytes one micro-batch leaves on a stage's GPU for backward. Routed rows assume balanced routing: each
    GPU's experts receive, on average, K copies of as many tokens as the GPU feeds in."""
    per_token = sum(c.per_token(cfg, layout.tp) for i in layers for c in layer_cache(cfg, i, layout.precision))
    if stage == 0:
        per_token += INT64  # the token ids, for the embedding's backward
    if stage == layout.n_stages - 1:
        L = cfg.num_hidden_layers
        per_token += sum(c.per_token(cfg, layout.tp) for c in tail_cache(cfg))
        per_token += sum(c.per_token(cfg, layout.tp) for k in range(cfg.num_nextn_predict_layers)
                         for c in layer_cache(cfg, L + k, layout.precision))
    return per_token * layout.tokens


# ---- all-to-all ---------------------------------------------------------------------------------------------

def max_nodes_per_token(cfg: ModelConfig, layout: Layout, ep_ranks: list[int]) -> int:
    """How many nodes one token's K experts can span. Its experts come from `topk_group` groups (§2.1.2); expert
    e lives on EP rank e // (E/ep), that is on global rank ep_ranks[...] of the mesh, on node rank //
    gpus_per_node. The bound: the nodes of the `topk_group` groups that span the most, at most K."""
    E = cfg.n_routed_experts
    node_of_expert = [ep_ranks[e // (E // layout.ep)] // layout.gpus_per_node for e in range(E)]
    n_group = 1 if cfg.topk_method == "greedy" else cfg.n_group
    size = E // n_group
    spans = sorted((len(set(node_of_expert[g * size:(g + 1) * size])) for g in range(n_group)), reverse=True)
    kept = 1 if n_group == 1 else cfg.topk_group
    return min(cfg.num_experts_per_tok, sum(spans[:kept]), len(set(node_of_expert)))


def all_to_all(cfg: ModelConfig, layout: Layout, ep_ranks: list[int], moe_layers_on_rank: int) -> dict:
    """Bytes one GPU sends per micro-batch and MoE layer. Forward: dispatch (each token to its K experts; FP8
    with tile scales under fp8, §3.3.3) and combine (K outputs back, BF16). Backward mirrors them: the output
    gradients go out as dispatch does (FP8 under fp8, §3.3.3: 'activation gradients before the MoE
    down-projections'), the input gradients come back as combine (BF16). Across nodes a token travels once
    per target node (IB), then to its experts inside the node (NVLink); the combine is summed within a node
    before it crosses IB (§3.2.2)."""
    T, D, K = layout.tokens, cfg.hidden_size, cfg.num_experts_per_tok
    disp = FP8_TILE if layout.precision == "fp8" else BF16
    ep_nodes = len({r // layout.gpus_per_node for r in ep_ranks})
    nodes = max_nodes_per_token(cfg, layout, ep_ranks)
    remote_worst = min(nodes, ep_nodes - 1)
    remote_mean = nodes * (ep_nodes - 1) / ep_nodes  # target nodes drawn evenly from the EP group's nodes
    out = {"tokens": T, "experts_per_token": K, "max_nodes_per_token": nodes, "ep_nodes": ep_nodes}
    for name, nbytes in (("dispatch", disp), ("combine", BF16)):
        out[name] = {"bytes_per_element": nbytes,
                     "payload": T * K * D * nbytes,  # all K copies, whatever link they take
                     "ib_worst": T * remote_worst * D * nbytes, "ib_mean": T * remote_mean * D * nbytes}
    per_layer_ib = 2 * (out["dispatch"]["ib_worst"] + out["combine"]["ib_worst"])  # forward + backward
    out["ib_ms_per_layer_fwd_bwd"] = per_layer_ib / (IB_GBPS * 1e9) * 1e3
    # every copy reaches its expert's GPU over NVLink (after IB, forwarded inside the target node), at most once
    per_layer_nvlink = 2 * (out["dispatch"]["payload"] + out["combine"]["payload"])
    out["nvlink_ms_per_layer_fwd_bwd"] = per_layer_nvlink / (NVLINK_GBPS * 1e9) * 1e3
    out["moe_layers_on_rank"] = moe_layers_on_rank
    out["per_step_payload"] = 2 * (out["dispatch"]["payload"] + out["combine"]["payload"]) \
        * moe_layers_on_rank * layout.micro_batches
    return out


# ---- the schedule's action table and its simulation ------------------------------------------------------

def schedule_table(layout: Layout, pp_group, placement: dict[int, int]) -> tuple[dict[int, list], list[str]]:
    """Every pipeline rank's ordered compute actions, from torch's own schedule object, built for this rank's
    stages on the mesh's "pp" group. -> (table, notes on repairs)."""
    from torch.distributed.pipelining import PipelineStage, schedules

    cls = getattr(schedules, SCHEDULES[layout.schedule][0])
    me = dist.get_rank(pp_group)
    mine = [PipelineStage(nn.Identity(), s, layout.n_stages, torch.device("cpu"), group=pp_group)
            for s in range(layout.n_stages) if placement[s] == me]
    try:
        sched = cls(mine[0] if layout.stages_per_rank == 1 else mine, layout.micro_batches)
    except ValueError as e:
        raise ValueError(f"--pp-schedule {layout.schedule} with {layout.micro_batches} micro-batches per "
                         f"pipeline: {e}") from None
    table = {r: [a for a in acts if a is not None and a.is_compute_op] for r, acts in sched.pipeline_order.items()}
    notes = []
    if layout.schedule == "1f1b" and _renumber_forwards(table, layout.micro_batches):
        notes.append("torch's Schedule1F1B._get_pipeline_order numbers the last rank's forwards 1..M (its counter "
                     "is incremented before the first steady-state forward); its runtime runs 0..M-1 in order, "
                     "so the table's forwards were renumbered in order")
    check_table(table, layout.n_stages, layout.micro_batches, placement)
    return table, notes


def _renumber_forwards(table: dict[int, list], n_micro: int) -> bool:
    """1F1B runs each rank's forwards in micro-batch order: renumber a rank whose forwards are not 0..M-1."""
    from torch.distributed.pipelining.schedules import FORWARD

    changed = False
    for rank, acts in table.items():
        ids = [a.microbatch_index for a in acts if a.computation_type == FORWARD]
        if ids != list(range(n_micro)):
            it = iter(range(n_micro))
            table[rank] = [a._replace(microbatch_index=next(it)) if a.computation_type == FORWARD else a
                           for a in acts]
            changed = True
    return changed


def _parts(action) -> tuple:
    """An action's compute parts: an overlapped forward+backward is two."""
    return action.sub_actions if action.sub_actions else (action,)


def check_table(table: dict[int, list], n_stages: int, n_micro: int, placement: dict[int, int]) -> None:
    """Each (stage, micro-batch) forward once and backward once (whole, or input then weight), on its rank."""
    seen: dict[tuple, int] = {}
    for rank, acts in table.items():
        for a in acts:
            for p in _parts(a):
                kind = {"F": "F", "B": "I+W", "I": "I", "W": "W"}[p.computation_type.value]
                for k in kind.split("+"):
                    key = (p.stage_index, k, p.microbatch_index)
                    seen[key] = seen.get(key, 0) + 1
                assert placement[p.stage_index] == rank, f"{p} on rank {rank}, expected {placement[p.stage_index]}"
    want = {(s, k, m) for s in range(n_stages) for k in "FIW" for m in range(n_micro)}
    bad = {k: v for k, v in seen.items() if v != 1} | {k: 0 for k in want - seen.keys()}
    assert not bad and seen.keys() == want, f"the schedule's table is not one F, I and W per (stage, mb): {bad}"


@dataclass
class StageCosts:
    """Per stage: forward, full backward and its weight part; fb = F&B / (F + B) for overlapped pairs."""

    F: list[float]
    B: list[float]
    W: list[float]
    fb: float = 1.0


@dataclass
class Simulation:
    step: float  # the last action's end
    busy: list[float]  # per rank
    peak_activation: list[float]  # per rank, bytes at the fullest moment
    in_flight: list[dict[int, int]]  # per rank: stage -> most micro-batches alive at once

    @property
    def idle(self) -> list[float]:
        return [self.step - b for b in self.busy]

    @property
    def bubble(self) -> float:
        """The longest any rank waits in a step (with equal stages, the pipeline bubble of Table 2)."""
        return max(self.idle)

    @property
    def idle_share(self) -> float:
        """The share of all ranks' time spent waiting: the bubble and any imbalance between ranks."""
        return sum(self.idle) / (len(self.busy) * self.step)


def simulate(table: dict[int, list], n_stages: int, costs: StageCosts, act_bytes: list[float]) -> Simulation:
    """Run the table with zero-latency point-to-point sends: each rank takes its actions in order, each starts
    once its rank is free and its input is ready (F after the previous stage's F of that micro-batch; I or B
    after the next stage's backward of it, or, on the last stage, after its own F; W after its I). An
    overlapped F&B waits for both inputs and lasts fb x (F + B). Activations: a micro-batch's bytes on a stage
    are held from its F until its backward is complete (B, or W when split: an upper bound, as I already
    frees what only the input gradient needed)."""
    kinds = {"F": "F", "B": "B", "I": "B", "W": "W"}  # I and B both hand the input gradient on
    done: dict[tuple, float] = {}
    ranks = sorted(table)
    pos, free, busy = {r: 0 for r in ranks}, {r: 0.0 for r in ranks}, {r: 0.0 for r in ranks}
    live = {r: {} for r in ranks}
    peak = {r: 0.0 for r in ranks}
    in_flight = {r: {} for r in ranks}

    def deps(p) -> list[tuple]:
        s, k, m = p.stage_index, p.computation_type.value, p.microbatch_index
        if k == "F":
            return [(s - 1, "F", m)] if s > 0 else []
        if k in ("I", "B"):
            return [(s + 1, "B", m)] if s < n_stages - 1 else [(s, "F", m)]
        return [(s, "B", m)]

    cost = {"F": costs.F, "B": costs.B, "I": [b - w for b, w in zip(costs.B, costs.W)], "W": costs.W}

    def duration(a) -> float:
        parts = _parts(a)
        d = sum(cost[p.computation_type.value][p.stage_index] for p in parts)
        return d * costs.fb if len(parts) > 1 else d

    def account(r: int, a) -> None:  # activations: allocate at F, free when the backward is complete
        for p in _parts(a):
            s, k = p.stage_index, p.computation_type.value
            if k == "F":
                live[r][s] = live[r].get(s, 0) + 1
                in_flight[r][s] = max(in_flight[r].get(s, 0), live[r][s])
                peak[r] = max(peak[r], sum(n * act_bytes[t] for t, n in live[r].items()))
        for p in _parts(a):
            if p.computation_type.value in ("B", "W"):
                live[r][p.stage_index] -= 1

    remaining = sum(len(v) for v in table.values())
    while remaining:
        progress = False
        for r in ranks:
            while pos[r] < len(table[r]):
                a = table[r][pos[r]]
                need = [d for p in _parts(a) for d in deps(p)]
                if not all(d in done for d in need):
                    break
                start = max([free[r]] + [done[d] for d in need])
                dt = duration(a)
                free[r] = start + dt
                busy[r] += dt
                for p in _parts(a):
                    done[(p.stage_index, kinds[p.computation_type.value], p.microbatch_index)] = free[r]
                account(r, a)
                pos[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = {r: str(table[r][pos[r]]) for r in ranks if pos[r] < len(table[r])}
            raise AssertionError(f"the schedule's table deadlocks: next actions {stuck}")
    return Simulation(max(free.values()), [busy[r] for r in ranks], [peak[r] for r in ranks],
                      [in_flight[r] for r in ranks])


def formula_bubble(schedule: str, ranks: int, F: float, B: float, W: float, FB: float) -> float | None:
    """The closed forms of the report's Table 2 for chunk costs F, B (full backward), W and F&B, with PP the
    number of pipeline STAGES as DualPipe's README states it: 1F1B and ZB1P have one stage per rank;
    DualPipeV two (PP = 2 x ranks); the report's bidirectional DualPipe runs PP stages on PP ranks, each rank
    holding two chunks (two model copies). Interleaved 1F1B is Megatron-LM's (ranks-1)(F+B) with per-chunk
    costs; ZB-V has no closed form there."""
    if schedule in ("1f1b", "interleaved1f1b"):
        return (ranks - 1) * (F + B)
    if schedule == "zb1p":
        return (ranks - 1) * (F + B - 2 * W)
    if schedule == "dualpipev":
        stages = 2 * ranks
        return (stages / 2 - 1) * (FB + B - 3 * W)
    if schedule == "dualpipe":
        return (ranks / 2 - 1) * (FB + B - 3 * W)
    return None


# ---- F, B, W measured on a scaled-down block ------------------------------------------------------------------

@dataclass
class BlockCosts:
    """Seconds per micro-batch for one MoE block: forward, full backward (= I + W), weight-gradient part."""

    F: float
    B: float
    W: float
    FB: float | None = None  # an overlapped forward and backward; None: F + B (compute does not overlap)
    source: str = "given"

    @property
    def fb_ratio(self) -> float:
        return 1.0 if self.FB is None else self.FB / (self.F + self.B)


def scaled_config(cfg: ModelConfig, seq_len: int) -> tuple[ModelConfig, int, int]:
    """A block small enough for this CPU with the compute mix of the real one: widths and heads divided by s
    (Linear FLOPs per token fall by s^2), the sequence by s too (attention's share, ~T H dh / d^2, stays),
    per-head dims, top-k and groups kept; routed experts halved while the groups still hold top-k. -> (config,
    s, tokens)."""
    s = 1
    while s < 16 and cfg.hidden_size // (2 * s) >= 64 and cfg.num_attention_heads % (2 * s) == 0 \
            and seq_len // (2 * s) >= 64:
        s *= 2
    E, K, G, keep = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    while E and E > 32 and E % 2 == 0 and (E // 2) % G == 0 and keep * (E // 2 // G) >= K:
        E //= 2
    small = cfg.replace(
        hidden_size=cfg.hidden_size // s, num_attention_heads=cfg.num_attention_heads // s,
        intermediate_size=max(1, cfg.intermediate_size // s),
        moe_intermediate_size=max(1, cfg.moe_intermediate_size // s),
        q_lora_rank=None if cfg.q_lora_rank is None else max(1, cfg.q_lora_rank // s),
        kv_lora_rank=max(1, cfg.kv_lora_rank // s), n_routed_experts=E, quantization_config=None,
        num_nextn_predict_layers=0)
    return small, s, seq_len // s


def measure_block_costs(cfg: ModelConfig, seq_len: int, repeats: int = 7, seed: int = 0) -> BlockCosts:
    """Time one MoE block's forward, input-gradient and weight-gradient backward (torch.distributed.pipelining's
    own split, stage_backward_input / stage_backward_weight, as ZBV and DualPipeV run I and W) on a scaled
    copy (`scaled_config`), FP32 on this CPU; the fastest of `repeats` after two warm-ups (on a shared machine
    the other processes only ever add time)."""
    from ..model.model import Block, RotaryEmbedding

    small, s, T = scaled_config(cfg, seq_len)
    layer = next(i for i in range(small.num_hidden_layers + 1) if small.is_moe_layer(i)) \
        if small.n_routed_experts else 0
    g = torch.Generator().manual_seed(seed)
    block = Block(small, layer)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else 0.02 * torch.randn(p.shape, generator=g))
    freqs = RotaryEmbedding(small)(torch.arange(T))
    x0 = torch.randn(1, T, small.hidden_size, generator=g)
    dy = torch.randn(1, T, small.hidden_size, generator=g)
    times: dict[str, list[float]] = {"F": [], "I": [], "W": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ratios are what count; one thread does not stall on a core another process holds
    try:
        for i in range(repeats + 2):
            _time_block(block, x0, dy, freqs, times if i >= 2 else None)
    finally:
        torch.set_num_threads(threads)
    F, I, W = (min(times[k]) for k in "FIW")
    from ..bench import machine_line

    desc = (f"measured on this CPU: one MoE block at 1/{s} width ({small.hidden_size} wide, "
            f"{small.num_attention_heads} heads, {small.n_routed_experts} experts of {small.moe_intermediate_size}, "
            f"top-{small.num_experts_per_tok}), {T} tokens, FP32, one thread, fastest of {repeats}; {machine_line()}")
    return BlockCosts(F, I + W, W, None, desc)


def _time_block(block: nn.Module, x0: torch.Tensor, dy: torch.Tensor, freqs: torch.Tensor,
                times: dict[str, list[float]] | None) -> None:
    """One forward, backward for the input, backward for the weights, as a ZB/DualPipeV schedule splits them."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    block.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    t0 = time.perf_counter()
    y = block(x, freqs)
    t1 = time.perf_counter()
    _, groups = stage_backward_input([y], [dy], [x], block.parameters())
    t2 = time.perf_counter()
    stage_backward_weight(block.parameters(), groups)
    t3 = time.perf_counter()
    if times is not None:
        for k, v in zip("FIW", (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(v)


def parse_costs(text: str) -> BlockCosts:
    """"F,B,W" or "F,B,W,FB" (any unit; B the full backward, W its weight part, FB an overlapped pair)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (3, 4) or any(v < 0 for v in vals) or vals[0] <= 0:
        raise ValueError(f"--costs {text!r}: expected F,B,W or F,B,W,FB, non-negative numbers, F > 0")
    F, B, W = vals[:3]
    if W > B:
        raise ValueError(f"--costs {text!r}: W={W} is part of the full backward B={B}, so W <= B")
    return BlockCosts(F, B, W, vals[3] if len(vals) == 4 else None, "given with --costs")


# ---- the plan ----------------------------------------------------------------------------------------------

def plan(cfg: ModelConfig, layout: Layout, costs: BlockCosts | None = None) -> dict:
    """Every figure of `dsv3 plan`, as a JSON-able dict. costs: None measures them on this CPU."""
    from ..model.model import DeepSeekV3

    layout.check(cfg)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = DeepSeekV3(cfg)
    placement = stage_to_rank(layout)
    ranges = split_layers(cfg, layout.n_stages, layout.seq_len, placement, layout.layer_split)
    facts, tables, notes = fake_cluster(cfg, layout, placement)
    costs = costs or measure_block_costs(cfg, layout.seq_len)

    act = [stage_activation_bytes(cfg, layout, s, r) for s, r in enumerate(ranges)]
    sim = simulate(tables[layout.schedule][1], layout.n_stages, stage_costs(cfg, layout, ranges, costs), act)
    largest = largest_layer_elements(model, layout)
    ranks = []
    for r, rp in enumerate(params_per_rank(model, layout, ranges, placement)):
        st = state_bytes(rp, layout, largest)
        stages = [s for s in range(layout.n_stages) if placement[s] == r]
        ranks.append({"rank": r, "stages": stages, "layers": [_layers(ranges[s]) for s in stages],
                      "params": asdict(rp) | {"per_gpu": rp.total}, **st, "activations": sim.peak_activation[r],
                      "in_flight": {str(s): sim.in_flight[r].get(s, 0) for s in stages},
                      "moe_layers": sum(_moe_layers(cfg, layout, s, ranges[s]) for s in stages),
                      "total": sum(st.values()) + sim.peak_activation[r]})
    unit = _mean_block_flops(cfg, layout.seq_len)

    def rows(cached: list[Cached]) -> list[dict]:
        return [asdict(c) | {"bytes_per_token": c.per_token(cfg, layout.tp)} for c in cached]
    return {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "main": cfg.num_params(include_mtp=False),
                  "active_per_token": cfg.num_active_params(), "layers": cfg.num_hidden_layers,
                  "mtp_depth": cfg.num_nextn_predict_layers},
        "layout": asdict(layout) | {"dp": layout.dp, "dp_mod_ep": layout.dp_mod_ep, "n_stages": layout.n_stages,
                                    "micro_batches": layout.micro_batches, "tokens_per_micro_batch": layout.tokens},
        "mesh": facts,
        "stages": [{"stage": s, "rank": placement[s], "layers": _layers(r), "embedding": s == 0,
                    "head_and_mtp": s == layout.n_stages - 1,
                    "blocks_of_flops": _stage_flops(cfg, layout, s, r) / unit,
                    "activation_bytes_per_micro_batch": act[s]} for s, r in enumerate(ranges)],
        "ranks": ranks,
        "worst_rank": max(ranks, key=lambda x: x["total"])["rank"],
        "activation_rows": {kind: rows(layer_cache(cfg, i, layout.precision)) for kind, i in _layer_kinds(cfg).items()}
        | {"tail": rows(tail_cache(cfg))},
        "all_to_all": all_to_all(cfg, layout, facts["ep"]["ranks"], max(r["moe_layers"] for r in ranks))
        if cfg.n_routed_experts else None,
        "costs": asdict(costs),
        "bubble": bubble_rows(cfg, costs, tables, layout),
        "notes": notes,
        "assumptions": ASSUMPTIONS,
        "report": REPORT,
    }


def fake_cluster(cfg: ModelConfig, layout: Layout, placement: dict[int, int]) -> tuple[dict, dict, list[str]]:
    """On a fake process group of layout.gpus ranks: the mesh's facts, and the action table of every schedule
    (the chosen one must exist; another that cannot run this layout keeps its reason). -> (facts,
    {schedule: (its layout, its table or the reason)}, notes)."""
    with fake_world(layout.gpus):
        dims = build_mesh(layout)
        pp_group = dims["pp"].get_group()
        table, notes = schedule_table(layout, pp_group, placement)
        tables = {layout.schedule: (layout, table)}
        for name in SCHEDULES:
            if name != layout.schedule:
                other = Layout(**{**asdict(layout), "schedule": name})
                try:
                    other.check(cfg)
                    tab, more = schedule_table(other, pp_group, stage_to_rank(other))
                    tables[name] = (other, tab)
                    notes += [n for n in more if n not in notes]
                except ValueError as e:
                    tables[name] = (other, str(e))
        return mesh_facts(dims, layout), tables, notes


def _moe_layers(cfg: ModelConfig, layout: Layout, stage: int, layers: range) -> int:
    """MoE layers on a stage, the MTP blocks' on the last."""
    n = sum(cfg.is_moe_layer(i) for i in layers)
    if stage == layout.n_stages - 1:
        n += sum(cfg.is_moe_layer(cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
    return n


def _layers(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def _layer_kinds(cfg: ModelConfig) -> dict[str, int]:
    kinds = {}
    for i in range(cfg.num_hidden_layers):
        kinds.setdefault("moe" if cfg.is_moe_layer(i) else "dense", i)
    return kinds


def _mean_block_flops(cfg: ModelConfig, seq_len: int) -> float:
    """The unit of stage costs: the forward FLOPs of an MoE block (a dense one if the model has none)."""
    return block_flops(cfg, _layer_kinds(cfg).get("moe", 0), seq_len)


def _model_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model, MTP modules included."""
    return sum(block_flops(cfg, i, seq_len) for i in range(cfg.num_hidden_layers)) + tail_flops(cfg, seq_len)


def _stage_flops(cfg: ModelConfig, layout: Layout, s: int, layers: range) -> float:
    f = sum(block_flops(cfg, i, layout.seq_len) for i in layers)
    return f + (tail_flops(cfg, layout.seq_len) if s == layout.n_stages - 1 else 0.0)


def stage_costs(cfg: ModelConfig, layout: Layout, ranges: list[range], c: BlockCosts,
                uniform: bool = False) -> StageCosts:
    """Each stage's F, B, W: the block's costs times the stage's forward FLOPs in MoE blocks (the head's and
    the MTP modules' backward taken in the block's proportions); uniform: every stage the mean."""
    unit = _mean_block_flops(cfg, layout.seq_len)
    eq = [_stage_flops(cfg, layout, s, r) / unit for s, r in enumerate(ranges)]
    if uniform:
        eq = [sum(eq) / len(eq)] * len(eq)
    return StageCosts([c.F * e for e in eq], [c.B * e for e in eq], [c.W * e for e in eq], c.fb_ratio)


def bubble_rows(cfg: ModelConfig, c: BlockCosts, tables: dict, chosen: Layout) -> list[dict]:
    """Per schedule: the bubble simulated on torch's table with every stage the mean stage (what Table 2's
    formulas assume), beside the formula, and the step with each stage's own cost; in units of a block's F."""
    c = BlockCosts(1.0, c.B / c.F, c.W / c.F, None if c.FB is None else c.FB / c.F, c.source)
    rows = []
    for name in SCHEDULES:
        lay, tab = tables[name]
        row = {"schedule": name, "stages": lay.n_stages, "chosen": name == chosen.schedule}
        if isinstance(tab, str):
            rows.append(row | {"error": tab})
            continue
        rng = split_layers(cfg, lay.n_stages, lay.seq_len, stage_to_rank(lay), lay.layer_split)
        uni, real = stage_costs(cfg, lay, rng, c, uniform=True), stage_costs(cfg, lay, rng, c)
        zero = [0.0] * lay.n_stages
        s_uni, s_real = simulate(tab, lay.n_stages, uni, zero), simulate(tab, lay.n_stages, real, zero)
        F, B, W = uni.F[0], uni.B[0], uni.W[0]
        FB = (F + B) * c.fb_ratio
        rows.append(row | {"chunk": {"F": F, "B": B, "W": W, "FB": FB},
                           "formula": formula_bubble(name, lay.pp, F, B, W, FB),
                           "simulated": s_uni.bubble, "step": s_uni.step, "idle_share": s_uni.idle_share,
                           "split": {"step": s_real.step, "idle_share": s_real.idle_share,
                                     "busiest_rank_busy": max(s_real.busy)}})
    # the report's DualPipe: bidirectional, PP ranks each holding two chunks of 1/PP of the model (two copies)
    pp, seq = chosen.pp, chosen.seq_len
    F = _model_flops(cfg, seq) / _mean_block_flops(cfg, seq) / pp
    B, W = F * c.B, F * c.W
    FB = (F + B) * c.fb_ratio
    rows.append({"schedule": "dualpipe (report)", "stages": pp, "chosen": False,
                 "chunk": {"F": F, "B": B, "W": W, "FB": FB}, "formula": formula_bubble("dualpipe", pp, F, B, W, FB),
                 "note": "bidirectional, two model copies: formula only (torch has no such schedule)"})
    return rows


ASSUMPTIONS = [
    "Weights BF16 on every dp rank (ZeRO-1/2) for the FP8/BF16 GEMMs; gradients FP32 (§3.3.3: 'gradients (used "
    "for batch size accumulation) ... retained in FP32'); optimizer: FP32 master + BF16 AdamW moments (§3.3.3), "
    "sharded over dp (dense) and dp_mod_ep (routed experts). ZeRO-3 adds the two largest gathered layers.",
    "Activations: the tensors listed per layer, with RMSNorm and the MLA up-projections recomputed (§3.2.3); "
    "under fp8, Linear inputs cached in FP8 with 1x128 FP32 scales, o_proj's in E5M6, the routed SwiGLU output "
    "recomputed (§3.3.2); dense and shared-expert SwiGLU inputs in BF16 (as dsv3's quant/training.py). Not "
    "counted: temporary buffers (all-to-all, recomputation, attention's working memory), allocator "
    "fragmentation, the CUDA context. The cross-entropy's FP32 logits are counted (a fused cross-entropy would "
    "not keep them). Routing balanced: each GPU's experts receive K copies of its tokens.",
    "Stages: at least one layer each; the embedding on the first, the final norm, head and MTP modules on the "
    "last, with a copy of the embedding there for MTP unless the first and last stage share a rank (the V).",
    "Micro-batches in flight: from the schedule's table, a micro-batch's activations live from its F to the end "
    "of its backward (B, or W when split).",
    "Stage costs: the measured block's F, B, W times the stage's forward FLOPs in MoE blocks; point-to-point "
    "sends take no time; F&B = F + B unless --costs gives it (the overlap hides communication, not compute).",
    "All-to-all: balanced routing; IB bytes for the worst case (every one of the at most N target nodes remote) "
    "and the mean (target nodes uniform over the EP group's); times at the report's 50 GB/s IB per GPU.",
]


# ---- printing ------------------------------------------------------------------------------------------------

def _gib(b: float) -> str:
    g = b / GiB
    return f"{g:.1f}" if g >= 0.95 else f"{g:.3g}"


def format_plan(p: dict, gpu_gib: float) -> str:
    """The console report: layout, stages, memory per GPU, activations, all-to-all, bubble, verdict."""
    sections = (_fmt_header(p), _fmt_stages(p), _fmt_memory(p, gpu_gib), _fmt_activations(p),
                _fmt_all_to_all(p), _fmt_bubble(p), _fmt_footer(p, gpu_gib))
    return "\n\n".join("\n".join(lines) for lines in sections if lines)


def _fmt_header(p: dict) -> list[str]:
    lay, m, mesh = p["layout"], p["model"], p["mesh"]
    groups = "; ".join(f"{d} {mesh[d]['ranks_of_rank0']} ({mesh[d]['nodes']} node{'s' * (mesh[d]['nodes'] > 1)})"
                       for d in ("ep", "dp", "pp"))
    layout = Layout(**{k: lay[k] for k in Layout.__dataclass_fields__})
    return [f"dsv3 plan: {m['main'] / 1e9:.1f}B parameters + {(m['parameters'] - m['main']) / 1e9:.1f}B in "
            f"{m['mtp_depth']} MTP module(s), {m['active_per_token'] / 1e9:.1f}B active per token, on "
            f"{lay['gpus']} GPUs",
            f"layout: {layout.describe()}; {lay['n_stages']} stages, layers split {lay['layer_split']}; "
            f"precision {lay['precision']}",
            "mesh (fake process group): " + " x ".join(f"{k} {v}" for k, v in mesh["shape"].items())
            + f"; rank 0's groups: {groups}",
            f"batch: {lay['global_batch']} sequences x {lay['seq_len']} tokens per step; {lay['micro_batches']} "
            f"micro-batches of {lay['micro_batch_size']} x {lay['seq_len']} per pipeline"]


def _fmt_stages(p: dict) -> list[str]:
    out = ["stages (forward FLOPs per token, in MoE blocks):"]
    for s in p["stages"]:
        what = "embedding + " * s["embedding"] + f"layers {s['layers']}" + " + head + MTP" * s["head_and_mtp"]
        out.append(f"  stage {s['stage']:>2} on rank {s['rank']:>2}: {what:<34} {s['blocks_of_flops']:5.2f}   "
                   f"activations {_gib(s['activation_bytes_per_micro_batch'])} GiB per micro-batch")
    return out


def _fmt_memory(p: dict, gpu_gib: float) -> list[str]:
    lay = p["layout"]
    out = [f"memory per GPU (GiB), {lay['schedule']}, ZeRO-{lay['zero']}:",
           f"  {'rank':>4} {'stages':>7} {'params/GPU':>10} {'weights':>8} {'grads':>7} {'optim':>7} "
           f"{'activations (mb in flight)':>27} {'total':>7}  of {gpu_gib:g}"]
    for r in p["ranks"]:
        n = r["params"]["per_gpu"]
        n = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        flight = "+".join(str(v) for v in r["in_flight"].values())
        out.append(f"  {r['rank']:>4} {','.join(map(str, r['stages'])):>7} {n:>10} {_gib(r['weights']):>8} "
                   f"{_gib(r['grads']):>7} {_gib(r['optimizer']):>7} {_gib(r['activations']):>19} ({flight:>5}) "
                   f"{_gib(r['total']):>7}  {r['total'] / (gpu_gib * GiB):4.0%}"
                   + "  <- worst" * (r["rank"] == p["worst_rank"]))
    return out


def _fmt_activations(p: dict) -> list[str]:
    out = [f"activations kept per token and layer ({p['layout']['precision']}; bytes):"]
    for kind, rows in p["activation_rows"].items():
        out.append(f"  {kind}: {sum(c['bytes_per_token'] for c in rows):,.0f} bytes per token")
        out += [f"    {c['what']:<78} {c['bytes_per_token']:>10,.0f}" for c in rows]
    return out


def _fmt_all_to_all(p: dict) -> list[str]:
    a = p["all_to_all"]
    if not a:
        return []
    out = [f"all-to-all per GPU, per micro-batch ({a['tokens']} tokens) and MoE layer: each token to "
           f"{a['experts_per_token']} experts on at most {a['max_nodes_per_token']} of the EP group's "
           f"{a['ep_nodes']} nodes"]
    for name in ("dispatch", "combine"):
        d = a[name]
        dtype = "FP8 + scales" if d["bytes_per_element"] < BF16 else "BF16"
        out.append(f"  {name:<8} ({dtype:<12}): {d['payload'] / 1e6:8.1f} MB to experts; over IB "
                   f"{d['ib_worst'] / 1e6:.1f} MB worst, {d['ib_mean'] / 1e6:.1f} MB mean")
    return out + [
        "  backward mirrors both: output gradients go out as dispatch does, input gradients come back as combine does",
        f"  per MoE layer, forward + backward: {a['ib_ms_per_layer_fwd_bwd']:.1f} ms of IB at {IB_GBPS} GB/s (worst "
        f"case), {a['nvlink_ms_per_layer_fwd_bwd']:.1f} ms of NVLink at {NVLINK_GBPS} GB/s (every copy once); per "
        f"step, {a['moe_layers_on_rank']} MoE layers x {p['layout']['micro_batches']} micro-batches: "
        f"{a['per_step_payload'] / 1e12:.2f} TB"]


def _fmt_bubble(p: dict) -> list[str]:
    lay, c = p["layout"], p["costs"]
    fb = "F + B" if c["FB"] is None else f"{c['FB'] / c['F']:.2f}"
    source = (f"  (given with --costs: {c['F']:g}, {c['B']:g}, {c['W']:g})" if c["source"] == "given with --costs"
              else textwrap.fill(f"({c['source']}; F = {c['F'] * 1e3:.2f} ms)", 110, initial_indent="  ",
                                 subsequent_indent="   "))
    out = [f"pipeline bubble, {lay['pp']} ranks, {lay['micro_batches']} micro-batches; per MoE block F = 1, "
           f"B = {c['B'] / c['F']:.2f} (full backward), W = {c['W'] / c['F']:.2f}, F&B = {fb}", source,
           "  in units of one block's F. formula: Table 2 with the mean stage's chunk costs; simulated: torch's "
           "table, every stage the mean stage;",
           "  this split: the same table with the stages above (rank loads differ: idle includes the imbalance)",
           f"  {'schedule':<18} {'stages':>6} {'formula':>8} {'simulated':>10} {'step':>8} {'bubble':>7}"
           f" | {'this split: step':>16} {'idle':>6}"]
    for row in p["bubble"]:
        name = row["schedule"] + " *" * row["chosen"]
        f = "-" if row.get("formula") is None else f"{row['formula']:.1f}"
        if "error" in row:
            out.append(f"  {name:<18} {row['stages']:>6}  n/a: {row['error']}")
        elif "simulated" not in row:
            out.append(f"  {name:<18} {row['stages']:>6} {f:>8}   ({row['note']})")
        else:
            out.append(f"  {name:<18} {row['stages']:>6} {f:>8} {row['simulated']:>10.1f} {row['step']:>8.1f} "
                       f"{row['simulated'] / row['step']:>7.1%} | {row['split']['step']:>16.1f} "
                       f"{row['split']['idle_share']:>6.1%}")
    return out + ["  * the chosen schedule (memory above)"]


def _fmt_footer(p: dict, gpu_gib: float) -> list[str]:
    w = next(r for r in p["ranks"] if r["rank"] == p["worst_rank"])
    verdict = "fits" if w["total"] <= gpu_gib * GiB else "does NOT fit"
    out = [f"worst GPU: rank {w['rank']} (stages {', '.join(map(str, w['stages']))}): {_gib(w['total'])} GiB of "
           f"{gpu_gib:g}: {verdict}", "the V3 report states (arXiv 2412.19437):"]
    out += [f"  {k}: {v}" for k, v in p["report"].items()]
    out += [textwrap.fill(f"note: {n}", 110, subsequent_indent="  ") for n in p["notes"]]
    return out + ["assumptions:"] + [textwrap.fill(a, 110, initial_indent="  - ", subsequent_indent="    ")
                                     for a in p["assumptions"]]


# ---- command line --------------------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="671B", choices=sorted(PRESETS), help="model (default 671B)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="a config.json (or its directory) instead of --preset, e.g. a V3-architecture checkpoint's")
    g = p.add_argument_group("layout")
    g.add_argument("--gpus", type=int, required=True, help="world size: pp x dp x tp")
    g.add_argument("--pp", type=int, default=1, help="pipeline ranks (default 1)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel degree, taken from dp: divides dp (default 1)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1; V3 used none)")
    g.add_argument("--zero", type=int, default=1, choices=(1, 2, 3),
                   help="1: optimizer states sharded over dp (V3); 2: and gradients; 3: and weights (default 1)")
    g.add_argument("--pp-schedule", default="dualpipev", choices=list(SCHEDULES),
                   help="torch.distributed.pipelining schedule whose table sets the activations in flight "
                        "(default dualpipev); the others' bubbles are printed beside it")
    g.add_argument("--layer-split", default="balanced", choices=["balanced", "even"],
                   help="layers per stage: balanced by forward FLOPs (the head and MTP modules weigh ~3.9 MoE "
                        "blocks in V3), or even by count as dsv3 train's pipeline splits them (default balanced)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="for the nodes an EP group spans (default 8)")
    g.add_argument("--gpu-memory", type=float, default=80, metavar="GIB",
                   help="memory per GPU in GiB, the bar the totals are held to (default 80: an H800's 80 GB)")
    g = p.add_argument_group("batch and precision")
    g.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    g.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096, V3's)")
    g.add_argument("--global-batch", type=int, default=15360, help="sequences per step (default 15360, V3's)")
    g.add_argument("--precision", default="fp8", choices=["fp8", "bf16"],
                   help="fp8: V3's FP8 activation caching and FP8 dispatch (§3.3); bf16: all BF16 (default fp8)")
    g = p.add_argument_group("pipeline costs and output")
    g.add_argument("--costs", default=None, metavar="F,B,W[,FB]",
                   help="per-block costs, any unit: forward, FULL backward, its weight-gradient part, and "
                        "optionally an overlapped forward+backward (default F+B). Default: measured on this CPU "
                        "on a scaled-down block (a few seconds)")
    g.add_argument("--json", default=None, metavar="FILE", help="also write every figure here (atomically)")


def main(args: argparse.Namespace) -> dict:
    cfg = ModelConfig.from_hf(args.config) if args.config else ModelConfig.preset(args.preset)
    layout = Layout(gpus=args.gpus, pp=args.pp, ep=args.ep, tp=args.tp, zero=args.zero, schedule=args.pp_schedule,
                    micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, global_batch=args.global_batch,
                    precision=args.precision, gpus_per_node=args.gpus_per_node, layer_split=args.layer_split)
    if args.gpu_memory <= 0:
        raise ValueError(f"--gpu-memory {args.gpu_memory}: must be positive (GiB)")
    costs = parse_costs(args.costs) if args.costs else None
    result = plan(cfg, layout, costs)
    result["gpu_memory_gib"] = args.gpu_memory
    print(format_plan(result, args.gpu_memory))
    if args.json:
        from ..ckpt.io import atomic_write_text  # a temporary name, flushed, then renamed
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return result
