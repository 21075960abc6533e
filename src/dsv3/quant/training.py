"""FP8 mixed-precision training as DeepSeek-V3 does it (technical report §3.3), swapped into the model from
outside: the model code stays the reference and FP8 is a choice, not a fork.

    from dsv3.quant.training import convert_to_fp8_training
    convert_to_fp8_training(model)        # before the optimizer is built; parameters and names are unchanged

What changes, and what does not:
- Every Linear of attention projections, dense MLPs, shared experts and the MTP projection becomes a
  `Float8Linear`; the routed experts become `Float8Experts`. Each computes its three GEMMs (forward y = x W^T,
  input gradient dX = dY W, weight gradient dW = dY^T X) from e4m3 operands: activations and output gradients
  scaled per 1x128 tile along the reduction dimension, weights per 128x128 block, every scale taken from the
  current max-abs ("online"); accumulation in FP32 per 128-wide chunk of K (promotion, §3.3.2).
- The input each Linear saves for backward is the FP8 copy its forward GEMM read (one byte per element, plus
  one float per 128). Its scales are powers of two (ue8m0), so the 1x128 -> 128x1 requantisation the weight
  gradient needs loses nothing but values that fall below e4m3's range in their new tile (§3.3.3).
- The routed experts keep the SwiGLU's input (gate and up projections) in FP8 and recompute its output in
  backward; they run as grouped GEMMs, one call per weight for all experts, each expert's tokens padded to a
  multiple of 128 rows so that no tile spans two experts (the layout DeepGEMM's grouped GEMMs read).
- Embedding, output head, gate, norms and the attention core are untouched (BF16/FP32); master weights,
  gradients and optimizer states stay FP32.

On a GPU with Triton the quantisers and GEMMs are the kernels of `quant/kernels.py`; elsewhere the plain torch
references of `quant/fp8.py` (the GEMMs dequantise to FP32, which equals FP32 accumulation with promotion).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Linear, autocast_dtype, local_shard
from ..model.moe import Experts
from . import fp8

# Module names left in high precision by default: the output head (the report's list: embedding, output head,
# gating, norms and attention core; only the head is a Linear here).
DEFAULT_SKIP = ("head",)


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """How each operand is quantised. The defaults are V3's.

    act_scale_fmt: scales of the activations quantised for the forward and cached for backward ("ue8m0":
        powers of two, so the 128x1 requantisation of the weight gradient is lossless).
    grad_scale_fmt, weight_scale_fmt: scales of output gradients and weights (None: amax / 448 exactly).
    grad_block: the output gradient's tile for the input-gradient GEMM: "1x128" (V3) or "128x128" (the
        block-wise scheme the report tried and rejected, §3.3.2 / appendix B.2: token-correlated outliers in
        activation gradients ruin a whole 128-token block), kept for the experiment that shows why.
    """
    block: int = fp8.BLOCK
    act_scale_fmt: str | None = "ue8m0"
    grad_scale_fmt: str | None = None
    weight_scale_fmt: str | None = None
    grad_block: str = "1x128"

    def __post_init__(self):
        for f in ("act_scale_fmt", "grad_scale_fmt", "weight_scale_fmt"):
            if getattr(self, f) not in fp8.SCALE_FMTS:
                raise ValueError(f"{f}={getattr(self, f)!r}: expected one of {fp8.SCALE_FMTS}")
        if self.grad_block not in ("1x128", "128x128"):
            raise ValueError(f"grad_block={self.grad_block!r}: expected '1x128' or '128x128'")
        if self.block <= 0:
            raise ValueError(f"block={self.block}: expected a positive tile size (V3: 128)")


# The references under the names the kernels carry (quant/kernels.py: same names, same signatures).
REFERENCE = types.SimpleNamespace(
    act_quant=fp8.act_quant, weight_quant=fp8.weight_quant, requant_transpose=fp8.requant_transpose,
    fp8_gemm=fp8.fp8_gemm_ref, fp8_gemm_1d1d=fp8.fp8_gemm_1d1d_ref, fp8_grouped_gemm=fp8.fp8_grouped_gemm_ref,
    fp8_grouped_gemm_1d1d=fp8.fp8_grouped_gemm_1d1d_ref)


def ops(t: torch.Tensor):
    """Where the quantisers and GEMMs for `t` come from: the Triton kernels on a GPU that has them, else the
    references."""
    if t.is_cuda:
        from . import kernels
        if kernels.available():
            return kernels
    return REFERENCE


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear's output takes: autocast's when it is on for x's device, else x's own."""
    return autocast_dtype(x) or x.dtype


def _quant_grad(dy: torch.Tensor, recipe: Fp8Recipe):
    """Output gradient (M, N) -> e4m3 and scales for the input-gradient GEMM, as the recipe's grad_block says;
    the 128x128 variant returns it dequantised to FP32 per block and requantised per 1x128 tile with scales
    that are exact copies of the block's scale, so one GEMM serves both."""
    o = ops(dy)
    if recipe.grad_block == "1x128":
        return o.act_quant(dy, recipe.block, recipe.grad_scale_fmt)
    q, s = o.weight_quant(dy, recipe.block, recipe.grad_scale_fmt)  # one scale per 128x128 block
    m, n = dy.shape
    return q, s.repeat_interleave(recipe.block, dim=0)[:m]  # each row's 1x128 tiles carry their block's scale


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8. Saves the FP8 copy of x (and its scales) and the master weight
    (no copy); the weight is requantised in backward rather than kept as a second FP8 copy."""

    @staticmethod
    def forward(ctx, x_MK: torch.Tensor, weight_NK: torch.Tensor, recipe: Fp8Recipe, out_dtype: torch.dtype):
        o = ops(x_MK)
        with torch.autocast(x_MK.device.type, enabled=False):
            xq, xs = o.act_quant(x_MK, recipe.block, recipe.act_scale_fmt)
            wq, ws = o.weight_quant(weight_NK, recipe.block, recipe.weight_scale_fmt)
            y = o.fp8_gemm(xq, xs, wq, ws, out_dtype)
        ctx.save_for_backward(xq, xs, weight_NK)
        ctx.recipe, ctx.x_dtype = recipe, x_MK.dtype
        return y

    @staticmethod
    def backward(ctx, dy_MN: torch.Tensor):
        xq, xs, weight_NK = ctx.saved_tensors
        recipe: Fp8Recipe = ctx.recipe
        o = ops(dy_MN)
        dx = dw = None
        with torch.autocast(dy_MN.device.type, enabled=False):
            dy_MN = dy_MN.contiguous()
            if ctx.needs_input_grad[0]:  # dX (M, K) = dY (M, N) W (N, K): W's 128x128 blocks, transposed
                dyq, dys = _quant_grad(dy_MN, recipe)
                wq, ws = o.weight_quant(weight_NK, recipe.block, recipe.weight_scale_fmt)
                dx = o.fp8_gemm(dyq, dys, wq.T.contiguous(), ws.T.contiguous(), ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # dW (N, K) = dY^T (N, M) X (M, K): both tiled 1x128 along the tokens
                dytq, dyts = o.act_quant(dy_MN.T, recipe.block, recipe.grad_scale_fmt)
                xtq, xts = o.requant_transpose(xq, xs, recipe.block, recipe.act_scale_fmt)
                dw = o.fp8_gemm_1d1d(dytq, dyts, xtq, xts, torch.float32).to(weight_NK.dtype)
        return dx, dw, None, None


class Float8Linear(Linear):
    """A `Linear` whose three GEMMs run in FP8 (see the module docstring). Same parameters, same names."""

    recipe: Fp8Recipe = Fp8Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fp8:
            raise RuntimeError("Float8Linear trains from high-precision master weights; this one holds FP8 weights "
                               "(load the model with a float dtype to train it)")
        shape = x.shape
        y = _Fp8Linear.apply(x.reshape(-1, shape[-1]), self.weight, self.recipe, _out_dtype(x))
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", compute=fp8 ({self.recipe.grad_block} gradients)"


def _pad_layout(counts_E: torch.Tensor, rows: int, block: int):
    """Each expert's rows moved to start at a multiple of `block`: -> (dest_S, ends_E, padded_rows). dest_S[s] is
    row s's place in the padded layout; ends_E the groups' end offsets there. padded_rows is a bound taken from
    the sizes alone (rows + every group's worst padding), so no value is read back from the device."""
    E = counts_E.numel()
    padded_E = (counts_E + block - 1) // block * block
    ends_E = padded_E.cumsum(0)
    shift_E = (ends_E - padded_E) - (counts_E.cumsum(0) - counts_E)  # padded start - packed start
    expert_S = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E, output_size=rows)
    dest_S = torch.arange(rows, device=counts_E.device) + shift_E[expert_S]
    padded_rows = -(-(rows + E * (block - 1)) // block) * block
    return dest_S, ends_E.to(torch.int32), padded_rows


class _Fp8GroupedSwiGLU(torch.autograd.Function):
    """All routed experts at once: y_e = W2_e (silu(W1_e x) * (W3_e x) * g) for each expert e's rows, every GEMM
    an FP8 grouped GEMM over the padded layout of `_pad_layout` (built here, outside autograd, so that no
    high-precision copy of the tokens is kept for backward). Saved for backward: x in FP8, the SwiGLU's input
    (W1 x, W3 x) in FP8, the gate values, the layout; the SwiGLU's output is recomputed."""

    @staticmethod
    def forward(ctx, x_SD, weight_S, w1_EID, w3_EID, w2_EDI, counts_E, recipe: Fp8Recipe, out_dtype):
        o, b = ops(x_SD), recipe.block
        grouped = o.fp8_grouped_gemm
        S, D = x_SD.shape
        dest_S, ends_E, P = _pad_layout(counts_E, S, b)
        with torch.autocast(x_SD.device.type, enabled=False):
            x_PD = x_SD.new_zeros(P, D).index_copy_(0, dest_S, x_SD)
            weight_P = torch.zeros(P, device=x_SD.device).index_copy_(0, dest_S, weight_S.float())
            xq, xs = o.act_quant(x_PD, b, recipe.act_scale_fmt)
            del x_PD
            w1 = o.weight_quant(w1_EID, b, recipe.weight_scale_fmt)
            w3 = o.weight_quant(w3_EID, b, recipe.weight_scale_fmt)
            w2 = o.weight_quant(w2_EDI, b, recipe.weight_scale_fmt)
            gate_PI = grouped(xq, xs, *w1, ends_E, torch.float32)
            up_PI = grouped(xq, xs, *w3, ends_E, torch.float32)
            h_PI = F.silu(gate_PI) * up_PI * weight_P[:, None]
            y_SD = grouped(*o.act_quant(h_PI, b, recipe.act_scale_fmt), *w2, ends_E, out_dtype).index_select(0, dest_S)
            gate_q = o.act_quant(gate_PI, b, recipe.act_scale_fmt)
            up_q = o.act_quant(up_PI, b, recipe.act_scale_fmt)
        ctx.save_for_backward(xq, xs, *gate_q, *up_q, weight_P, w1_EID, w3_EID, w2_EDI, dest_S, ends_E)
        ctx.recipe, ctx.x_dtype, ctx.weight_dtype = recipe, x_SD.dtype, weight_S.dtype
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        xq, xs, gq, gs, uq, us, weight_P, w1_EID, w3_EID, w2_EDI, dest_S, ends_E = ctx.saved_tensors
        recipe: Fp8Recipe = ctx.recipe
        b = recipe.block
        o = ops(dy_SD)
        grouped, grouped_1d1d = o.fp8_grouped_gemm, o.fp8_grouped_gemm_1d1d

        def wq_t(w):  # W (E, A, B) -> W^T (E, B, A) in FP8 with its blocks' scales transposed alike
            q, s = o.weight_quant(w, b, recipe.weight_scale_fmt)
            return q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()

        def wgrad(d_PA, xt):  # dW (E, A, B) = d_e^T x_e, both tiled 1x128 along the (padded) tokens
            dt = o.act_quant(d_PA.T, b, recipe.grad_scale_fmt)
            return grouped_1d1d(*dt, *xt, ends_E, torch.float32)

        with torch.autocast(dy_SD.device.type, enabled=False):
            dy_PD = dy_SD.new_zeros(xq.shape[0], dy_SD.shape[1]).index_copy_(0, dest_S, dy_SD)
            gate_PI, up_PI = fp8.act_dequant(gq, gs, block=b), fp8.act_dequant(uq, us, block=b)  # from FP8
            act_PI = F.silu(gate_PI)
            wt_P = weight_P[:, None]
            h_PI = act_PI * up_PI * wt_P  # recomputed
            dh_PI = grouped(*_quant_grad(dy_PD, recipe), *wq_t(w2_EDI), ends_E, torch.float32)
            dw2 = wgrad(dy_PD, o.act_quant(h_PI.T, b, recipe.act_scale_fmt))
            d_weight_S = (dh_PI * act_PI * up_PI).sum(-1).index_select(0, dest_S)
            sig = torch.sigmoid(gate_PI)
            dgate_PI = dh_PI * wt_P * up_PI * sig * (1 + gate_PI * (1 - sig))  # silu'(g) = s (1 + g (1 - s))
            dup_PI = dh_PI * wt_P * act_PI
            dx_PD = grouped(*_quant_grad(dgate_PI, recipe), *wq_t(w1_EID), ends_E, torch.float32)
            dx_PD += grouped(*_quant_grad(dup_PI, recipe), *wq_t(w3_EID), ends_E, torch.float32)
            xt = o.requant_transpose(xq, xs, b, recipe.act_scale_fmt)
            dw1, dw3 = wgrad(dgate_PI, xt), wgrad(dup_PI, xt)
        return (dx_PD.index_select(0, dest_S).to(ctx.x_dtype), d_weight_S.to(ctx.weight_dtype),
                dw1.to(w1_EID.dtype), dw3.to(w3_EID.dtype), dw2.to(w2_EDI.dtype), None, None, None)


class Float8Experts(Experts):
    """`Experts` whose grouped GEMMs run in FP8: one autograd function over all experts (no Python loop over
    them), see `_Fp8GroupedSwiGLU`. Same parameters, same names."""

    recipe: Fp8Recipe = Fp8Recipe()

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor, weight_S: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_fp8:
            raise RuntimeError("Float8Experts trains from high-precision master weights; these hold FP8 weights")
        w_S = weight_S if weight_S is not None else x_SD.new_ones(x_SD.shape[0], dtype=torch.float32)
        w1, w3, w2 = (local_shard(w) for w in (self.w1, self.w3, self.w2))  # this process's experts
        return _Fp8GroupedSwiGLU.apply(x_SD, w_S, w1, w3, w2, counts_E, self.recipe, _out_dtype(x_SD))


def _swap(parent: nn.Module, name: str, old: nn.Module, cls: type, recipe: Fp8Recipe) -> nn.Module:
    """Replace parent.<name> by an instance of `cls` (a subclass of old's class) holding the very same
    parameters and buffers: state_dict names and the optimizer's view of the parameters do not change."""
    new = cls.__new__(cls)
    new.__dict__ = old.__dict__.copy()
    for store in ("_parameters", "_buffers", "_modules"):
        new.__dict__[store] = dict(old.__dict__[store])
    new.recipe = recipe
    setattr(parent, name, new)
    return new


def convert_to_fp8_training(model: nn.Module, recipe: Fp8Recipe | None = None,
                            module_filter: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Swap every `Linear` and `Experts` of `model` that `module_filter(name, module)` accepts (default: all but
    the output head) for its FP8 training twin, in place. -> the names converted. Call before the optimizer is
    built (it keeps the same Parameter objects, so after is fine too) and before `torch.compile`."""
    recipe = recipe or Fp8Recipe()
    if module_filter is None:
        def module_filter(name, module):
            return name.rsplit(".", 1)[-1] not in DEFAULT_SKIP
    converted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (Float8Linear, Float8Experts)):
            continue
        if type(module) is Linear:
            cls = Float8Linear
        elif type(module) is Experts:
            cls = Float8Experts
        else:
            continue
        if not module_filter(name, module):
            continue
        if module.is_fp8:
            raise ValueError(f"{name} holds FP8 weights; FP8 training needs high-precision master weights "
                             "(load the model with dtype=torch.float32)")
        parent_name, _, child = name.rpartition(".")
        _swap(model.get_submodule(parent_name) if parent_name else model, child, module, cls, recipe)
        converted.append(name)
    if not converted:
        raise ValueError("no Linear or Experts module was converted to FP8 (check module_filter)")
    return converted


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2), in float64."""
    ref, app = reference.double(), approximation.double()
    noise = (ref - app).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()
