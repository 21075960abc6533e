"""quant/kernels.py held to the references in quant/fp8.py: quantisers bit for bit, GEMMs within float32
reordering. The references always run on CPU. With CUDA the kernels run on the GPU (benchmarks/gpu_checks.sh);
without it, on CPU under triton's interpreter, which must be chosen (TRITON_INTERPRET=1) before triton is first
imported: triton's own library functions (tl.max, tl.sum) are decorated then. Other tests may import triton
first (torch.compile does), so this file runs itself in a child process with the variable set, and no other
test ever sees the interpreter."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from dsv3.quant import fp8

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FMTS = [None, "ue8m0"]


def test_kernels_under_the_interpreter():
    """Without CUDA: every other test of this file, in a child process started under the interpreter."""
    if CUDA or INTERPRETED:
        pytest.skip("the kernels' tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", __file__],
                           env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-4000:]


@pytest.fixture(scope="module")
def K():
    """dsv3.quant.kernels, where it can run in this process."""
    if not (CUDA or INTERPRETED):
        pytest.skip("run by test_kernels_under_the_interpreter in a child process")
    from dsv3.quant import kernels
    assert kernels.available()
    return kernels


def bits(q: torch.Tensor) -> torch.Tensor:
    return q.cpu().view(torch.uint8)


def assert_same_quantisation(got, want):
    (q, s), (rq, rs) = got, want
    assert q.dtype == fp8.FP8 and s.dtype == torch.float32
    assert q.shape == rq.shape and s.shape == rs.shape
    bad = (bits(q) != bits(rq)).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} e4m3 codes differ, first at {bad[0].tolist()}"
    assert torch.equal(s.cpu(), rs), "scales differ"


def varied(*shape: int, seed: int = 0) -> torch.Tensor:
    """Normal values whose range differs by column (1e-4 .. 1e2): every tile and block has its own scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1])


# ---------------------------------------------------------------------------------------------------------
# e4m3 rounding at every boundary: triton 3.9's interpreter casts float32 -> e4m3 wrongly (no carry into the
# exponent when the mantissa rounds up: -7.79 -> -4.0; subnormals truncated), so the kernels round in float32
# arithmetic themselves, and this test holds them to torch's cast at every point where rounding can go wrong.


def e4m3_boundary_values() -> torch.Tensor:
    """Every finite e4m3 value >= 0; the midpoint between each neighbouring pair (ties: to even), one float32
    step either side of it, and the quarter points: across every power of two (2^k (1 - 2^-5) is the tie
    below 2^k), through the subnormals (2^-9 grid below 2^-6) and down to values that round to 0. Both signs."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(fp8.FP8).float()  # 0 .. 448 ascending; 0x7f is NaN
    lo, hi = grid[:-1], grid[1:]
    mid = (lo + hi) / 2  # exact in float32
    vals = torch.cat([grid, mid, torch.nextafter(mid, hi), torch.nextafter(mid, lo), lo + (hi - lo) / 4,
                      hi - (hi - lo) / 4, torch.tensor([7.79, 2.0 ** -11, 2.0 ** -12, 1e-30])])
    return torch.cat([vals, -vals])


def tiles_with_unit_scale(vals: torch.Tensor) -> torch.Tensor:
    """Rows of 128: 448 first (so amax / 448 = 1 exactly, for both scale formats), then 127 of `vals`: the
    quantiser must round exactly the given values."""
    rows = -(-vals.numel() // 127)
    body = torch.cat([vals, torch.zeros(rows * 127 - vals.numel())]).reshape(rows, 127)
    return torch.cat([torch.full((rows, 1), 448.0), body], dim=1)


@pytest.mark.parametrize("scale_fmt", FMTS)
def test_e4m3_rounding_at_every_boundary_is_torchs(K, scale_fmt):
    vals = e4m3_boundary_values()
    x = tiles_with_unit_scale(vals)
    ref = fp8.act_quant(x, scale_fmt=scale_fmt)
    assert torch.equal(ref[1], torch.ones(x.shape[0], 1))
    assert torch.equal(bits(ref[0]), bits(x.to(fp8.FP8)))  # the reference is torch's cast itself here
    assert_same_quantisation(K.act_quant(x.to(DEVICE), scale_fmt=scale_fmt), ref)
    assert_same_quantisation(K.weight_quant(x.to(DEVICE), scale_fmt=scale_fmt), fp8.weight_quant(x, scale_fmt=scale_fmt))


def test_e4m3_rounding_of_the_issue_example(K):
    x = torch.zeros(1, 128)
    x[0, :3] = torch.tensor([448.0, -7.79, 7.79])
    q, _ = K.act_quant(x.to(DEVICE))
    assert q.cpu()[0, :3].float().tolist() == [448.0, -8.0, 8.0]


# ---------------------------------------------------------------------------------------------------------
# Quantisers: bit-exact


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("shape", [(3, 5, 300), (7, 129), (33, 64), (1, 128)])
def test_act_quant_is_bit_exact(K, shape, scale_fmt):
    x = varied(*shape)
    if shape[-1] >= 256:
        x[..., :128] = 0  # an all-zero tile: the amax floor
    assert_same_quantisation(K.act_quant(x.to(DEVICE), scale_fmt=scale_fmt), fp8.act_quant(x, scale_fmt=scale_fmt))


def test_act_quant_bf16_and_strided_inputs(K):
    x = varied(300, 40).to(torch.bfloat16)
    assert_same_quantisation(K.act_quant(x.to(DEVICE).T), fp8.act_quant(x.T))  # a transposed view
    x = varied(6, 2, 200)
    assert_same_quantisation(K.act_quant(x.to(DEVICE)[:, 1], scale_fmt="ue8m0"), fp8.act_quant(x[:, 1], scale_fmt="ue8m0"))


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("shape", [(200, 300), (3, 130, 129), (128, 128)])
def test_weight_quant_is_bit_exact(K, shape, scale_fmt):
    w = varied(*shape, seed=1)
    assert_same_quantisation(K.weight_quant(w.to(DEVICE), scale_fmt=scale_fmt), fp8.weight_quant(w, scale_fmt=scale_fmt))
    wt = varied(shape[-1], shape[-2], seed=2)  # a transposed view
    assert_same_quantisation(K.weight_quant(wt.to(DEVICE).T, scale_fmt=scale_fmt),
                             fp8.weight_quant(wt.T, scale_fmt=scale_fmt))


@pytest.mark.parametrize("scale_fmt", FMTS)
@pytest.mark.parametrize("shape", [(200, 300), (130, 129), (64, 256)])
def test_requant_transpose_is_bit_exact(K, shape, scale_fmt):
    q, s = fp8.act_quant(varied(*shape, seed=3), scale_fmt=scale_fmt)
    got = K.requant_transpose(q.to(DEVICE), s.to(DEVICE), scale_fmt=scale_fmt)
    assert_same_quantisation(got, fp8.requant_transpose(q, s, scale_fmt=scale_fmt))


# ---------------------------------------------------------------------------------------------------------
# GEMMs: the reference dequantises both operands (two float32 roundings per product) and sums the K products
# with torch's float32 matmul; the kernel sums each 128-chunk of exact e4m3 products in float32, multiplies by
# the two scales and adds the chunk into a float32 accumulator. Both compute the same exact sum
# sum_k x_k w_k; with u = 2^-24 the standard bound for a float32 sum of n terms is
# |fl(sum) - sum| <= n u sum_k |x_k w_k| (to first order), so the reference is off by at most (K + 2) u |x||w|
# and the kernel by (128 + 2 + K/128) u |x||w| <= (K + 3) u |x||w|, and the two differ by at most
# 2 (K + 4) u |x||w| elementwise, whatever order either sums in. On a GPU the chunk is summed by the tensor
# core, whose FP8 accumulator keeps ~14 bits (V3 report §3.3.2, the reason for promotion every 128): 128 terms
# at 2^-13 each, the kernel's share of the bound. |x||w| is the reference GEMM of |q| (computed in float32: its
# own error is below 1% of the bound, which the factor 1.01 covers).

U = 2.0 ** -24


def abs_fp8(q: torch.Tensor) -> torch.Tensor:
    return (q.view(torch.uint8) & 0x7F).view(fp8.FP8)  # clears the sign bit: |q|, exactly


def assert_reordering_of(y, y_ref, abs_ref, k):
    kernel_share = 128 * 2.0 ** -13 if CUDA else (k + 4) * U
    tol = 1.01 * (kernel_share + (k + 4) * U) * abs_ref.float()
    fp32 = y_ref.dtype == torch.float32
    if not fp32:
        tol = tol + 2.0 ** -7 * y_ref.float().abs()  # each side rounded once more, to an 8-bit mantissa
    y, y_ref = y.cpu().float(), y_ref.float()
    assert y.shape == y_ref.shape
    excess = (y - y_ref).abs() - tol
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond the bound at {excess.argmax().item()}"
    if fp32 and not CUDA and y_ref.norm() > 0:  # float32 throughout: DESIGN's 1e-5 for reassociation
        assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-5


def on(device, *ts):
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("x_shape, n", [((70, 300), 200), ((2, 3, 384), 130), ((5, 260), 64)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm(K, x_shape, n, out_dtype):
    xq, xs = fp8.act_quant(varied(*x_shape, seed=4))
    wq, ws = fp8.weight_quant(varied(n, x_shape[-1], seed=5))
    y = K.fp8_gemm(*on(DEVICE, xq, xs, wq, ws), out_dtype=out_dtype)
    assert y.dtype == out_dtype
    assert_reordering_of(y, fp8.fp8_gemm_ref(xq, xs, wq, ws, out_dtype),
                         fp8.fp8_gemm_ref(abs_fp8(xq), xs, abs_fp8(wq), ws, torch.float32), x_shape[-1])


@pytest.mark.parametrize("m, n, k", [(70, 90, 300), (130, 40, 256)])
def test_fp8_gemm_1d1d(K, m, n, k):
    aq, a_s = fp8.act_quant(varied(m, k, seed=6), scale_fmt="ue8m0")
    bq, b_s = fp8.act_quant(varied(n, k, seed=7), scale_fmt="ue8m0")
    y = K.fp8_gemm_1d1d(*on(DEVICE, aq, a_s, bq, b_s))
    assert y.dtype == torch.float32
    assert_reordering_of(y, fp8.fp8_gemm_1d1d_ref(aq, a_s, bq, b_s),
                         fp8.fp8_gemm_1d1d_ref(abs_fp8(aq), a_s, abs_fp8(bq), b_s), k)


@pytest.mark.parametrize("offs", [
    [0, 50, 50, 200, 280],  # empty first and third groups, one spanning several row tiles, rows past the end
    [17, 300, 300, 300, 300],  # uneven, trailing empty groups, offs[-1] == rows
    [0, 0, 0, 0, 0],  # no rows at all: the output is zero
])
def test_fp8_grouped_gemm(K, offs):
    rows, k, n = 300, 260, 200
    xq, xs = fp8.act_quant(varied(rows, k, seed=8))
    wq, ws = fp8.weight_quant(varied(len(offs), n, k, seed=9))
    offs = torch.tensor(offs)
    y = K.fp8_grouped_gemm(*on(DEVICE, xq, xs, wq, ws, offs), out_dtype=torch.float32)
    ref = fp8.fp8_grouped_gemm_ref(xq, xs, wq, ws, offs, torch.float32)
    assert_reordering_of(y, ref, fp8.fp8_grouped_gemm_ref(abs_fp8(xq), xs, abs_fp8(wq), ws, offs, torch.float32), k)
    assert torch.equal(y.cpu()[int(offs[-1]):], torch.zeros(rows - int(offs[-1]), n))


def test_fp8_grouped_gemm_bf16_one_group_equals_plain_gemm(K):
    xq, xs = fp8.act_quant(varied(100, 256, seed=10))
    wq, ws = fp8.weight_quant(varied(1, 130, 256, seed=11))
    grouped = K.fp8_grouped_gemm(*on(DEVICE, xq, xs, wq, ws, torch.tensor([100])))
    assert grouped.dtype == torch.bfloat16
    assert torch.equal(grouped, K.fp8_gemm(*on(DEVICE, xq, xs, wq[0], ws[0])))  # same tiles, same order


@pytest.mark.parametrize("offs", [[128, 128, 512], [0, 384, 640]])
def test_fp8_grouped_gemm_1d1d(K, offs):
    m, n, s = 70, 90, 640
    aq, a_s = fp8.act_quant(varied(m, s, seed=12), scale_fmt="ue8m0")
    bq, b_s = fp8.act_quant(varied(n, s, seed=13), scale_fmt="ue8m0")
    offs = torch.tensor(offs)
    y = K.fp8_grouped_gemm_1d1d(*on(DEVICE, aq, a_s, bq, b_s, offs))
    assert y.shape == (len(offs), m, n)
    ref = fp8.fp8_grouped_gemm_1d1d_ref(aq, a_s, bq, b_s, offs)
    assert_reordering_of(y, ref, fp8.fp8_grouped_gemm_1d1d_ref(abs_fp8(aq), a_s, abs_fp8(bq), b_s, offs), s)
    sizes = torch.diff(offs, prepend=torch.zeros(1, dtype=offs.dtype))
    for g in (sizes == 0).nonzero().flatten().tolist():
        assert torch.equal(y.cpu()[g], torch.zeros(m, n))  # an empty group's gradient is exactly zero


# ---------------------------------------------------------------------------------------------------------
# What the interpreter cannot check: that each kernel compiles for Hopper (sm_90: H100/H200), through triton's
# compiler and ptxas, with no GPU needed; the GEMMs on the FP8 tensor cores (wgmma). Pointers, sizes and strides
# carry the 16-divisibility and unit strides that launches at V3's sizes get (what lets the loads pipeline).

_CONFIGS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)
_HOPPER = [
    ("_act_quant_kernel", dict(UE8M0=True, BLOCK_M=32, BLOCK_K=128), dict(num_warps=4)),
    ("_weight_quant_kernel", dict(UE8M0=False, BLOCK=128), dict(num_warps=8)),
    ("_requant_transpose_kernel", dict(UE8M0=True, BLOCK=128), dict(num_warps=8)),
    ("_fp8_gemm_kernel", dict(B_ROWS_PER_SCALE=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128),
     dict(num_warps=4, num_stages=4)),
    ("_fp8_gemm_kernel", dict(B_ROWS_PER_SCALE=1, **_CONFIGS), dict(num_warps=8, num_stages=3)),
    ("_fp8_grouped_gemm_kernel", dict(BLOCK_G=256, **_CONFIGS), dict(num_warps=8, num_stages=3)),
    ("_fp8_grouped_gemm_1d1d_kernel", _CONFIGS, dict(num_warps=8, num_stages=3)),
]
_POINTERS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "c_ptr": "*bf16", "offs_ptr": "*i32", "q_ptr": "*fp8e4nv",
             "qt_ptr": "*fp8e4nv", "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv"}  # other pointers: scales, fp32
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_qk", "stride_ak", "stride_bk", "stride_cn", "stride_sk",
                 "stride_ask", "stride_bsk"}
_ALIGNED = {"M", "N", "K", "G", "stride_xm", "stride_we", "stride_wn", "stride_qm", "stride_am", "stride_bg",
            "stride_bn", "stride_cg", "stride_cm"}  # as V3's sizes (7168, ...); the scales' rows (K/128) are not


@pytest.mark.parametrize("name, constexprs, options", _HOPPER, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(_HOPPER)])
def test_kernels_compile_for_hopper(name, constexprs, options, monkeypatch, tmp_path):
    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from dsv3.quant import kernels
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fn = getattr(kernels, name)
    constexprs = {**constexprs, **{a: 1 for a in fn.arg_names if a in _UNIT_STRIDES}}
    signature = {a: "constexpr" if a in constexprs else _POINTERS.get(a, "*fp32") if a.endswith("_ptr") else "i32"
                 for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if a.endswith("_ptr") or a in _ALIGNED}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=aligned)
    compiled = compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    if "gemm" in name:
        assert "wgmma.mma_async" in compiled.asm["ptx"] and ".e4m3.e4m3" in compiled.asm["ptx"]


# ---------------------------------------------------------------------------------------------------------
# The contract: the references' signatures, and clear errors


@pytest.mark.parametrize("name, ref", [
    ("act_quant", "act_quant"), ("weight_quant", "weight_quant"), ("requant_transpose", "requant_transpose"),
    ("fp8_gemm", "fp8_gemm_ref"), ("fp8_gemm_1d1d", "fp8_gemm_1d1d_ref"),
    ("fp8_grouped_gemm", "fp8_grouped_gemm_ref"), ("fp8_grouped_gemm_1d1d", "fp8_grouped_gemm_1d1d_ref"),
])
def test_signatures_are_the_references(K, name, ref):
    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]
    assert params(getattr(K, name)) == params(getattr(fp8, ref))


def test_bad_shapes_are_value_errors(K):
    xq, xs = on(DEVICE, *fp8.act_quant(torch.randn(4, 256)))
    wq, ws = on(DEVICE, *fp8.weight_quant(torch.randn(130, 256)))
    with pytest.raises(ValueError, match="reduction dimension: 256 != 128"):
        K.fp8_gemm(xq, xs, wq[:, :128], ws)
    with pytest.raises(ValueError, match=r"ws has shape \(2, 1\).*needs \(2, 2\)"):
        K.fp8_gemm(xq, xs, wq, ws[:, :1])
    with pytest.raises(ValueError, match=r"xs has shape \(4, 1\).*need \(4, 2\)"):
        K.fp8_gemm(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="xq has dtype torch.float32"):
        K.fp8_gemm(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="scale_fmt='e8m0'"):
        K.act_quant(torch.randn(2, 128, device=DEVICE), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="block=100"):
        K.act_quant(torch.randn(2, 128, device=DEVICE), block=100)
    with pytest.raises(ValueError, match="requant_transpose|q has shape"):
        K.requant_transpose(xq[None], xs[None])
    w3q, w3s = on(DEVICE, *fp8.weight_quant(torch.randn(2, 130, 256)))
    with pytest.raises(ValueError, match="offs ends at 5, past the 4 rows"):
        K.fp8_grouped_gemm(xq, xs, w3q, w3s, torch.tensor([1, 5], device=DEVICE))
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        K.fp8_grouped_gemm(xq, xs, w3q, w3s, torch.tensor([4], device=DEVICE))
    with pytest.raises(ValueError, match="non-decreasing"):
        K.fp8_grouped_gemm(xq, xs, w3q, w3s, torch.tensor([3, 2], device=DEVICE))
    aq, a_s = on(DEVICE, *fp8.act_quant(torch.randn(8, 384)))
    with pytest.raises(ValueError, match="not multiples of 128"):
        K.fp8_grouped_gemm_1d1d(aq, a_s, aq, a_s, torch.tensor([100, 384], device=DEVICE))


def test_fp8_training_modules_through_the_kernels(K, monkeypatch):
    """Float8Linear and Float8Experts (quant/training.py) with the kernels in place of the references, forward
    and backward: the quantisers are bit-exact, so a Linear's three GEMMs differ only by float32 summation order
    (1e-5); the experts requantise GEMM outputs (the SwiGLU's input, its output), where a last-bit difference
    can move a value across an e4m3 rounding boundary: a few elements one e4m3 step apart, 1e-3 in norm."""
    import copy

    from torch import nn

    from dsv3.model.layers import Linear
    from dsv3.model.moe import Experts
    from dsv3.quant import training

    def run(module, args, use_kernels):
        monkeypatch.setattr(training, "ops", (lambda t: K) if use_kernels else (lambda t: training.REFERENCE))
        leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
        m = copy.deepcopy(module)
        y = m(*leaves)
        y.backward(torch.ones_like(y) + torch.linspace(-1, 1, y.numel()).view_as(y))
        return [y.detach(), *(a.grad for a in leaves if a.requires_grad),
                *(p.grad for p in m.parameters() if p.grad is not None)]

    class Holder(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

    g = torch.Generator().manual_seed(0)
    lin = Holder(Linear(256, 384))
    nn.init.normal_(lin.m.weight, std=0.02, generator=g)
    training.convert_to_fp8_training(lin)
    x = torch.randn(200, 256, generator=g).to(DEVICE)
    lin.to(DEVICE)
    for a, b in zip(run(lin.m, [x], True), run(lin.m, [x], False)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() <= 1e-5
    ex = Holder(Experts(4, 256, 128))
    for w in (ex.m.w1, ex.m.w2, ex.m.w3):
        nn.init.normal_(w, std=0.02, generator=g)
    training.convert_to_fp8_training(ex)
    ex.to(DEVICE)
    counts = torch.tensor([70, 0, 150, 80], device=DEVICE)
    xe = torch.randn(300, 256, generator=g).to(DEVICE)
    gate = torch.rand(300, generator=g).to(DEVICE)
    for a, b in zip(run(ex.m, [xe, counts, gate], True), run(ex.m, [xe, counts, gate], False)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() <= 1e-3
