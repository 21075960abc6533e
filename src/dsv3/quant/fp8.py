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
AMAX_FLOOR = 1e-12  # an all-zero tile still gets a finite scale (its values quantise to 0 exactly)
SCALE_FMTS = (None, "ue8m0")


def round_scale(scale: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """None: the scale as computed. "ue8m0": rounded up to the next power of two (kept if it is one), exactly,
    from the float's exponent and mantissa bits rather than through log2, whose rounding can land a value
    just above 2^k on k and round it down, so the tile's max would overflow e4m3."""
    if scale_fmt is None:
        return scale
    if scale_fmt != "ue8m0":
        raise ValueError(f"scale_fmt={scale_fmt!r} is not supported; expected one of {SCALE_FMTS}")
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))


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
    s32 = scale.to(torch.float32)
    if m % block or n % block:  # edge blocks: each scale spelled out over its (cut) block
        return (q.to(torch.float32) * _expand_blocks(s32, m, n, block)).to(dtype)
    w = q.to(torch.float32).unflatten(-1, (n // block, block)).unflatten(-3, (m // block, block))
    return w.mul_(s32[..., :, None, :, None]).view(q.shape).to(dtype)


def _amax(t: torch.Tensor, dim) -> torch.Tensor:
    """max |t| over dim without materialising |t|."""
    return torch.maximum(t.amax(dim=dim), t.amin(dim=dim).neg_())


def weight_quant(w: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (..., M, N) -> (e4m3 weight, float32 block scales), the inverse of `weight_dequant`: per 128x128
    block s = amax(|block|) / 448 (rounded up to a power of two with scale_fmt="ue8m0", DeepSeek-V3.1's
    format), q = e4m3(w / s) rounded to nearest, ties to even."""
    *lead, m, n = w.shape
    mb, nb = -(-m // block), -(-n // block)
    w32 = w.to(torch.float32)
    if m % block or n % block:
        w32 = F.pad(w32, (0, nb * block - n, 0, mb * block - m))
    blocks = w32.reshape(*lead, mb, block, nb, block)
    scale = round_scale(_amax(blocks, (-3, -1)).clamp_(min=AMAX_FLOOR) / FP8_MAX, scale_fmt)  # (..., mb, nb)
    q = torch.div(blocks, scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, mb * block, nb * block)[..., :m, :n].to(FP8)
    return q.contiguous(), scale


def act_quant(x: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (..., K) -> (e4m3 (..., K), float32 scales (..., ceil(K/128))), one scale per 1x128 tile
    along the last dimension: s = amax(|tile|) / 448 (rounded up to a power of two with scale_fmt="ue8m0"),
    q = e4m3(x / s) rounded to nearest, ties to even. A partial last tile is scaled by its own amax."""
    k = x.shape[-1]
    kb = -(-k // block)
    x32 = x.to(torch.float32)
    if k % block:
        x32 = F.pad(x32, (0, kb * block - k))
    tiles = x32.unflatten(-1, (kb, block))
    scale = round_scale(_amax(tiles, -1).clamp_(min=AMAX_FLOOR) / FP8_MAX, scale_fmt)
    q = torch.div(tiles, scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k].to(FP8)
    return q.contiguous(), scale


def act_dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                block: int = BLOCK) -> torch.Tensor:
    """The inverse of `act_quant`: e4m3 (..., K) and its 1x128 tile scales -> q * s in `dtype`."""
    k = q.shape[-1]
    kb = -(-k // block)
    if scale.shape[-1] != kb or scale.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scales of shape {tuple(scale.shape)} do not tile a tensor of shape {tuple(q.shape)} "
                         f"in 1x{block} tiles")
    if k % block:
        return (q.to(torch.float32) * scale.repeat_interleave(block, dim=-1)[..., :k]).to(dtype)
    return q.to(torch.float32).unflatten(-1, (kb, block)).mul_(scale[..., None]).flatten(-2).to(dtype)


def requant_transpose(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK, scale_fmt: str | None = "ue8m0"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) e4m3 in 1x128 tiles -> its transpose (K, M) in 1x128 tiles, i.e. the same values in 128x1 tiles
    of the original: what the weight gradient dW = dY^T X needs from an input X cached in FP8 for the forward.
    With power-of-two scales on both sides every value survives exactly unless it falls below e4m3's smallest
    subnormal in its new, larger-scaled tile (V3 report §3.3.3: "round scaled" factors for exactly this)."""
    return act_quant(act_dequant(q, scale, block=block).T, block, scale_fmt)


def fp8_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """y = x @ W^T from 1x128-tile FP8 activations and 128x128-block FP8 weights, with FP32 accumulation of
    each 128-wide K chunk (what the official demo's Triton GEMM and the V3 training recipe compute): the
    forward GEMM and the input-gradient GEMM (dX = dY W, W's blocks transposed) of a Linear."""
    x = act_dequant(xq, xs, block=block)
    w = weight_dequant(wq, ws, torch.float32, block)
    return (x @ w.T).to(out_dtype)


def fp8_gemm_1d1d_ref(aq: torch.Tensor, a_s: torch.Tensor, bq: torch.Tensor, b_s: torch.Tensor,
                      out_dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """a @ b^T with both operands (M, K), (N, K) in 1x128 tiles along K: the weight-gradient GEMM of a Linear
    (a = dY^T, b = X^T, K = tokens). Each 128-wide K chunk's FP32 partial sum times both tiles' scales."""
    return (act_dequant(aq, a_s, block=block) @ act_dequant(bq, b_s, block=block).T).to(out_dtype)


def _check_offs(offs: torch.Tensor, rows: int, groups: int, block: int) -> None:
    if offs.shape != (groups,):
        raise ValueError(f"offs has shape {tuple(offs.shape)}; expected ({groups},), one end offset per group")
    if offs.numel() and int(offs[-1]) > rows:
        raise ValueError(f"offs ends at {int(offs[-1])}, past the {rows} rows given")


def fp8_grouped_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                         offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK
                         ) -> torch.Tensor:
    """Grouped along M: rows offs[g-1]:offs[g] of x (S, K) (1x128 tiles) times W_g^T for W (G, N, K) (128x128
    blocks, scales (G, ceil(N/128), ceil(K/128))) -> (S, N); rows past offs[-1] are zero. The routed experts'
    forward and input-gradient GEMMs, one call for every expert."""
    _check_offs(offs, xq.shape[0], wq.shape[0], block)
    x = act_dequant(xq, xs, block=block)
    w = weight_dequant(wq, ws, torch.float32, block)
    y = F.grouped_mm(x, w.transpose(1, 2), offs=offs.to(torch.int32))
    if offs.numel() and int(offs[-1]) < y.shape[0]:
        y[int(offs[-1]):] = 0  # grouped_mm leaves rows outside every group undefined
    return y.to(out_dtype)


def fp8_grouped_gemm_1d1d_ref(aq: torch.Tensor, a_s: torch.Tensor, bq: torch.Tensor, b_s: torch.Tensor,
                              offs: torch.Tensor, out_dtype: torch.dtype = torch.float32, block: int = BLOCK
                              ) -> torch.Tensor:
    """Grouped along K: a (M, S) and b (N, S), both in 1x128 tiles along S, group g = columns
    offs[g-1]:offs[g] -> (G, M, N) with out[g] = a_g @ b_g^T: the routed experts' weight gradients
    (dW_g = dY_g^T X_g, S = tokens). Every group starts at a multiple of 128 so that no tile spans two groups."""
    _check_offs(offs, aq.shape[1], offs.shape[0], block)
    if bool((offs % block).any()):
        raise ValueError(f"group ends {offs.tolist()} are not multiples of {block}: a tile would span two groups")
    a = act_dequant(aq, a_s, block=block)
    b = act_dequant(bq, b_s, block=block)
    return F.grouped_mm(a, b.T, offs=offs.to(torch.int32)).to(out_dtype)


def truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 x with all but the top `bits` of its 23 fraction bits cleared: rounding toward zero to a float
    with a (bits + 1)-bit significand, as a narrow hardware accumulator keeps it."""
    if not 0 <= bits <= 23:
        raise ValueError(f"bits={bits}: a float32 has 23 fraction bits")
    mask = -(1 << (23 - bits))  # ...111000: ones over the sign, exponent and kept fraction bits
    return (x.to(torch.float32).view(torch.int32) & mask).view(torch.float32)


def gemm_limited_accumulator(a: torch.Tensor, b: torch.Tensor, acc_bits: int | None = 13,
                             promote_every: int | None = BLOCK, mma_k: int = 4) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T as an FP8 tensor core with a narrow accumulator computes it, for the accumulation
    study (V3 report §3.3.2). Each mma_k-wide chunk of K is summed in FP32 and added into an accumulator that keeps `acc_bits` fraction bits, truncated (Hopper's FP8 MMA: about 13, i.e. a 14-bit
    significand); every `promote_every` elements of K that accumulator is added into an FP32 sum and restarted
    (V3's promotion to CUDA cores: 128, four WGMMAs). promote_every=None never promotes; acc_bits=None keeps
    FP32 throughout. a and b hold the dequantised e4m3 operands.

    The granularity is a model, not a measurement: with mma_k=4 (a 4-product dot step per accumulation, as
    tensor cores' dot-product units are usually described) a K=4096 GEMM of random operands without promotion
    is off by ~2% (the report's figure); with mma_k=32 (one whole FP8 WGMMA k-step) by ~0.3%."""
    M, K = a.shape
    if b.shape[1] != K:
        raise ValueError(f"a is {tuple(a.shape)} and b is {tuple(b.shape)}: the K dimensions differ")
    if promote_every is not None and promote_every % mma_k:
        raise ValueError(f"promote_every={promote_every} must be a multiple of mma_k={mma_k}")
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    total = torch.zeros(M, b.shape[0])
    acc = torch.zeros_like(total)
    for k0 in range(0, K, mma_k):
        acc = acc + a32[:, k0:k0 + mma_k] @ b32[:, k0:k0 + mma_k].T
        if acc_bits is not None:
            acc = truncate_mantissa(acc, acc_bits)
        if promote_every is not None and (k0 + mma_k) % promote_every == 0:
            total += acc
            acc.zero_()
    return total + acc
