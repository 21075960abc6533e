"""The building blocks every section of the model shares: a Linear that can hold FP8 weights, RMSNorm and
the SwiGLU MLP (dense layers, shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import fp8


class KeepDtype(nn.Module):
    """A module some of whose tensors keep their dtype when the model is cast (`model.to(torch.bfloat16)`):
    FP8 weights with their float32 scales, the gate's float32 bias, RoPE frequencies. Device moves and
    `to_empty` still apply to them."""

    def pinned(self) -> tuple[str, ...]:
        """Names of the tensors whose dtype is fixed right now."""
        return ()

    def _apply(self, fn, recurse=True):
        kept = {}
        for name in self.pinned():
            t = getattr(self, name, None)
            if t is not None:
                kept[name] = t.data  # an alias of the current storage, unaffected by the rebinding below
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                new.data = old.to(new.device)
        return self


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without dispatching an op when it already is (a decode step issues hundreds of casts)."""
    return t if t.dtype == dtype else t.to(dtype)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor that a parallel layer has placed across processes (a DTensor, from
    dsv3.parallel: the routed experts under expert parallelism hold E/ep experts on each), with autograd back
    to it; any other tensor as it is. The model computes on local parts and never on placements."""
    return t.to_local() if hasattr(t, "to_local") else t


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts t's device's matrix products to, or None when autocast is off there (or does
    not know the device: meta tensors)."""
    try:
        if torch.is_autocast_enabled(t.device.type):
            return torch.get_autocast_dtype(t.device.type)
    except RuntimeError:
        pass
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b), for a plain weight or an FP8 one with its block scales (dequantised to the activation
    dtype, then a normal GEMM: weight-only FP8, the numbers of the model `fp8-cast-bf16` makes)."""
    if scale is not None:
        weight = fp8.weight_dequant(weight, scale, x.dtype)
    return F.linear(x, weight, bias)


class Linear(KeepDtype):
    """y = x W^T (+ b). The weight is either a plain tensor or, after `to_fp8()`, e4m3 with a float32
    `weight_scale_inv` per 128x128 block, exactly the layout of the official checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("weight_scale_inv", None)
        # an inference engine may install a faster way to take the same product on its device (the CPU
        # kernels of infer/cpu_kernels.py): kernel(x, weight, bias); None is the plain path
        self.kernel = None

    @property
    def is_fp8(self) -> bool:
        return self.weight_scale_inv is not None

    def pinned(self) -> tuple[str, ...]:
        return ("weight", "weight_scale_inv") if self.is_fp8 else ()

    def to_fp8(self) -> None:
        """Switch to FP8 storage (empty tensors on the weight's device: a loader fills them)."""
        dev = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=fp8.FP8, device=dev),
                                   requires_grad=False)
        self.weight_scale_inv = torch.empty(fp8.scale_shape(self.weight.shape), dtype=torch.float32, device=dev)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain matrix (dequantised if FP8)."""
        if self.is_fp8:
            return fp8.weight_dequant(self.weight, self.weight_scale_inv, dtype or torch.bfloat16)
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not torch.is_grad_enabled():
            return self.kernel(x, self.weight, self.bias)
        return linear(x, self.weight, self.weight_scale_inv, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, fp8={self.is_fp8}"


class PackedWeights:
    """Parameters concatenated along `dim` into one tensor, each parameter re-pointed to a view of its slice.
    Values, names and state_dict are unchanged, and once the old storages are freed no memory is added.
    Used for inference, where two projections of the same input then cost one GEMM (vLLM's packed
    modules); `packed()` says when that shortcut may be taken."""

    @torch.no_grad()
    def __init__(self, params: list[nn.Parameter], dim: int = 0):
        self.tensor = torch.cat([p.detach() for p in params], dim=dim)
        start = 0
        for p in params:
            p.data = self.tensor.narrow(dim, start, p.shape[dim])
            start += p.shape[dim]
        self.params = params
        self.ptrs = [p.data_ptr() for p in params]
        self.kernel = None  # as Linear.kernel: an engine's faster product for this (2-D) matrix, or None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for the packed (2-D) matrix W."""
        return F.linear(x, self.tensor) if self.kernel is None else self.kernel(x, self.tensor)

    def intact(self) -> bool:
        """Every parameter still a view of the packed tensor (moving, casting or replacing any of them gives
        it new storage)."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.ptrs))


def pack(module: nn.Module, name: str, params: list[nn.Parameter], dim: int = 0) -> None:
    """Set `module.<name>` to the PackedWeights of `params`, unless it already holds an intact one."""
    current = getattr(module, name)
    if current is None or not current.intact():
        setattr(module, name, PackedWeights(params, dim))


def packed(module: nn.Module, name: str) -> PackedWeights | None:
    """`module.<name>` if the packed path may be taken: no gradient wanted (the packed copy is outside
    autograd) and the parameters still live in it. A stale pack is dropped, freeing its memory."""
    current = getattr(module, name)
    if current is None or torch.is_grad_enabled():
        return None
    if not current.intact():
        setattr(module, name, None)
        return None
    return current


class RMSNorm(nn.Module):
    """x / rms(x) * w, the normalisation taken in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._cpu_consts, self._cpu_consts_key = None, None  # (sqrt(D) * weight, sqrt(D eps)), CPU inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.device.type == "cpu":
                if not torch.is_grad_enabled():
                    return self._forward_cpu(x)
                return _RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op (on GPUs)
        # lower precision: normalise in float32, round, then scale (as the reference implementations do)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)

    def forget_cached(self) -> None:
        """Drop the cached factor (the weight changed in place without a version bump)."""
        self._cpu_consts, self._cpu_consts_key = None, None

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """The same in 4 ops: on CPUs F.rms_norm is a composite of 6 (pow, mean, add, rsqrt, mul, mul) whose
        mean alone costs three elementwise ops, and a decode step runs 17 norms or more on a few rows.
        x / rms(x) * w = x / hypot(||x||, sqrt(D eps)) * (sqrt(D) w), the last factor cached per weight
        version (a Python scalar in an op costs as much as the op) under inference mode only: a fused
        optimizer step (torch.optim.AdamW(fused=True)) changes a weight without bumping its version, so an
        evaluation between training steps (no_grad) computes the factor afresh."""
        w = self.weight
        key = None
        if torch.is_inference_mode_enabled():
            try:
                key = (w.data_ptr(), w._version)
            except RuntimeError:  # an inference tensor keeps no version counter: do not cache
                key = None
        if key is None or key != self._cpu_consts_key:
            D = w.shape[0]
            self._cpu_consts = (w.detach() * D ** 0.5, torch.tensor((D * self.eps) ** 0.5, device=w.device))
            self._cpu_consts_key = key
        scaled_weight, sqrt_d_eps = self._cpu_consts
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), sqrt_d_eps) * scaled_weight


class _RMSNormCPU(torch.autograd.Function):
    """F.rms_norm(x, w) with a backward written out. On CPUs F.rms_norm is a composite of six elementwise ops
    whose autograd graph keeps their intermediates and replays each one's backward; the gradient in closed
    form takes two elementwise passes and two matrix-vector products. With r = rsqrt(mean(x^2) + eps):
        y = x r w,   dL/dw = sum_rows(g x r),   dL/dx = r (g w) - x r^3 mean(g w x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(D).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, r = ctx.saved_tensors
        D = x.shape[-1]
        g, x2, r2 = g.reshape(-1, D), x.reshape(-1, D), r.reshape(-1, 1)
        gx = g * x2
        grad_w = (r2.view(1, -1) @ gx).view(D) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            c = (gx @ w).view(-1, 1).mul_(r2.pow(3)).div_(D)  # r^3 mean(g w x), one per row
            grad_x = torch.mul(g, w).mul_(r2).addcmul_(x2, c, value=-1).view(x.shape)
        return grad_x, grad_w, None


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). HF names: w1 gate_proj, w3 up_proj, w2 down_proj."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)
        self.w2 = Linear(inter_dim, dim)
        self.w3 = Linear(dim, inter_dim)
        self.w13: PackedWeights | None = None  # w1 and w3 stacked, after pack_projections()

    def pack_projections(self, contiguous_only: bool = False) -> None:
        """Keep w1 and w3 in one (2I, D) matrix (their weights become views of it): one GEMM, not two."""
        if not (self.w1.is_fp8 or self.w3.is_fp8):
            pack(self, "w13", [self.w1.weight, self.w3.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w13 = packed(self, "w13")
        if w13 is not None:
            gate, up = w13.matmul(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
