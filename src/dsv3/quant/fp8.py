"""Block-scaled FP8 as DeepSeek-V3 stores and computes it, in plain torch (runs on CPU and GPU).

The format. A weight W of shape (M, N) is cut into 128x128 blocks (the last row/column of blocks may be
partial). Each block b is stored as e4m3 values q_b with one float32 `weight_scale_inv` s_b such that
W_b ~= q_b * s_b; s_b = amax(|W_b|) / 448, 448 being the largest finite e4m3 value. The name says
"scale_inv" because the scale that *quantises* is 1/s_b. The scale tensor has shape
(ceil(M/128), ceil(N/128)). DeepSeek-V3.1 checkpoints (`scale_fmt: ue8m0`) round every s_b up to a power
of two, so that dequantisation is an exponent add; reading them is the same.

Activations (the official demo's GEMM, and FP8 training) are quantised per 1x128 tile along the
reduction dimension, with the same amax/448 rule, at run time ("activation_scheme: dynamic").

The functions here are the references: `quant/kernels.py` may replace them on a GPU with the same
signatures, and tests hold the two together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128


def scale_shape(shape: tuple[int, ...] | torch.Size, block: int = BLOCK) -> tuple[int, ...]:
    """The `weight_scale_inv` shape for a weight of `shape` (leading dims, e.g. experts, kept)."""
    *lead, m, n = shape
    return (*lead, -(-m // block), -(-n // block))


def _expand_blocks(s: torch.Tensor, m: int, n: int, block: int) -> torch.Tensor:
    # (..., ceil(m/b), ceil(n/b)) -> (..., m, n), each scale repeated over its block, edge blocks cut
    return s.repeat_interleave(block, dim=-2)[..., :m, :].repeat_interleave(block, dim=-1)[..., :n]


def weight_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int = BLOCK) -> torch.Tensor:
    """e4m3 weight (..., M, N) and its block scales -> the weight in `dtype` (products taken in float32)."""
    m, n = q.shape[-2:]
    expected = scale_shape(q.shape, block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale.shape)}; a weight of shape "
                         f"{tuple(q.shape)} needs {expected} ({block}x{block} blocks)")
    return (q.to(torch.float32) * _expand_blocks(scale.to(torch.float32), m, n, block)).to(dtype)


def weight_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (..., M, N) -> (e4m3 weight, float32 block scales), the inverse of `weight_dequant`.

    scale_fmt="ue8m0" rounds each scale up to a power of two (DeepSeek-V3.1's format).
    """
    *lead, m, n = w.shape
    mb, nb = -(-m // block), -(-n // block)
    w32 = F.pad(w.to(torch.float32), (0, nb * block - n, 0, mb * block - m))
    blocks = w32.reshape(*lead, mb, block, nb, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., mb, nb)
    scale = amax.clamp(min=1e-12) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt={scale_fmt!r} is not supported; expected None or 'ue8m0'")
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, mb * block, nb * block)[..., :m, :n].to(FP8)
    return q.contiguous(), scale


def act_quant(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (..., K) -> (e4m3 (..., K), float32 scales (..., ceil(K/128))), one scale per 1x128 tile."""
    k = x.shape[-1]
    kb = -(-k // block)
    x32 = F.pad(x.to(torch.float32), (0, kb * block - k)).unflatten(-1, (kb, block))
    scale = x32.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (x32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k].to(FP8)
    return q, scale


def fp8_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """y = x @ W^T from 1x128-tile FP8 activations and 128x128-block FP8 weights, with FP32 accumulation of
    each 128-wide K chunk (what the official demo's Triton GEMM and the V3 training recipe compute)."""
    k = xq.shape[-1]
    x = xq.to(torch.float32) * xs.repeat_interleave(block, dim=-1)[..., :k]
    w = weight_dequant(wq, ws, torch.float32, block)
    return (x @ w.T).to(out_dtype)
