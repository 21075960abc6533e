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

    def __init__(self, config: ModelConfig, rank: int, world: int, tp: int = 1, ep: int = 1):
        check_layout(config, world, tp, ep)
        self.config, self.rank, self.world, self.tp, self.ep = config, rank, world, tp, ep
        self.tp_rank = rank if tp > 1 else 0
        n_local = config.n_routed_experts // ep if config.n_routed_experts else 0
        first = (rank if ep > 1 else 0) * n_local
        self.experts = range(first, first + n_local)  # the routed experts held here (global ids)
        self._cuts: dict[str, tuple[int, int, int]] = {}  # our name -> (dim, lo, hi) in the whole tensor

    def local_expert(self, e: int) -> int:
        return e - self.experts.start

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
        tensors = [(n, t, False) for n, t in model.named_parameters()] + \
                  [(n, t, True) for n, t in model.named_buffers() if t is not None]
        for name, t, is_buffer in tensors:
            shape = list(t.shape)
            if ".experts.w" in name and self.ep > 1:
                shape[0] = len(self.experts)
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
            if isinstance(module, MoE) and self.ep > 1:
                module.experts.n_experts = len(self.experts)
        if model.config.tie_word_embeddings:
            model.head.weight = model.embed.weight


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


class LocalExperts(TokenDispatcher):
    """Expert parallelism with every process holding every token (inference): each computes the pairs routed
    to its own experts and the partial outputs are all-reduced before they join the shared experts' output."""

    def __init__(self, n_experts: int, topk: int, experts: range, group=None):
        super().__init__(n_experts, topk)
        self.local, self.group = experts, group

    def dispatch(self, x_ND, weights_NK, experts_NK):
        expert_S = experts_NK.flatten()
        keep_S = ((expert_S >= self.local.start) & (expert_S < self.local.stop)).nonzero().squeeze(1)
        local_S = expert_S.index_select(0, keep_S) - self.local.start
        order = local_S.argsort(stable=True)
        pair_S = keep_S.index_select(0, order)
        token_S = pair_S // self.topk
        counts_E = torch.bincount(local_S, minlength=len(self.local))
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
        for module in model.modules():
            if isinstance(module, MoE):
                module.dispatcher = LocalExperts(module.n_experts, module.topk, shard.experts, group)
                module.experts.kernel = None
    return model


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


class LockstepRunner:
    """Rank 0's runner: each call is broadcast to the other ranks (`serve_worker`) before it runs here, so that
    all ranks run the same forward, and meet in its collectives, together."""

    CALLS = ("forward", "forward_mtp", "logits", "mtp_logits", "absorb_weights", "cache.move")

    def __init__(self, runner, group=None):
        self.runner, self.group = runner, group
        self.cache = _LockstepCache(self)
        self.stopped = False

    def _call(self, name: str, *args, **kwargs):
        if self.stopped:
            raise RuntimeError("the model-parallel workers were stopped")
        _broadcast((name, args, kwargs), self.group)
        target = self.runner.cache if name.startswith("cache.") else self.runner
        return getattr(target, name.removeprefix("cache."))(*args, **kwargs)

    def forward(self, batch):
        return self._call("forward", batch)

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
        if name not in LockstepRunner.CALLS:
            raise RuntimeError(f"rank 0 sent an unknown call {name!r}")
        args, kwargs = _to(args, runner.device), _to(kwargs, runner.device)
        target = runner.cache if name.startswith("cache.") else runner
        getattr(target, name.removeprefix("cache."))(*args, **kwargs)


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
                       **llm_kwargs):
    """Under torchrun: every rank loads its shard of the model directory and builds an engine. Rank 0 gets the
    LLM back, its runner a LockstepRunner (call `stop_workers(llm)` when done); every other rank serves rank 0's
    calls until then and gets None."""
    from ..ckpt.pretrained import load_pretrained, model_bytes
    from ..infer import LLM
    from ..tokenizer import Tokenizer

    rank, world, dev = init_distributed(device)
    shard = Sharding(ModelConfig.from_hf(path), rank, world, tp, ep)
    model = install(load_pretrained(path, dtype=dtype, device=dev, shard=shard, progress=False if rank else None),
                    shard)
    held = [None] * world  # each rank's weight bytes, reported by rank 0
    dist.all_gather_object(held, model_bytes(model))
    if rank == 0:
        print(f"model parallel: {world} processes (--tp {tp} --ep {ep}), weights per process "
              + ", ".join(f"{b / 2**20:.1f}" for b in held) + " MiB", file=sys.stderr, flush=True)
    tokenizer = Tokenizer.from_dir(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    llm = LLM(model, tokenizer=tokenizer, cpu_kernels=False, cuda_graphs=False, **llm_kwargs)
    llm.sharding = shard
    if rank != 0:
        serve_worker(llm.runner)
        return None
    llm.runner = LockstepRunner(llm.runner)
    if llm.speculator is not None:
        llm.speculator.runner = llm.runner
    return llm


def stop_workers(llm) -> None:
    runner = getattr(llm, "runner", None)
    if isinstance(runner, LockstepRunner):
        runner.stop()
