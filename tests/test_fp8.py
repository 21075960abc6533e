"""Block-scaled FP8: the official format's rules, held to plain float32 arithmetic."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.layers import Linear, linear
from dsv3.quant import fp8

from conftest import rel_err


@pytest.mark.parametrize("shape", [(256, 384), (200, 136), (7, 300), (3, 130, 129)])
def test_weight_round_trip_and_block_scales(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[-1])  # very different ranges per column block
    q, s = fp8.weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))  # partial edge blocks
    # each block's scale is its amax / 448: the largest element of each block maps to +-448 exactly
    w32 = w.reshape(-1, *shape[-2:])
    for b in range(w32.shape[0]):
        for i in range(s.shape[-2]):
            for j in range(s.shape[-1]):
                blk = w32[b, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                assert torch.isclose(s.reshape(-1, *s.shape[-2:])[b, i, j], blk.abs().max() / 448, rtol=1e-6)
    back = fp8.weight_dequant(q, s, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, absolute <= 2^-10 * scale below
    scale_full = fp8._expand_blocks(s, *shape[-2:], 128)
    err = (back - w).abs()
    assert torch.all(err <= torch.maximum(w.abs() * 2 ** -4, scale_full * 2 ** -9) + 1e-12)


def test_dequant_is_exactly_q_times_scale():
    q = (torch.randn(130, 260) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) + 0.5
    out = fp8.weight_dequant(q, s, torch.float32)
    assert torch.equal(out[:128, :128], q[:128, :128].float() * s[0, 0])
    assert torch.equal(out[128:, 256:], q[128:, 256:].float() * s[1, 2])  # the 2x4 corner block
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(2, 2\).*needs \(2, 3\)"):
        fp8.weight_dequant(q, torch.ones(2, 2))


def test_ue8m0_scales_are_powers_of_two():
    w = torch.randn(300, 200)
    q, s = fp8.weight_quant(w, scale_fmt="ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert torch.all(s >= w.abs().amax() / 448 / 2 ** 10)  # rounded up, never clipping
    assert torch.allclose(fp8.weight_dequant(q, s, torch.float32), w, rtol=0.07, atol=1e-3)


def test_zero_block_does_not_divide_by_zero():
    w = torch.zeros(128, 256)
    w[:, 128:] = 1.0
    q, s = fp8.weight_quant(w)
    back = fp8.weight_dequant(q, s, torch.float32)
    assert torch.equal(back, w)


def test_act_quant_and_fp8_gemm_reference():
    torch.manual_seed(0)
    x, w = torch.randn(5, 300), torch.randn(200, 300) * 0.05
    xq, xs = fp8.act_quant(x)
    assert xs.shape == (5, 3)  # one scale per 1x128 tile
    assert torch.allclose(xs, torch.stack([x[:, i * 128:(i + 1) * 128].abs().amax(1) / 448 for i in range(3)], 1))
    wq, ws = fp8.weight_quant(w)
    y = fp8.fp8_gemm_ref(xq, xs, wq, ws, torch.float32)
    exact = x @ w.T
    assert ((y - exact).norm() / exact.norm()).item() < 0.05


def test_fp8_linear_equals_dequantised_linear():
    torch.manual_seed(0)
    lin = Linear(300, 200)
    torch.nn.init.normal_(lin.weight, std=0.05)
    w = lin.weight.detach().clone()
    q, s = fp8.weight_quant(w)
    lin.to_fp8()
    lin.weight.data.copy_(q)
    lin.weight_scale_inv.copy_(s)
    x = torch.randn(4, 300)
    dense = fp8.weight_dequant(q, s, torch.float32)
    assert torch.equal(lin(x), linear(x, dense))  # the FP8 layer is exactly the dequantised one
    assert torch.allclose(lin(x), torch.nn.functional.linear(x, dense), atol=1e-5)
    # one row: `linear` may pick another product layout than F.linear (a GEMV, a split): float32 reassociation
    assert rel_err(lin(x[:1]), torch.nn.functional.linear(x[:1], dense)) <= 1e-5
    assert torch.equal(lin.dense_weight(torch.float32), fp8.weight_dequant(q, s, torch.float32))
