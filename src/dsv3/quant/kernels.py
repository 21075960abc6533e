"""Triton kernels for block-scaled FP8, with the signatures of the references in `quant/fp8.py`.

    act_quant, weight_quant, requant_transpose        quantisers: bit-exact to the references
    fp8_gemm, fp8_gemm_1d1d                           y = x W^T (1x128 x 128x128), a b^T (1x128 x 1x128)
    fp8_grouped_gemm, fp8_grouped_gemm_1d1d           the same, grouped along M / along K, one launch

The GEMMs accumulate as DeepSeek-V3 does (§3.3.2, and DeepGEMM): per 128-wide chunk of K one `tl.dot` of the
e4m3 tiles into FP32 (on Hopper the tensor core's own limited-precision accumulator), then that partial sum
times the two tiles' scales is added to an FP32 accumulator in registers ("promotion every 128").

Rounding to e4m3 is done here in float32 arithmetic (`_round_to_e4m3`), and only values already on the e4m3
grid are cast: triton 3.9's interpreter (TRITON_INTERPRET=1, what CI runs on CPU) rounds float32 -> e4m3
casts wrongly in three ways (the carry of a mantissa that rounds up is lost when the exponent is odd: 7.75 ->
4, -7.79 -> -4; ties go away from zero, not to even; subnormal results are truncated), while values already
on the grid convert exactly there as on a GPU.

Triton reads TRITON_INTERPRET when a kernel is decorated: its own library (tl.max, tl.sum) when triton is
first imported, the kernels below when this module is. Without triton the module still imports (the kernels
stay plain functions) and `available()` is False.
"""

from __future__ import annotations

import os

import torch

from dsv3.quant import fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # the references in fp8.py are the fallback
    triton = tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as triton.jit sees it below


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def available() -> bool:
    """Triton is importable and can run here: a CUDA device with FP8 tensor cores (sm_89+), or the interpreter
    (TRITON_INTERPRET=1 when this module was imported)."""
    if triton is None:
        return False
    return _INTERPRET or (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9))


# ---------------------------------------------------------------------------------------------------------
# Device helpers


@_jit
def _round_to_e4m3(y):
    """float32 y with |y| <= 448 -> e4m3, rounded to nearest, ties to even, in float32 arithmetic.

    e4m3 keeps 3 mantissa bits: at exponent e (|y| in [2^e, 2^(e+1))) its values are spaced ulp = 2^(e-3);
    below 2^-6 (subnormals) they are spaced 2^-9. So |y| / ulp is rounded to an integer (adding and
    subtracting 2^23 rounds a float32 in [0, 2^22) to nearest-even) and multiplied back; a value that rounds
    up to 2^(e+1) is then simply that power of two. The exponent comes from the float's bits, exactly."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum((bits >> 23) & 0xFF, 127 - 6)  # biased float32 exponent, floored at e4m3's 2^-6
    ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)  # 2^(e-3)
    inv_ulp = ((257 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e): both exact, no division
    n = (tl.abs(y) * inv_ulp + 8388608.0) - 8388608.0  # |y| / ulp < 16, rounded to nearest-even
    r = n * ulp
    r = tl.where(bits < 0, -r, r)  # the sign from the bits: -0.0 and negatives rounding to 0 stay -0.0
    return r.to(tl.float8e4nv)


@_jit
def _scale(amax, UE8M0: tl.constexpr):
    """fp8.act_quant's scale: max(amax, 1e-12) / 448, with UE8M0 rounded up to a power of two (kept if it is
    one) from its bits, as fp8.round_scale does."""
    s = tl.div_rn(tl.maximum(amax, 1e-12), 448.0)  # fp8.AMAX_FLOOR, fp8.FP8_MAX; IEEE division as torch's
    if UE8M0:
        s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@_jit
def _quantise(x, s):
    """e4m3(clamp(x / s, +-448)), exactly as fp8.act_quant computes it in float32."""
    return _round_to_e4m3(tl.clamp(tl.div_rn(x, s), -448.0, 448.0))


@_jit
def _block_scaled_dot(acc, a_ptr, a_s_ptr, b_ptr, b_s_ptr, offs_m, offs_n, mask_m, mask_n, k_lo, k_hi,
                      stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                      B_ROWS_PER_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += sum over the K chunks [k0, k0 + BLOCK_K) of [k_lo, k_hi) (k_lo a multiple of
    BLOCK_K) of dot(a_chunk, b_chunk^T) * a_s[m, k0 / BLOCK_K] * b_s[n / B_ROWS_PER_SCALE, k0 / BLOCK_K].
    a is (M, K) e4m3 in 1xBLOCK_K tiles; b is (N, K) e4m3 in BLOCK_KxBLOCK_K blocks (B_ROWS_PER_SCALE =
    BLOCK_K) or 1xBLOCK_K tiles (1). Masked rows and columns load as 0 and add nothing."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < k_hi
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + k[None, :] * stride_bk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        kb = k0 // BLOCK_K
        a_s = tl.load(a_s_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptr + (offs_n // B_ROWS_PER_SCALE) * stride_bsn + kb * stride_bsk, mask=mask_n, other=0.0)
        # the chunk's FP32 sum of exact e4m3 products, promoted with both scales into the FP32 accumulator
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    return acc


# ---------------------------------------------------------------------------------------------------------
# Kernels: one per op (the two ungrouped GEMMs share one, differing in the weight's scale rows)


@_jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk,
                      UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j): rows [i*BLOCK_M, (i+1)*BLOCK_M) of x (M, K) times the 1xBLOCK_K tile j along K; one scale
    per row of the tile. q is (M, K) and s (M, ceil(K/BLOCK_K)), both contiguous."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets past 2^31 elements
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = _scale(tl.max(tl.abs(x), axis=1), UE8M0)  # (BLOCK_M,): a partial tile's padding is 0, as the ref's
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _quantise(x, s[:, None]), mask=mask)
    tl.store(s_ptr + rows * tl.num_programs(1) + tl.program_id(1), s, mask=rows < M)


@_jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_wk,
                         UE8M0: tl.constexpr, BLOCK: tl.constexpr):
    """Program (i, j, e): the BLOCKxBLOCK block (i, j) of weight e of w (E, N, K); one scale per block.
    q is (E, N, K) and s (E, ceil(N/BLOCK), ceil(K/BLOCK)), both contiguous."""
    i, j, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # 256 experts: > 2^31 elements
    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), UE8M0)
    tl.store(q_ptr + e * N * K + rows[:, None] * K + cols[None, :], _quantise(w, s), mask=mask)
    tl.store(s_ptr + (e * tl.num_programs(0) + i) * tl.num_programs(1) + j, s)


@_jit
def _requant_transpose_kernel(q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_qm, stride_qk, stride_sm, stride_sk,
                              UE8M0: tl.constexpr, BLOCK: tl.constexpr):
    """Program (i, j): the BLOCKxBLOCK block (rows i, columns j) of q (M, K) in 1xBLOCK tiles along K, i.e. one
    old scale per row; dequantised, then requantised along its columns: 128 new 1xBLOCK tiles, rows of the
    transpose qt (K, M) (contiguous), with scales st (K, ceil(M/BLOCK)) (contiguous)."""
    i, j = tl.program_id(0), tl.program_id(1)
    rows = (i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # along M
    cols = (j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # along K
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qk, mask=mask, other=0.0)
    s = tl.load(s_ptr + rows * stride_sm + j * stride_sk, mask=rows < M, other=0.0)
    x = tl.trans(q.to(tl.float32) * s[:, None])  # (BLOCK along K, BLOCK along M): fp8.act_dequant's product
    s_new = _scale(tl.max(tl.abs(x), axis=1), UE8M0)
    tl.store(qt_ptr + cols[:, None] * M + rows[None, :], _quantise(x, s_new[:, None]), mask=tl.trans(mask))
    tl.store(st_ptr + cols * tl.num_programs(0) + i, s_new, mask=cols < K)


@_jit
def _fp8_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                     stride_cm, stride_cn,
                     B_ROWS_PER_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Program (i, j): the BLOCK_MxBLOCK_N tile (i, j) of c = a b^T (M, N), over all of K. b's scales cover
    B_ROWS_PER_SCALE rows each: BLOCK_K for 128x128-block weights (fp8_gemm), 1 for 1x128 tiles (1d1d)."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets past 2^31 elements
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _block_scaled_dot(acc, a_ptr, a_s_ptr, b_ptr, b_s_ptr, offs_m, offs_n, mask_m, mask_n, 0, K,
                            stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                            B_ROWS_PER_SCALE, BLOCK_K)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@_jit
def _fp8_grouped_gemm_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, offs_ptr, M, N, K, G,
                             stride_am, stride_ak, stride_asm, stride_ask, stride_bg, stride_bn, stride_bk,
                             stride_bsg, stride_bsn, stride_bsk, stride_cm, stride_cn,
                             BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """Program (i, j): the BLOCK_MxBLOCK_N tile (i, j) of c (M, N), whose rows in group g (offs[g-1] <= row <
    offs[g]) are a_rows b_g^T, b (G, N, K) in 128x128 blocks. A tile that spans several groups takes each in
    turn with the other rows masked; rows in no group (past offs[-1]) stay 0."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets past 2^31 elements
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    # the groups meeting rows [m0, m0 + BLOCK_M): from the first that ends after m0 to the last that starts before
    m0 = tl.program_id(0) * BLOCK_M
    g_idx = tl.arange(0, BLOCK_G)
    ends = tl.load(offs_ptr + g_idx, mask=g_idx < G, other=2**31 - 1)
    g_first = tl.sum((ends <= m0).to(tl.int32))
    g_stop = tl.minimum(tl.sum((ends < m0 + BLOCK_M).to(tl.int32)) + 1, G)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_first, g_stop):
        start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        end = tl.load(offs_ptr + g)
        if end > start:  # empty groups cost nothing
            in_group = (offs_m >= start) & (offs_m < end)
            b_g = b_ptr + tl.cast(g, tl.int64) * stride_bg  # past 2^31 elements for V3's 256 experts
            acc = _block_scaled_dot(acc, a_ptr, a_s_ptr, b_g, b_s_ptr + g * stride_bsg,
                                    offs_m, offs_n, in_group, mask_n, 0, K,
                                    stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk,
                                    stride_bsn, stride_bsk, BLOCK_K, BLOCK_K)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


@_jit
def _fp8_grouped_gemm_1d1d_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, offs_ptr, M, N,
                                  stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk,
                                  stride_bsn, stride_bsk, stride_cg, stride_cm, stride_cn,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j, g): the BLOCK_MxBLOCK_N tile (i, j) of c[g] = a_g b_g^T (G, M, N), a_g and b_g the columns
    offs[g-1]:offs[g] of a (M, S) and b (N, S), both in 1x128 tiles along S; group ends are multiples of
    BLOCK_K, so every chunk is one tile of each. An empty group's tile is 0."""
    g = tl.program_id(2).to(tl.int64)
    start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(offs_ptr + g)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets past 2^31 elements
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _block_scaled_dot(acc, a_ptr, a_s_ptr, b_ptr, b_s_ptr, offs_m, offs_n, mask_m, mask_n, start, end,
                            stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                            1, BLOCK_K)
    tl.store(c_ptr + g * stride_cg + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------------------
# Host side: checks, shapes, launches


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _require(*tensors: torch.Tensor) -> None:
    if not available():
        raise RuntimeError("the FP8 Triton kernels need triton and a CUDA device of compute capability >= 8.9, "
                           "or TRITON_INTERPRET=1 set before dsv3.quant.kernels is imported; use dsv3.quant.fp8")
    for t in tensors:
        if not _INTERPRET and t.device.type != "cuda":
            raise ValueError(f"a tensor on {t.device} was given to a CUDA kernel")


def _check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block}: the kernels need a power of two >= 16 (the format's is 128)")


def _check_scale_fmt(scale_fmt: str | None) -> bool:
    if scale_fmt not in fp8.SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r} is not supported; expected one of {fp8.SCALE_FMTS}")
    return scale_fmt == "ue8m0"


def _check_fp8(name: str, t: torch.Tensor, dim: int | None = None) -> None:
    if t.dtype != fp8.FP8:
        raise ValueError(f"{name} has dtype {t.dtype}; expected {fp8.FP8}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {dim} dimensions")


def _check_tile_scales(name: str, q: torch.Tensor, s: torch.Tensor, block: int) -> None:
    expected = (*q.shape[:-1], _cdiv(q.shape[-1], block))
    if tuple(s.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(s.shape)}; 1x{block} tiles of a tensor of shape "
                         f"{tuple(q.shape)} need {expected}")


def _check_block_scales(name: str, q: torch.Tensor, s: torch.Tensor, block: int) -> None:
    expected = fp8.scale_shape(q.shape, block)
    if tuple(s.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(s.shape)}; a weight of shape {tuple(q.shape)} needs "
                         f"{expected} ({block}x{block} blocks)")


def _check_reduction(a: str, ka: int, b: str, kb: int) -> None:
    if ka != kb:
        raise ValueError(f"{a} and {b} must share the reduction dimension: {ka} != {kb}")


def _check_offs(offs: torch.Tensor, rows: int, groups: int, block: int, aligned: bool) -> None:
    fp8._check_offs(offs, rows, groups, block)
    if offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offs has dtype {offs.dtype}; expected int32 or int64")
    if offs.numel() and bool((offs < 0).any() or (offs.diff() < 0).any()):
        raise ValueError(f"offs {offs.tolist()} must be non-decreasing end offsets >= 0")
    if aligned and bool((offs % block).any()):
        raise ValueError(f"group ends {offs.tolist()} are not multiples of {block}: a tile would span two groups")


def _gemm_blocks(m: int) -> dict:
    """A couple of sensible tilings: small M (decode, small groups) wastes less with 64 rows."""
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def act_quant(x: torch.Tensor, block: int = fp8.BLOCK, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.act_quant: x (..., K) -> (e4m3 (..., K), float32 scales (..., ceil(K/block))), bit for bit."""
    _require(x)
    _check_block(block)
    ue8m0 = _check_scale_fmt(scale_fmt)
    *lead, k = x.shape
    x2 = x.reshape(-1, k)  # a view where the strides allow it
    m, kb = x2.shape[0], _cdiv(k, block)
    q = torch.empty(x.shape, dtype=fp8.FP8, device=x.device)
    s = torch.empty((*lead, kb), dtype=torch.float32, device=x.device)
    if q.numel():
        block_m = 32
        _act_quant_kernel[(_cdiv(m, block_m), kb)](x2, q, s, m, k, x2.stride(0), x2.stride(1),
                                                     UE8M0=ue8m0, BLOCK_M=block_m, BLOCK_K=block)
    return q, s


def weight_quant(w: torch.Tensor, block: int = fp8.BLOCK, scale_fmt: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.weight_quant: w (..., N, K) -> (e4m3 (..., N, K), float32 block scales), bit for bit."""
    _require(w)
    _check_block(block)
    ue8m0 = _check_scale_fmt(scale_fmt)
    if w.dim() < 2:
        raise ValueError(f"a weight has at least 2 dimensions; got shape {tuple(w.shape)}")
    *lead, n, k = w.shape
    w3 = w.reshape(-1, n, k)
    q = torch.empty(w.shape, dtype=fp8.FP8, device=w.device)
    s = torch.empty(fp8.scale_shape(w.shape, block), dtype=torch.float32, device=w.device)
    if q.numel():
        grid = (_cdiv(n, block), _cdiv(k, block), w3.shape[0])
        _weight_quant_kernel[grid](w3, q, s, n, k, *w3.stride(), UE8M0=ue8m0, BLOCK=block,
                                   num_warps=8 if block >= 128 else 4)
    return q, s


def requant_transpose(q: torch.Tensor, scale: torch.Tensor, block: int = fp8.BLOCK,
                      scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.requant_transpose: (M, K) e4m3 in 1x128 tiles -> its transpose (K, M) in 1x128 tiles, bit for bit,
    in one pass (the dequantised values never reach memory)."""
    _require(q, scale)
    _check_block(block)
    ue8m0 = _check_scale_fmt(scale_fmt)
    _check_fp8("q", q, dim=2)
    _check_tile_scales("scale", q, scale, block)
    m, k = q.shape
    qt = torch.empty((k, m), dtype=fp8.FP8, device=q.device)
    st = torch.empty((k, _cdiv(m, block)), dtype=torch.float32, device=q.device)
    if q.numel():
        _requant_transpose_kernel[(_cdiv(m, block), _cdiv(k, block))](
            q, scale, qt, st, m, k, *q.stride(), *scale.stride(), UE8M0=ue8m0, BLOCK=block,
            num_warps=8 if block >= 128 else 4)
    return qt, st


def _gemm(aq, a_s, bq, b_s, out_dtype, block, b_rows_per_scale):
    *lead, k = aq.shape
    a2, a_s2 = aq.reshape(-1, k), a_s.reshape(-1, a_s.shape[-1])
    m, n = a2.shape[0], bq.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=aq.device)
    if c.numel():
        cfg = _gemm_blocks(m)
        grid = (_cdiv(m, cfg["BLOCK_M"]), _cdiv(n, cfg["BLOCK_N"]))
        _fp8_gemm_kernel[grid](a2, a_s2, bq, b_s, c, m, n, k, *a2.stride(), *a_s2.stride(), *bq.stride(),
                               *b_s.stride(), *c.stride(), B_ROWS_PER_SCALE=b_rows_per_scale, BLOCK_K=block, **cfg)
    return c.reshape(*lead, n)


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block: int = fp8.BLOCK) -> torch.Tensor:
    """fp8.fp8_gemm_ref: y (..., N) = x W^T from x (..., K) in 1x128 tiles and W (N, K) in 128x128 blocks."""
    _require(xq, xs, wq, ws)
    _check_block(block)
    _check_fp8("xq", xq)
    _check_fp8("wq", wq, dim=2)
    _check_reduction("xq", xq.shape[-1], "wq", wq.shape[-1])
    _check_tile_scales("xs", xq, xs, block)
    _check_block_scales("ws", wq, ws, block)
    return _gemm(xq, xs, wq, ws, out_dtype, block, b_rows_per_scale=block)


def fp8_gemm_1d1d(aq: torch.Tensor, a_s: torch.Tensor, bq: torch.Tensor, b_s: torch.Tensor,
                  out_dtype: torch.dtype = torch.float32, block: int = fp8.BLOCK) -> torch.Tensor:
    """fp8.fp8_gemm_1d1d_ref: a (M, K) @ b (N, K)^T, both in 1x128 tiles along K (weight gradients)."""
    _require(aq, a_s, bq, b_s)
    _check_block(block)
    _check_fp8("aq", aq, dim=2)
    _check_fp8("bq", bq, dim=2)
    _check_reduction("aq", aq.shape[1], "bq", bq.shape[1])
    _check_tile_scales("a_s", aq, a_s, block)
    _check_tile_scales("b_s", bq, b_s, block)
    return _gemm(aq, a_s, bq, b_s, out_dtype, block, b_rows_per_scale=1)


def fp8_grouped_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16, block: int = fp8.BLOCK) -> torch.Tensor:
    """fp8.fp8_grouped_gemm_ref: rows offs[g-1]:offs[g] of x (S, K) times W_g^T, W (G, N, K) in 128x128 blocks
    -> (S, N), rows past offs[-1] zero; one launch for every group."""
    _require(xq, xs, wq, ws, offs)
    _check_block(block)
    _check_fp8("xq", xq, dim=2)
    _check_fp8("wq", wq, dim=3)
    _check_reduction("xq", xq.shape[1], "wq", wq.shape[2])
    _check_tile_scales("xs", xq, xs, block)
    _check_block_scales("ws", wq, ws, block)
    _check_offs(offs, xq.shape[0], wq.shape[0], block, aligned=False)
    (s_rows, k), (g, n, _) = xq.shape, wq.shape
    y = torch.zeros((s_rows, n), dtype=out_dtype, device=xq.device)
    if y.numel() and g:
        cfg = _gemm_blocks(s_rows // g)  # the tile height that fits a typical group
        grid = (_cdiv(s_rows, cfg["BLOCK_M"]), _cdiv(n, cfg["BLOCK_N"]))
        _fp8_grouped_gemm_kernel[grid](xq, xs, wq, ws, y, offs, s_rows, n, k, g, *xq.stride(), *xs.stride(),
                                       *wq.stride(), *ws.stride(), *y.stride(),
                                       BLOCK_G=triton.next_power_of_2(g), BLOCK_K=block, **cfg)
    return y


def fp8_grouped_gemm_1d1d(aq: torch.Tensor, a_s: torch.Tensor, bq: torch.Tensor, b_s: torch.Tensor,
                          offs: torch.Tensor, out_dtype: torch.dtype = torch.float32, block: int = fp8.BLOCK
                          ) -> torch.Tensor:
    """fp8.fp8_grouped_gemm_1d1d_ref: a (M, S), b (N, S) in 1x128 tiles along S, group g = columns
    offs[g-1]:offs[g] (multiples of 128) -> (G, M, N) with out[g] = a_g b_g^T."""
    _require(aq, a_s, bq, b_s, offs)
    _check_block(block)
    _check_fp8("aq", aq, dim=2)
    _check_fp8("bq", bq, dim=2)
    _check_reduction("aq", aq.shape[1], "bq", bq.shape[1])
    _check_tile_scales("a_s", aq, a_s, block)
    _check_tile_scales("b_s", bq, b_s, block)
    if offs.dim() != 1:
        raise ValueError(f"offs has shape {tuple(offs.shape)}; expected (G,), one end offset per group")
    _check_offs(offs, aq.shape[1], offs.shape[0], block, aligned=True)
    (m, _), n, g = aq.shape, bq.shape[0], offs.shape[0]
    c = torch.empty((g, m, n), dtype=out_dtype, device=aq.device)
    if c.numel():
        cfg = _gemm_blocks(m)
        grid = (_cdiv(m, cfg["BLOCK_M"]), _cdiv(n, cfg["BLOCK_N"]), g)
        _fp8_grouped_gemm_1d1d_kernel[grid](aq, a_s, bq, b_s, c, offs, m, n, *aq.stride(), *a_s.stride(),
                                            *bq.stride(), *b_s.stride(), *c.stride(), BLOCK_K=block, **cfg)
    return c
