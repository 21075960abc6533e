"""FP8 mixed-precision training (quant/training.py) held to its specification and to FP32: quantisers bit-exact
to the rules, each GEMM's and each Linear's fidelity in dB, the cached inputs in one byte, the grouped experts
without a loop, the accumulation study, and the report's negative result on 128x128 gradient blocks."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.config import ModelConfig
from dsv3.model.layers import Linear
from dsv3.model.model import DeepSeekV3, init_weights
from dsv3.model.moe import Experts
from dsv3.quant import fp8
from dsv3.quant.bf16 import fp32_products
from dsv3.quant.fidelity import format_table, per_op_fidelity
from dsv3.quant.training import Float8Experts, Float8Linear, convert_to_fp8_training, sqnr_db


# ---- the e4m3 specification, written independently of torch's cast ---------------------------------------

def e4m3_table() -> tuple[np.ndarray, np.ndarray]:
    """Every finite e4m3fn value (sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 subnormal;
    S.1111.111 is NaN) -> (values sorted ascending, their byte codes)."""
    vals, codes = [], []
    for code in range(256):
        sign, exp, man = code >> 7, (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            continue  # NaN
        mag = man * 2.0 ** -9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
        if sign and mag == 0:
            continue  # -0: the encoder below produces +0 for zero inputs, as x / s of +-0 keeps its sign...
        vals.append(-mag if sign else mag)
        codes.append(code)
    order = np.argsort(vals)
    return np.array(vals)[order], np.array(codes)[order]


def spec_quant(x: np.ndarray, block: int, scale_fmt: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The 1x128-tile rule in float32 numpy: s = amax / 448 (ue8m0: the next power of two at or above it),
    v = clamp(x / s, -448, 448), q = the nearest e4m3 value, ties to the even mantissa."""
    vals, codes = e4m3_table()
    x = x.astype(np.float32)
    k = x.shape[-1]
    kb = -(-k // block)
    pad = np.zeros((*x.shape[:-1], kb * block), np.float32)
    pad[..., :k] = x
    tiles = pad.reshape(*x.shape[:-1], kb, block)
    s = np.maximum(np.abs(tiles).max(-1), np.float32(fp8.AMAX_FLOOR)) / np.float32(448)
    if scale_fmt == "ue8m0":
        m, e = np.frexp(s)
        s = np.ldexp(np.float32(1), np.where(m == 0.5, e - 1, e)).astype(np.float32)
    v = np.clip(tiles / s[..., None], -448, 448).astype(np.float32).reshape(*x.shape[:-1], kb * block)[..., :k]
    hi = np.clip(np.searchsorted(vals, v), 1, len(vals) - 1)
    lo = hi - 1
    dlo, dhi = np.abs(v - vals[lo]), np.abs(vals[hi] - v)
    even_hi = (codes[hi] & 1) == 0
    pick = np.where((dhi < dlo) | ((dhi == dlo) & even_hi), hi, lo)
    q = codes[pick].astype(np.uint8)
    q[v == 0] = 0  # +-0 -> the zero code with x's sign; compared on magnitude below
    return q, s


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(64, 256), (33, 300), (5, 1000)])
def test_act_quant_is_bit_exact_to_the_specification(shape, scale_fmt):
    g = torch.Generator().manual_seed(1)
    # every binade of e4m3 within a tile, the grid's points and the midpoints between them (ties)
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-1]) ** torch.rand(shape, generator=g)
    vals, _ = e4m3_table()
    grid = torch.tensor(vals[vals > 0], dtype=torch.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    pts = torch.cat([grid, mids, -grid, -mids])
    x[0, :min(shape[1], len(pts))] = pts[:shape[1]]
    x[0, 0] = 448.0  # the first tile's amax is 448: its scale is 1 and its values land on the grid as given
    q, s = fp8.act_quant(x, scale_fmt=scale_fmt)
    q_ref, s_ref = spec_quant(x.numpy(), 128, scale_fmt)
    assert np.array_equal(s.numpy(), s_ref)
    got = q.view(torch.uint8).numpy()
    assert np.array_equal(got & 0x7F, q_ref & 0x7F)  # magnitudes bit for bit
    nonzero = (got & 0x7F) != 0
    assert np.array_equal(got[nonzero], q_ref[nonzero])  # and signs where the value is not zero


def test_weight_quant_block_rule_is_the_tile_rule_over_the_block():
    w = torch.randn(300, 260) * torch.logspace(-2, 1, 260)
    for fmt in (None, "ue8m0"):
        q, s = fp8.weight_quant(w, scale_fmt=fmt)
        for i in range(3):
            for j in range(3):
                blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                q_ref, s_ref = spec_quant(blk.reshape(1, -1).numpy(), blk.numel(), fmt)
                assert s[i, j].item() == s_ref.item()
                got = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].contiguous().view(torch.uint8).numpy().ravel()
                assert np.array_equal(got & 0x7F, q_ref.ravel() & 0x7F)


def test_ue8m0_rounding_is_exact_at_and_around_powers_of_two():
    k = torch.arange(-40, 40, dtype=torch.float32)
    p = torch.exp2(k)
    assert torch.equal(fp8.round_scale(p, "ue8m0"), p)  # a power of two is kept
    up = torch.nextafter(p, torch.full_like(p, float("inf")))
    assert torch.equal(fp8.round_scale(up, "ue8m0"), 2 * p)  # one ulp above goes to the next
    down = torch.nextafter(p, torch.zeros_like(p))
    assert torch.equal(fp8.round_scale(down, "ue8m0"), p)
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8.round_scale(p, "e5m2")


def test_requant_transpose_with_power_of_two_scales_is_lossless_above_the_subnormals():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 384, generator=g) * torch.logspace(-1, 1, 384)  # within a 128x128 block: 2 decades
    q, s = fp8.act_quant(x, scale_fmt="ue8m0")
    qt, st = fp8.requant_transpose(q, s)
    assert qt.shape == (384, 256) and st.shape == (384, 2)
    back, orig = fp8.act_dequant(qt, st), fp8.act_dequant(q, s).T
    changed = back != orig
    # only values that land among e4m3's subnormals (below 2^-6) in their new tile can lose bits
    assert torch.all(orig[changed].abs() / st.repeat_interleave(128, dim=1)[changed] < 2 ** -6)
    assert changed.float().mean() < 1e-3
    # with amax / 448 scales the requantisation rounds a second time: not exact
    q2, s2 = fp8.act_quant(x)
    qt2, st2 = fp8.requant_transpose(q2, s2, scale_fmt=None)
    assert not torch.equal(fp8.act_dequant(qt2, st2), fp8.act_dequant(q2, s2).T)


# ---- GEMMs and Linears against FP32 -------------------------------------------------------------------------

def test_fp8_gemms_against_fp32_at_least_28_db():
    """Each operand's e4m3 rounding is ~31.9 dB on Gaussian data (3 mantissa bits: relative RMS error
    2^-4 / sqrt(24)); a product of two carries both, ~28.9 dB."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 768, generator=g), torch.randn(384, 768, generator=g)
    y = fp8.fp8_gemm_ref(*fp8.act_quant(x), *fp8.weight_quant(w), torch.float32)
    assert sqnr_db(x @ w.T, y) >= 28
    a, b = torch.randn(200, 512, generator=g), torch.randn(130, 512, generator=g)
    assert sqnr_db(a @ b.T, fp8.fp8_gemm_1d1d_ref(*fp8.act_quant(a), *fp8.act_quant(b))) >= 28
    offs = torch.tensor([128, 128, 384, 512])  # an empty group, uneven groups
    we = torch.randn(4, 384, 768, generator=g)
    yg = fp8.fp8_grouped_gemm_ref(*fp8.act_quant(x), *fp8.weight_quant(we), offs, torch.float32)
    ref = torch.cat([x[:128] @ we[0].T, x[128:384] @ we[2].T, x[384:] @ we[3].T])
    assert sqnr_db(ref, yg) >= 28
    a, b = torch.randn(96, 512, generator=g), torch.randn(80, 512, generator=g)
    yk = fp8.fp8_grouped_gemm_1d1d_ref(*fp8.act_quant(a), *fp8.act_quant(b), offs)
    refk = torch.stack([a[:, lo:hi] @ b[:, lo:hi].T for lo, hi in zip([0, 128, 128, 384], offs.tolist())])
    assert yk.shape == (4, 96, 80) and torch.equal(yk[1], torch.zeros(96, 80))
    assert sqnr_db(refk, yk) >= 28


class _Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m


def test_float8_linear_all_three_gemms_against_fp32():
    g = torch.Generator().manual_seed(0)
    lin = Linear(384, 256, bias=True)
    nn.init.normal_(lin.weight, std=0.02, generator=g)
    nn.init.normal_(lin.bias, std=0.02, generator=g)
    wrap = _Wrap(copy.deepcopy(lin))
    assert convert_to_fp8_training(wrap) == ["m"] and isinstance(wrap.m, Float8Linear)
    x = torch.randn(4, 100, 384, generator=g, requires_grad=True)
    x8 = x.detach().clone().requires_grad_()
    y, y8 = lin(x), wrap.m(x8)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    y8.backward(gy)
    # Gaussian operands: two e4m3 roundings per product, ~28.9 dB (see the GEMM test)
    assert sqnr_db(y, y8) >= 28 and sqnr_db(x.grad, x8.grad) >= 28 and sqnr_db(lin.weight.grad, wrap.m.weight.grad) >= 28
    assert torch.equal(lin.bias.grad, wrap.m.bias.grad)  # the bias is not quantised
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wrap.m(x8).dtype == torch.bfloat16
    assert wrap.m(x8.double()).dtype == torch.float64  # without autocast the output keeps the input's dtype


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model with a byte vocabulary trained for 40 FP32 steps on the built-in corpus (Python sources), and
    a batch of it: the per-op figures are about a network with structure in its activations and gradients,
    which random weights on random tokens lack (their operands are Gaussian: every GEMM sits at ~28.9 dB)."""
    from dsv3.data.corpus import builtin_corpus
    text = "\n".join(d.text for d in builtin_corpus()[:200]).encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cfg = ModelConfig.preset("tiny").replace(vocab_size=256, num_hidden_layers=2, first_k_dense_replace=1)
    model = DeepSeekV3(cfg)
    init_weights(model, std=0.02, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)

    def batch(n, length=129):
        starts = torch.randint(0, len(data) - length, (n,), generator=g).tolist()
        return torch.stack([data[i:i + length] for i in starts])

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        b = batch(16)
        loss = torch.nn.functional.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.0  # it learnt something (uniform over bytes: ln 256 = 5.5)
    return model, batch(32)


def test_every_fp8_op_of_a_trained_model_against_fp32(trained_tiny):
    """Op by op, the same inputs for FP32 and FP8 (routed experts: each projection, pooled over experts).
    Outputs >= 25 dB (the issue's floor) and gradients >= 30 dB (the issue's floor) for the median op. Single
    ops of a model this young fall below 30 dB where a few tokens carry nearly all of a weight gradient and
    their terms cancel (layers.1.attn.wq_a here: ~22 dB, five tokens give 84% of it): the sum is smaller than
    its terms, their rounding errors are not. So each op is held to 20 dB, far above what a wrong scale or
    transpose gives (<= 0 dB); RESULTS.md has the table of the `make demo` model."""
    model, tokens = trained_tiny
    rows = per_op_fidelity(copy.deepcopy(model), tokens)
    assert {r["op"].split(".", 2)[-1] for r in rows} >= {
        "attn.wq_a", "attn.wq_b", "attn.wkv_a", "attn.wkv_b", "attn.wo", "ffn.w1", "ffn.w2", "ffn.w3",
        "ffn.shared_experts.w1", "ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"}
    print("\n" + format_table(rows))
    for r in rows:
        assert r["output_db"] >= 25 and r["input_grad_db"] >= 20 and r["weight_grad_db"] >= 20, r
    for key in ("input_grad_db", "weight_grad_db"):
        assert sorted(r[key] for r in rows)[len(rows) // 2] >= 30, key


# ---- what the recipe keeps, and how it runs ------------------------------------------------------------------

def test_converter_keeps_parameters_names_and_leaves_the_head():
    cfg = ModelConfig.preset("micro")
    model = DeepSeekV3(cfg)
    init_weights(model, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    names = convert_to_fp8_training(model)
    assert keys == list(model.state_dict())
    assert all(p is params[n] for n, p in model.named_parameters())  # the very same Parameter objects
    assert type(model.head) is Linear and type(model.layers[0].attn.wq_a) is Float8Linear
    assert any(n.endswith("experts") for n in names) and "mtp.0.eh_proj" in names
    assert convert_to_fp8_training(model, module_filter=lambda n, m: True) == ["head"]  # converted ones skipped
    fp8_model = DeepSeekV3(cfg)
    fp8_model.layers[0].attn.wq_a.to_fp8()
    with pytest.raises(ValueError, match="FP8 weights"):
        convert_to_fp8_training(fp8_model)


class _SavedTensors:
    def __init__(self):
        self.saved = []

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def test_cached_linear_inputs_are_one_byte_per_element():
    wrap = _Wrap(Linear(256, 512))
    nn.init.normal_(wrap.m.weight, std=0.02)
    convert_to_fp8_training(wrap)
    x = torch.randn(300, 256, requires_grad=True)
    with _SavedTensors() as s:
        wrap.m(x)
    by_size = {tuple(t.shape): t for t in s.saved}
    assert by_size[(300, 256)].dtype == torch.float8_e4m3fn  # the input, one byte per element
    assert by_size[(300, 2)].dtype == torch.float32  # and one scale per 128 of it
    assert all(t is wrap.m.weight or t.dtype in (torch.float8_e4m3fn, torch.float32) and t.numel() <= 300 * 256
               for t in s.saved)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n_experts", [4, 16])
def test_fp8_experts_are_grouped_gemms_not_a_loop(n_experts):
    """The same number of ops whatever the number of experts: 3 grouped GEMMs forward, 3 input-gradient and 3
    weight-gradient grouped GEMMs backward; the SwiGLU input cached in FP8 and its output recomputed."""
    g = torch.Generator().manual_seed(0)
    ex = Experts(n_experts, 256, 128)
    for w in (ex.w1, ex.w2, ex.w3):
        nn.init.normal_(w, std=0.02, generator=g)
    ref = copy.deepcopy(ex)
    wrap = _Wrap(ex)
    convert_to_fp8_training(wrap)
    counts = torch.zeros(n_experts, dtype=torch.long)
    counts[::2] = torch.randint(1, 200, (len(counts[::2]),), generator=g)
    counts[1] = 0
    x = torch.randn(int(counts.sum()), 256, generator=g, requires_grad=True)
    gate = torch.rand(x.shape[0], generator=g, requires_grad=True)
    with _CountOps() as ops, _SavedTensors() as saved:
        y = wrap.m(x, counts, gate)
        y.backward(torch.ones_like(y))
    assert ops.counts["_grouped_mm"] == 9 and "mm" not in ops.counts
    fp8_saved = [t for t in saved.saved if t.dtype == torch.float8_e4m3fn]
    assert len(fp8_saved) == 3  # x, and the SwiGLU's two inputs
    # against the FP32 loop of experts: two quantised GEMMs in series, each ~28.9 dB on Gaussian data
    x_ref, gate_ref = x.detach().clone().requires_grad_(), gate.detach().clone().requires_grad_()
    y_ref = ref.forward_loop(x_ref, counts.tolist(), gate_ref)
    y_ref.backward(torch.ones_like(y_ref))
    assert sqnr_db(y_ref, y) >= 22 and sqnr_db(x_ref.grad, x.grad) >= 22 and sqnr_db(gate_ref.grad, gate.grad) >= 22
    for n in ("w1", "w2", "w3"):
        assert sqnr_db(getattr(ref, n).grad, getattr(wrap.m, n).grad) >= 22


# ---- the studies ---------------------------------------------------------------------------------------------

def test_accumulation_study_two_percent_without_promotion_and_its_fix():
    """V3 report §3.3.2: with a ~14-bit accumulator a K=4096 GEMM is off by ~2%; promoting the partial sums to
    FP32 every 128 elements fixes it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 4096, generator=g), torch.rand(64, 4096, generator=g)
    a, b = fp8.act_dequant(*fp8.act_quant(a)), fp8.act_dequant(*fp8.act_quant(b))
    exact = a.double() @ b.double().T

    def err(**kw):
        c = fp8.gemm_limited_accumulator(a, b, **kw).double()
        return ((c - exact).norm() / exact.norm()).item()
    unpromoted, promoted, fp32 = err(promote_every=None), err(promote_every=128), err(acc_bits=None)
    assert 0.01 < unpromoted < 0.04
    assert promoted < unpromoted / 10 and promoted < 0.002
    assert fp32 < 1e-6
    assert torch.equal(fp8.truncate_mantissa(torch.tensor([1 + 2 ** -13 + 2 ** -14]), 13), torch.tensor([1 + 2 ** -13]))


def test_block_scaled_gradients_lose_to_token_outliers_where_tiles_do_not():
    """The report's negative result (§3.3.2, appendix B.2): activation gradients carry token-correlated
    outliers; a 128x128 block shares one scale across 128 tokens, so an outlier token pushes its neighbours'
    gradients down into e4m3's subnormals or to zero, while 1x128 tiles give each token its own scale. Eight
    outlier tokens of 512; the SQNR of the ordinary tokens' input gradients."""
    from dsv3.train.fp8_experiment import ordinary_tokens_db
    for ratio in (1e2, 1e5):
        assert ordinary_tokens_db(ratio, "1x128") >= 28  # tiles: unaffected by the outliers' size
    assert ordinary_tokens_db(1e2, "128x128") >= 28  # blocks: fine while the outliers are mild...
    assert ordinary_tokens_db(1e5, "128x128") < 10  # ...and the ordinary tokens mostly lost when they are not


def test_bf16_products_in_fp32_equal_native_bf16():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 300, generator=g).bfloat16()
    b = torch.randn(300, 200, generator=g).bfloat16()
    native = a @ b
    with fp32_products():
        emulated = a @ b
        batched = torch.bmm(a[None], b[None])[0]
    assert emulated.dtype == torch.bfloat16
    exact = a.double() @ b.double()
    # both round an FP32 sum of the same exact products to BF16; the two sums may differ by FP32 reordering
    # (at most 2 K 2^-24 sum|a||b| between them), and each BF16 rounding adds up to half an ulp (2^-9 of the
    # value, 2^-8 of the exact one with the margin)
    reorder = 2 * a.shape[1] * 2 ** -24 * (a.double().abs() @ b.double().abs())
    for got in (emulated, batched):
        assert torch.all((got.double() - native.double()).abs() <= exact.abs() * 2 ** -7 + reorder)


# ---- the run: dsv3 train --precision fp8 and dsv3 experiment fp8 --------------------------------------------

def _micro_config(out, data, **kw):
    from dsv3.train.trainer import TrainConfig
    return TrainConfig(out=str(out), preset="micro", data=data, steps=4, save_every=2, eval_every=4,
                       eval_batches=1, no_plots=True, precision="fp8", **kw)


def test_an_fp8_run_trains_resumes_to_the_bit_and_exports_a_plain_model(corpus_file, tmp_path):
    """--precision fp8 through the Trainer: the model's Linears and experts are the FP8 twins, the loss falls,
    a run stopped after its step-2 checkpoint and started again equals the uninterrupted one, and the run
    directory holds an ordinary model (FP32 weights, no FP8 modules: FP8 is how it trained, not what it is)."""
    import dsv3
    from dsv3.train.metrics import read_metrics
    from dsv3.train.trainer import Trainer
    whole = Trainer(_micro_config(tmp_path / "whole", corpus_file))
    assert isinstance(whole.model.layers[0].attn.wq_a, Float8Linear)
    assert isinstance(whole.model.layers[1].ffn.experts, Float8Experts) and type(whole.model.head) is Linear
    whole.fit()
    stopped = Trainer(_micro_config(tmp_path / "resumed", corpus_file))
    stopped.step()
    stopped.step()  # step 2 saves a checkpoint; the process "dies" here
    del stopped
    Trainer(_micro_config(tmp_path / "resumed", corpus_file)).fit()
    a, b = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("whole", "resumed"))
    keys = ("step", "loss", "mtp_loss", "grad_norm", "maxvio")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    model = dsv3.load_pretrained(str(tmp_path / "whole"))
    assert not any(isinstance(m, (Float8Linear, Float8Experts)) for m in model.modules())
    with pytest.raises(ValueError, match="precision: was 'fp8', now 'bf16'"):
        Trainer(dataclasses.replace(_micro_config(tmp_path / "whole", corpus_file), precision="bf16"))


def test_experiment_fp8_writes_its_tables_and_plot(corpus_file, tmp_path):
    import json

    from dsv3.cli import main
    out = tmp_path / "fp8"
    main(["experiment", "fp8", "--out", str(out), "--preset", "micro", "--data", corpus_file, "--steps", "3",
          "--eval-every", "3", "--save-every", "3", "--eval-batches", "1", "--fidelity-sequences", "2"])
    result = json.loads((out / "fp8.json").read_text())
    assert set(result["runs"]) == {"fp32", "bf16", "fp8", "bf16-seed1"}
    for name in ("fp32", "fp8", "bf16-seed1"):
        c = result["curves"][name]
        assert abs(c["worst_rel_err"]) >= abs(c["worst_rel_err_2nd_half"]) >= abs(c["final_rel_err"]) - 1e-12
    assert result["curves"]["fp8"]["final_rel_err"] == pytest.approx(
        (result["curves"]["final_loss_ema"]["fp8"] - result["curves"]["final_loss_ema"]["bf16"])
        / result["curves"]["final_loss_ema"]["bf16"], rel=1e-9)
    assert {r["accumulation"] for r in result["accumulation"]} >= {"14-bit accumulator, no promotion"}
    assert result["per_op"] and all(r["output_db"] > 15 for r in result["per_op"])
    md = (out / "fp8.md").read_text()
    assert "FP8 vs BF16 at the end" in md and "Per-op fidelity" in md
    tokenizers = {(out / n / "tokenizer.json").read_text() for n in result["runs"]}
    assert len(tokenizers) == 1  # every run read the same tokens
    pytest.importorskip("matplotlib")
    assert (out / "fp8.png").stat().st_size > 0
