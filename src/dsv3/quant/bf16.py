"""BF16 matrix products on CPUs without BF16 arithmetic (AVX2: AMD Zen 1-3, older Xeons), taken in FP32 with
the same result.

On such a CPU a BF16 GEMM under autocast runs through a slow generic path: a `tiny` training step takes ~20x
as long as in FP32, so a BF16 run (or the BF16 parts of an FP8 run) is out of reach there. Yet a BF16 GEMM's
numbers are cheap to get exactly in FP32: every product of two BF16 values (8-bit significands) is exact in
FP32 (24 bits), the hardware accumulates in FP32 anyway, and only the output is rounded to BF16. So
`fp32_products()` intercepts the BF16 matrix products and CPU attention below autograd (forward and backward),
widens their BF16 operands to FP32, runs FP32 kernels and rounds the outputs back to BF16: the same numbers
as the BF16 kernels up to the order of FP32 summation, at FP32 speed. Elementwise ops are left alone (they
are cheap in BF16 everywhere).

    with torch.autocast("cpu", dtype=torch.bfloat16), fp32_products():
        loss = model(x).float().mean()
        loss.backward()   # backward too must run inside the context

Use it where `train.cpu.bf16_matmul_speedup()` says BF16 is slower than FP32; on a CPU with AMX or
AVX512-BF16 the native kernels are faster and exact as well.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops whose BF16 tensor arguments are widened; every BF16 output is rounded back (attention's logsumexp is
# FP32 in the native kernel too and stays so)
_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_OPTIONAL = ("_grouped_mm.default", "_scaled_dot_product_flash_attention_for_cpu.default",
             "_scaled_dot_product_flash_attention_for_cpu_backward.default")
for _name in _OPTIONAL:
    _packet, _overload = _name.split(".")
    _op = getattr(getattr(aten, _packet, None), _overload, None)
    if _op is not None:
        _PRODUCTS.add(_op)


def _widen(a):
    if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.device.type == "cpu":
        return a.float()
    if isinstance(a, (list, tuple)):
        return type(a)(_widen(x) for x in a)
    return a


class fp32_products(TorchDispatchMode):
    """Within this context, BF16 matrix products and attention on CPU run as FP32 kernels on widened operands,
    their outputs rounded to BF16 (see the module docstring). Other ops and devices are untouched."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _PRODUCTS or not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                                            and a.device.type == "cpu" for a in args):
            return func(*args, **kwargs)
        out = func(*_widen(args), **{k: _widen(v) for k, v in kwargs.items()})
        if isinstance(out, torch.Tensor):
            return out.to(torch.bfloat16)
        # attention returns (output, logsumexp); its backward (grad_q, grad_k, grad_v): round what BF16
        # kernels return in BF16 (everything but the FP32 logsumexp)
        if func.__name__.startswith("_scaled_dot_product_flash_attention_for_cpu") and \
                not func.__name__.endswith("backward"):
            return (out[0].to(torch.bfloat16), *out[1:])
        return type(out)(o.to(torch.bfloat16) if isinstance(o, torch.Tensor) and o.is_floating_point() else o
                         for o in out)
