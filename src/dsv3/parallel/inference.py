"""Model-parallel inference under torchrun, laid out as the official demo runs V3 across GPUs:

    torchrun --nproc-per-node 2 -m dsv3 generate --model DIR --tp 2 ...    (or --ep 2, or both)

Tensor parallelism (--tp N, N the world size) splits what every token computes:
    MLA's heads           wq_b (or wq) and wkv_b by rows (each process's H/N heads), wo by columns; the
                          partial outputs of wo are all-reduced. The latent cache is the same on every
                          process (the latent and the rotary key come from the replicated wkv_a): each
                          keeps it whole, as every head reads all of it.
    dense MLP, shared     w1, w3 by rows, w2 by columns, all-reduced after w2
    experts
    embedding             by vocabulary rows: each process looks up the ids in its range, zeros the rest,
                          and the rows are all-reduced
    head                  by vocabulary rows: the logits' slices are all-gathered
Expert parallelism (--ep N) gives each process E/N routed experts; every process routes every token (all
hold the same tokens: the demo's layout, not training's all-to-all), computes its experts' share and the
shares are all-reduced. What stays whole on every process: wq_a, wkv_a, the norms, the gate, eh_proj.

Loading (`Sharding`, passed to load_pretrained): the split tensors take their local shapes on the meta device
and each process reads only its slices: its experts' tensors, row slices by a ranged read, column slices cut
from the whole tensor as it streams by. FP8 weights stay FP8 (slices on 128-row/column block boundaries).

Running: rank 0 owns the engine (scheduler, sampler, speculation, the HTTP server) and alone prints and
writes. Its runner is a `LockstepRunner`: each call (forward, forward_mtp, logits, mtp_logits, a cache move)
is first broadcast to the other ranks, whose `serve_worker` loop makes the same call on their own runner and
model, so every collective inside the forward meets its partners. The other ranks' engines never schedule.

Collectives per token and layer under TP: two all-reduces of (N, D) (after wo and after w2, or after the
shared experts' w2 and the routed experts under EP as well). Numerics: the partial sums are added in another
order than one process's single GEMM, so outputs equal one process's within rounding (float32: ~1e-6
relative), and greedy tokens are the same unless two candidates tie to within that.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..model.layers import Linear
from ..model.model import DeepSeekV3
from ..model.moe import MoE, TokenDispatcher
from ..quant import fp8 as fp8q

# TP splits, by the last parts of our parameter names (main blocks and MTP blocks alike)
_ROWS = {("attn", "wq"), ("attn", "wq_b"), ("attn", "wkv_b"), ("ffn", "w1"), ("ffn", "w3"),
         ("shared_experts", "w1"), ("shared_experts", "w3")}
_COLS = {("attn", "wo"), ("ffn", "w2"), ("shared_experts", "w2")}


class Sharding:
    """Which part of each tensor this process holds, for `load_pretrained(..., shard=)` and `install`."""

    def __init__(self, config: ModelConfig, rank: int, world: int, tp: int = 1, ep: int = 1,
                 placement: torch.Tensor | None = None):
        """placement (MoE layers, P): the logical expert of each physical expert slot, P = experts + redundant
        ones, slots [r * P/ep, (r+1) * P/ep) on EP rank r (parallel/eplb.py's phy2log). Default: no redundant
        experts, expert e in slot e."""
        check_layout(config, world, tp, ep)
        self.config, self.rank, self.world, self.tp, self.ep = config, rank, world, tp, ep
        self.tp_rank = rank if tp > 1 else 0
        self.ep_rank = rank if ep > 1 else 0
        E = config.n_routed_experts or 0
        n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers))
        if placement is None:
            placement = torch.arange(E).expand(n_moe, E)
        check_placement(placement, n_moe, E, ep)
        self.placement = placement.clone()
        self._cuts: dict[str, tuple[int, int, int]] = {}  # our name -> (dim, lo, hi) in the whole tensor
        self._moe: dict[str, int] = {}  # an MoE module's name -> its index among the MoE layers

    @property
    def slots(self) -> range:
        """This rank's physical expert slots."""
        S = self.placement.shape[1] // self.ep
        return range(self.ep_rank * S, (self.ep_rank + 1) * S)

    def held(self, layer: int) -> list[int]:
        """The logical expert in each of this rank's slots of MoE layer `layer`."""
        return self.placement[layer, self.slots.start: self.slots.stop].tolist()

    def _layer_of(self, name: str) -> int:
        return self._moe[name.split(".experts.")[0]]

    def experts_of(self, name: str) -> list[int]:
        """The logical experts whose weights this rank reads for an experts tensor (`...ffn.experts.w1`)."""
        return sorted(set(self.held(self._layer_of(name))))

    def local_expert(self, name: str, e: int) -> int:
        """The first of this rank's slots holding logical expert e (`fill_replicas` copies it to the others)."""
        return self.held(self._layer_of(name)).index(e)

    def fill_replicas(self, model: DeepSeekV3) -> None:
        """After loading: a logical expert held in several of this rank's slots is copied from its first one."""
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                held = self.held(self._moe[name])
                for slot, e in enumerate(held):
                    first = held.index(e)
                    if first != slot:
                        for t in expert_tensors(module.experts):
                            t[slot].copy_(t[first])

    def split_dim(self, name: str) -> int | None:
        """The dimension of a parameter (or its FP8 scale) split over TP, or None when whole everywhere."""
        if self.tp == 1:
            return None
        base = name.removesuffix("_scale_inv").removesuffix(".weight").removesuffix(".bias")
        if base in ("embed", "head"):
            return 0 if name.endswith(("weight", "weight_scale_inv")) else None
        if name.endswith(".bias"):  # a row-split layer's bias is split with its rows; a column-split one's whole
            return 0 if tuple(base.split(".")[-2:]) in _ROWS else None
        key = tuple(base.split(".")[-2:])
        return 0 if key in _ROWS else 1 if key in _COLS else None

    def cut(self, name: str) -> tuple[int, int, int] | None:
        """(dim, lo, hi): this process's slice of the whole tensor, for the names `shrink` split."""
        return self._cuts.get(name)

    def full_size(self, name: str, local: int) -> int:
        return local * self.tp

    def shrink(self, model: DeepSeekV3) -> None:
        """Give the split tensors of a model on the meta device their local shapes (before to_empty). An FP8
        projection whose slice would cut its 128x128 scale blocks is held dequantised instead (in the model's
        dtype: the values one process computes from it), since its blocks cannot be split."""
        dtype = model.embed.weight.dtype
        for name, module in model.named_modules():
            if isinstance(module, Linear) and module.is_fp8:
                dim = self.split_dim(f"{name}.weight")
                if dim is not None and (module.weight.shape[dim] // self.tp) % fp8q.BLOCK:
                    module.weight = nn.Parameter(torch.empty(module.weight.shape, dtype=dtype, device="meta"),
                                                 requires_grad=False)
                    module.weight_scale_inv = None
        self._moe = {name: j for j, name in enumerate(n for n, m in model.named_modules() if isinstance(m, MoE))}
        tensors = [(n, t, False) for n, t in model.named_parameters()] + \
                  [(n, t, True) for n, t in model.named_buffers() if t is not None]
        for name, t, is_buffer in tensors:
            shape = list(t.shape)
            if ".experts.w" in name:
                shape[0] = len(self.slots)
            dim = None if ".experts.w" in name else self.split_dim(name)
            if dim is not None:
                if shape[dim] % self.tp:
                    raise ValueError(f"{name} has {shape[dim]} {'rows' if dim == 0 else 'columns'}: not divisible "
                                     f"by --tp {self.tp}")
                local = shape[dim] // self.tp
                shape[dim] = local
                self._cuts[name] = (dim, self.tp_rank * local, (self.tp_rank + 1) * local)
            if shape == list(t.shape):
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            new = torch.empty(shape, dtype=t.dtype, device="meta")
            if is_buffer:
                module._buffers[leaf] = new
            else:
                module._parameters[leaf] = nn.Parameter(new, requires_grad=t.requires_grad)
        for module in model.modules():
            if isinstance(module, MoE):
                module.experts.n_experts = len(self.slots)
        if model.config.tie_word_embeddings:
            model.head.weight = model.embed.weight


def check_placement(placement: torch.Tensor, n_moe: int, E: int, ep: int) -> None:
    if placement.dim() != 2 or placement.shape[0] != n_moe or placement.shape[1] < E or placement.shape[1] % ep:
        raise ValueError(f"an expert placement must be (MoE layers = {n_moe}, slots >= {E} experts, a multiple of "
                         f"--ep {ep}); got {tuple(placement.shape)}")
    counts = torch.zeros(n_moe, E, dtype=torch.int64).scatter_add_(1, placement.long(),
                                                                   torch.ones_like(placement, dtype=torch.int64))
    if (counts == 0).any():
        raise ValueError("an expert placement must hold every expert at least once in every layer")


def expert_tensors(experts) -> list[torch.Tensor]:
    """An Experts module's stacked per-expert tensors (weights and, for FP8, their scales)."""
    return [t for t in (experts.w1, experts.w2, experts.w3, experts.w1_scale_inv, experts.w2_scale_inv,
                        experts.w3_scale_inv) if t is not None]


def check_layout(config: ModelConfig, world: int, tp: int, ep: int) -> None:
    """Raise ValueError unless tp and ep are each 1 or the world size (and not both 1 on several processes),
    and the model's sizes divide."""
    for name, n in (("--tp", tp), ("--ep", ep)):
        if n not in (1, world):
            raise ValueError(f"{name} {n}: expected 1 or the number of processes ({world}); each process holds "
                             "1/N of the heads (--tp N) and of the experts (--ep N)")
    if world > 1 and tp == ep == 1:
        raise ValueError(f"{world} processes: pass --tp {world} (heads and vocabulary split), --ep {world} "
                         "(experts split), or both")
    if ep > 1 and (not config.n_routed_experts or config.n_routed_experts % ep):
        raise ValueError(f"--ep {ep} needs n_routed_experts divisible by {ep}; the model has "
                         f"{config.n_routed_experts}")
    if tp > 1:
        bad = [f"{k}={v}" for k, v in (("num_attention_heads", config.num_attention_heads),
                                        ("vocab_size", config.vocab_size)) if v % tp]
        if bad:
            raise ValueError(f"--tp {tp} needs {', '.join(bad)} divisible by {tp}")


class PlacedExperts(TokenDispatcher):
    """Expert parallelism with every process holding every token (inference), over physical expert slots: each
    rank holds slots [first, first + S) of P, placement[p] the logical expert in slot p (EPLB's phy2log; an
    expert may have several replicas). A pair routed to expert e goes to one of its replicas, chosen by its
    token's index plus a count of this dispatcher's calls, so consecutive tokens and steps spread over the
    replicas; every rank chooses alike (the same calls in the same order). Each rank computes the pairs of its
    own slots and the partial outputs are all-reduced before they join the shared experts' output.

    Counted as it runs (the same on every rank): `load` (E,), the pairs routed to each logical expert (what
    EPLB places by), and `slot_load` (P,), the pairs each slot computed (what the ranks carried)."""

    def __init__(self, n_experts: int, topk: int, placement: torch.Tensor, rank: int, world: int, group=None):
        super().__init__(n_experts, topk)
        self.group, self.rank, self.world = group, rank, world
        self.calls = 0
        self.load = torch.zeros(n_experts, dtype=torch.float64)
        self.slot_load = torch.zeros(placement.numel(), dtype=torch.float64)
        self.place(placement)

    def place(self, placement: torch.Tensor) -> None:
        P = placement.numel()
        self.placement = placement.cpu().long()
        S = P // self.world
        self.first, self.S = self.rank * S, S
        count = torch.bincount(self.placement, minlength=self.n_experts)  # replicas of each expert
        K = int(count.max())
        replicas = torch.full((self.n_experts, K), -1, dtype=torch.int64)
        seen = [0] * self.n_experts
        for p, e in enumerate(self.placement.tolist()):
            replicas[e, seen[e]] = p
            seen[e] += 1
        self.count, self.replicas = count, replicas
        if self.slot_load.numel() != P:
            self.slot_load = torch.zeros(P, dtype=torch.float64)

    def dispatch(self, x_ND, weights_NK, experts_NK):
        N, K = experts_NK.shape
        dev = experts_NK.device
        expert_S = experts_NK.flatten()
        count, replicas = self.count.to(dev), self.replicas.to(dev)
        token_S = torch.arange(N * K, device=dev) // K
        replica_S = (token_S + self.calls) % count.index_select(0, expert_S)
        slot_S = replicas[expert_S, replica_S]
        self.calls += 1
        self.load += torch.bincount(expert_S, minlength=self.n_experts).to("cpu", torch.float64)
        self.slot_load += torch.bincount(slot_S, minlength=self.slot_load.numel()).to("cpu", torch.float64)
        keep_S = ((slot_S >= self.first) & (slot_S < self.first + self.S)).nonzero().squeeze(1)
        local_S = slot_S.index_select(0, keep_S) - self.first
        order = local_S.argsort(stable=True)
        pair_S = keep_S.index_select(0, order)
        token_S = pair_S // self.topk
        counts_E = torch.bincount(local_S, minlength=self.S)
        return x_ND.index_select(0, token_S), weights_NK.flatten().index_select(0, pair_S), counts_E, token_S

    def combine(self, y_SD, token_S, out_ND):
        routed = torch.zeros_like(out_ND).index_add_(0, token_S, y_SD.to(out_ND.dtype))
        dist.all_reduce(routed, group=self.group)
        return out_ND.add_(routed)


def install(model: DeepSeekV3, shard: Sharding, group=None) -> DeepSeekV3:
    """The collectives that make the loaded shards compute the whole model (see the module docstring), as
    forward hooks and dispatchers: the model's code is unchanged."""
    def all_reduce(_module, _inputs, out):
        dist.all_reduce(out, group=group)
        return out

    if shard.tp > 1:
        for block in list(model.layers) + [m.block for m in model.mtp]:
            block.attn.wo.register_forward_hook(all_reduce)
            mlp = block.ffn.shared_experts if block.is_moe else block.ffn
            if mlp is not None:
                mlp.w2.register_forward_hook(all_reduce)
            if shard.rank > 0 and block.attn.wo.bias is not None:
                with torch.no_grad():
                    block.attn.wo.bias.zero_()  # added once, by rank 0's partial sum
        V = model.embed.weight.shape[0]  # this process's vocabulary rows
        lo = shard.tp_rank * V

        def embed_in(module, args):
            ids = args[0]
            module._outside = (ids < lo) | (ids >= lo + V)
            return ((ids - lo).masked_fill(module._outside, 0),)

        def embed_out(module, _args, out):
            out = out.masked_fill(module._outside[..., None], 0)
            dist.all_reduce(out, group=group)
            return out

        def gather_logits(_module, _inputs, out):
            parts = [torch.empty_like(out) for _ in range(shard.tp)]
            dist.all_gather(parts, out.contiguous(), group=group)
            return torch.cat(parts, dim=-1)

        model.embed.register_forward_pre_hook(embed_in)
        model.embed.register_forward_hook(embed_out)
        model.head.register_forward_hook(gather_logits)
    if shard.ep > 1:
        for j, module in enumerate(moe_modules(model)):
            module.dispatcher = PlacedExperts(module.n_experts, module.topk, shard.placement[j], shard.ep_rank,
                                              shard.ep, group)
            module.experts.kernel = None
    return model


def moe_modules(model: DeepSeekV3) -> list[MoE]:
    """The MoE layers in the order of a placement's rows (main layers, then the MTP blocks')."""
    return [m for m in model.modules() if isinstance(m, MoE)]


# ---- rank 0 drives, the others follow ------------------------------------------------------------------

def _to(obj, device):
    """obj with its tensors moved to device (dataclasses field by field, with a step's caches dropped)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                  if not f.name.startswith("_")}
        return type(obj)(**fields)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _broadcast(msg, group=None):
    box = [_to(msg, "cpu") if msg is not None else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class _LockstepCache:
    def __init__(self, owner: "LockstepRunner"):
        self._owner = owner

    def move(self, *args):
        self._owner._call("cache.move", *args)

    def __getattr__(self, name):
        return getattr(self._owner.runner.cache, name)


CALLS = ("forward", "forward_mtp", "logits", "mtp_logits", "absorb_weights", "cache.move", "set_placement")


def _execute(runner, name: str, args, kwargs):
    """One call of rank 0's on a rank's own runner."""
    if name not in CALLS:
        raise RuntimeError(f"rank 0 sent an unknown call {name!r}")
    if name == "set_placement":
        return set_placement(runner, *args)
    target = runner.cache if name.startswith("cache.") else runner
    return getattr(target, name.removeprefix("cache."))(*args, **kwargs)


class LockstepRunner:
    """Rank 0's runner: each call is broadcast to the other ranks (`serve_worker`) before it runs here, so that
    all ranks run the same forward, and meet in its collectives, together. eplb_interval: re-place the experts
    by the loads counted so far every that many forwards (`rebalance`)."""

    def __init__(self, runner, group=None, eplb_interval: int | None = None):
        self.runner, self.group = runner, group
        self.cache = _LockstepCache(self)
        self.stopped = False
        self.eplb_interval, self.forwards = eplb_interval, 0
        self.rebalance_requested = False  # set from another thread (a server's /rebalance): done before the next step
        self.rebalances = 0  # re-placements done

    def _call(self, name: str, *args, **kwargs):
        if self.stopped:
            raise RuntimeError("the model-parallel workers were stopped")
        _broadcast((name, args, kwargs), self.group)
        return _execute(self.runner, name, args, kwargs)

    def forward(self, batch):
        self.forwards += 1
        if self.rebalance_requested or (self.eplb_interval and self.forwards % self.eplb_interval == 0):
            self.rebalance_requested = False
            self.rebalance()
        return self._call("forward", batch)

    def rebalance(self) -> torch.Tensor | None:
        """Place the redundant experts by the loads counted so far (EPLB) on every rank: each rank then holds the
        experts of its new slots (copied from its old ones, or read from the model directory). Greedy output is
        unchanged: replicas hold the same weights. -> the new placement, None without expert parallelism."""
        dispatchers = [m.dispatcher for m in moe_modules(self.runner.model)]
        if not dispatchers or not isinstance(dispatchers[0], PlacedExperts):
            return None
        from .eplb import rebalance_experts

        shard = self.runner.sharding
        loads = torch.stack([d.load for d in dispatchers])
        placement = rebalance_experts(loads, shard.placement.shape[1], shard.config.n_group or 1, 1, shard.ep)[0]
        self._call("set_placement", placement)
        self.rebalances += 1
        return placement

    def expert_balance(self) -> dict | None:
        return expert_balance(self.runner.model)

    def forward_mtp(self, batch, h_prev, last_only: bool = False):
        return self._call("forward_mtp", batch, h_prev, last_only=last_only)

    def logits(self, h):
        return self._call("logits", h)

    def mtp_logits(self, h):
        return self._call("mtp_logits", h)

    def absorb_weights(self):
        return self._call("absorb_weights")

    def stop(self) -> None:
        """Release the other ranks from `serve_worker` (once; later calls do nothing)."""
        if not self.stopped:
            _broadcast(("stop", (), {}), self.group)
            self.stopped = True

    def __getattr__(self, name):  # device, config, piece sizes ...: the local runner's
        return getattr(self.runner, name)


def serve_worker(runner, group=None) -> None:
    """A rank other than 0: make each call rank 0 broadcasts on this rank's runner, until it says stop."""
    while True:
        name, args, kwargs = _broadcast(None, group)
        if name == "stop":
            return
        _execute(runner, name, _to(args, runner.device), _to(kwargs, runner.device))


# ---- redundant experts (EPLB) ----------------------------------------------------------------------------

def initial_placement(config: ModelConfig, ep: int, num_redundant: int = 0,
                      loads: torch.Tensor | None = None) -> torch.Tensor | None:
    """The placement to start from: EPLB on the given loads (MoE layers, E), or on equal loads, with
    num_redundant extra slots (a multiple of ep); None for the plain one (expert e in slot e)."""
    if not num_redundant and loads is None:
        return None
    from .eplb import rebalance_experts

    E = config.n_routed_experts
    if num_redundant < 0 or num_redundant % ep:
        raise ValueError(f"--num-redundant-experts {num_redundant} must be a multiple of --ep {ep} (each rank holds "
                         "the same number of expert slots)")
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers))
    if loads is None:
        loads = torch.ones(n_moe, E)
    return rebalance_experts(loads, E + num_redundant, config.n_group or 1, 1, ep)[0]


def read_expert_loads(path: str, model_layers: list[str], n_experts: int) -> torch.Tensor:
    """Expected expert loads (MoE layers, E) for the placement: a training run's metrics.jsonl (the mean
    `expert_load` of its last 10% of steps, rows matched by `moe_layers` names; a layer it did not record, as
    the MTP block's when the run trained without MTP, gets the mean of the others), or a JSON list of rows."""
    import json

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows, names = json.loads(text), model_layers
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        records = [r for r in records if r.get("expert_load")]
        if not records:
            raise ValueError(f"{path}: no record with expert_load (a dsv3 train run's metrics.jsonl?)") from None
        recent = records[-max(1, len(records) // 10):]
        rows = torch.tensor([r["expert_load"] for r in recent], dtype=torch.float64).mean(0).tolist()
        names = recent[-1].get("moe_layers") or model_layers
    loads = torch.tensor(rows, dtype=torch.float64)
    if loads.dim() != 2 or loads.shape[1] != n_experts or len(names) != loads.shape[0]:
        raise ValueError(f"{path}: expert loads of shape {tuple(loads.shape)}; expected (layers, {n_experts})")
    by_name = dict(zip(names, loads))
    mean = loads.mean(0)
    return torch.stack([by_name.get(n, mean) for n in model_layers])


def read_expert(ckpt, template: str, e: int, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Expert e's tensor (HF name template with {e}) from the model directory into weight (and its FP8 scale),
    converted as loading converts it."""
    hf = template.format(e=e)
    stored = ckpt.read(hf)
    if stored.dtype == fp8q.FP8 and weight.dtype == fp8q.FP8:
        weight.copy_(stored)
        scale.copy_(ckpt.read(hf + "_scale_inv"))
    elif stored.dtype == fp8q.FP8:
        weight.copy_(fp8q.weight_dequant(stored, ckpt.read(hf + "_scale_inv"), torch.float32))
    elif weight.dtype == fp8q.FP8:
        q, s = fp8q.weight_quant(stored)
        weight.copy_(q)
        scale.copy_(s)
    else:
        weight.copy_(stored)


@torch.no_grad()
def set_placement(runner, placement: torch.Tensor) -> None:
    """Hold the experts of a new placement on this rank: a slot keeps its weights when its expert stays, takes
    them from another of this rank's slots when it had them, else reads them from the model directory."""
    from ..ckpt.hf import ours_to_hf
    from ..ckpt.model_parallel import open_checkpoint

    shard, model = runner.sharding, runner.model
    placement = placement.cpu().long()
    check_placement(placement, shard.placement.shape[0], shard.config.n_routed_experts, shard.ep)
    if placement.shape != shard.placement.shape:
        raise ValueError(f"a new placement must keep the slots: {tuple(shard.placement.shape)}, not "
                         f"{tuple(placement.shape)}")
    ckpt = None
    try:
        names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
        for j, (name, moe) in enumerate(zip(names, moe_modules(model))):
            old = shard.held(j)
            new = placement[j, shard.slots.start: shard.slots.stop].tolist()
            if new != old:
                experts = moe.experts
                tensors = {"w1": experts.w1, "w2": experts.w2, "w3": experts.w3}
                before = {k: t.clone() for k, t in tensors.items()}
                scales = {k: getattr(experts, f"{k}_scale_inv") for k in tensors}
                scales_before = {k: None if t is None else t.clone() for k, t in scales.items()}
                for slot, e in enumerate(new):
                    if e in old:
                        src = old.index(e)
                        for k, t in tensors.items():
                            t[slot].copy_(before[k][src])
                            if scales[k] is not None:
                                scales[k][slot].copy_(scales_before[k][src])
                        continue
                    if ckpt is None:
                        ckpt = open_checkpoint(runner.model_path, shard.config)  # (HF or per-rank layout)
                    for k, t in tensors.items():
                        template = ours_to_hf(f"{name}.experts.{k}", shard.config.num_hidden_layers)[0][0]
                        read_expert(ckpt, template, e, t[slot], None if scales[k] is None else scales[k][slot])
            moe.dispatcher.place(placement[j])
        shard.placement = placement.clone()
    finally:
        if ckpt is not None:
            ckpt.close()


def expert_balance(model: DeepSeekV3) -> dict | None:
    """What the ranks carried so far: per MoE layer the pairs computed by each rank and max / mean of those
    (1.0: even), and the mean of that ratio over the layers that computed anything. None without expert
    parallelism."""
    dispatchers = [m.dispatcher for m in moe_modules(model)]
    if not dispatchers or not isinstance(dispatchers[0], PlacedExperts):
        return None
    per_rank = torch.stack([d.slot_load.view(d.world, -1).sum(-1) for d in dispatchers])  # (layers, ranks)
    mean = per_rank.mean(-1)
    used = mean > 0  # (an MTP module's layer computes nothing unless it drafts)
    ratio = torch.where(used, per_rank.max(-1).values / mean.clamp_min(1e-30), torch.ones_like(mean))
    overall = ratio[used].mean().item() if used.any() else 1.0
    return {"max_over_mean": overall, "max_over_mean_layers": ratio.tolist(),
            "pairs_per_rank": per_rank.tolist(), "slots": int(dispatchers[0].placement.numel()),
            "experts": dispatchers[0].n_experts}


# ---- setting it up ---------------------------------------------------------------------------------------

def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) -> (rank, world size, this rank's device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("--tp/--ep > 1 run under torchrun: torchrun --nproc-per-node N -m dsv3 ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return rank, world, dev


def model_parallel_llm(path: str, tp: int = 1, ep: int = 1, *, dtype=None, device: str | None = None,
                       num_redundant_experts: int = 0, expert_loads: str | None = None,
                       eplb_interval: int | None = None, **llm_kwargs):
    """Under torchrun: every rank loads its shard of the model directory and builds an engine. Rank 0 gets the
    LLM back, its runner a LockstepRunner (call `stop_workers(llm)` when done); every other rank serves rank 0's
    calls until then and gets None. With expert parallelism: num_redundant_experts extra expert slots, placed
    by EPLB on expert_loads (a training run's metrics.jsonl, `read_expert_loads`) or equal loads, and re-placed
    by the loads served every eplb_interval forwards (and on `llm.runner.rebalance()`)."""
    from ..ckpt.pretrained import load_pretrained, model_bytes
    from ..infer import LLM
    from ..tokenizer import Tokenizer

    config = ModelConfig.from_hf(path)
    if (num_redundant_experts or expert_loads or eplb_interval) and ep == 1:
        raise ValueError("--num-redundant-experts, --expert-loads and --eplb-interval place experts over the "
                         "ranks of --ep N")
    if eplb_interval is not None and eplb_interval < 1:
        raise ValueError(f"--eplb-interval {eplb_interval} must be >= 1 (forwards between re-placements)")
    loads = None
    if expert_loads:
        with torch.device("meta"):
            names = [n for n, m in DeepSeekV3(config).named_modules() if isinstance(m, MoE)]
        loads = read_expert_loads(expert_loads, names, config.n_routed_experts)
    placement = initial_placement(config, ep, num_redundant_experts, loads)
    rank, world, dev = init_distributed(device)
    shard = Sharding(config, rank, world, tp, ep, placement)
    model = install(load_pretrained(path, dtype=dtype, device=dev, shard=shard, progress=False if rank else None),
                    shard)
    held = [None] * world  # each rank's weight bytes, reported by rank 0
    dist.all_gather_object(held, model_bytes(model))
    if rank == 0:
        print(f"model parallel: {world} processes (--tp {tp} --ep {ep}), weights per process "
              + ", ".join(f"{b / 2**20:.1f}" for b in held) + " MiB", file=sys.stderr, flush=True)
    tokenizer = Tokenizer.from_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    llm = LLM(model, tokenizer=tokenizer, cpu_kernels=False, cuda_graphs=False, **llm_kwargs)
    llm.sharding = llm.runner.sharding = shard
    llm.runner.model_path = path
    if rank != 0:
        serve_worker(llm.runner)
        return None
    llm.runner = LockstepRunner(llm.runner, eplb_interval=eplb_interval)
    if llm.speculator is not None:
        llm.speculator.runner = llm.runner
    return llm


def stop_workers(llm) -> None:
    runner = getattr(llm, "runner", None)
    if isinstance(runner, LockstepRunner):
        runner.stop()
