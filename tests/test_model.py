"""The model's parts, each against a plain reference: RoPE, the gate's rules, grouped vs per-expert MoE,
MTP causality and loss, dtype handling, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepSeekV3, ModelConfig, init_weights
from dsv3.model import Gate, MoE, apply_rope, mtp_loss, rope_inv_freq

from conftest import random_model, rel_err, tiny_config


def test_rope_rotates_adjacent_pairs_as_complex_numbers():
    """The official formulation: view_as_complex over (x0, x1) pairs, times e^{i pos theta}."""
    c = tiny_config()
    x = torch.randn(2, 11, 3, c.qk_rope_head_dim)
    pos = torch.arange(11)
    angles = pos[:, None].float() * rope_inv_freq(c)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 11, 3, -1, 2))
                             * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    assert torch.allclose(apply_rope(x, torch.polar(torch.ones_like(angles), angles)[:, None]), ref, atol=1e-6)


def test_yarn_frequencies():
    """Official YaRN: high-frequency dims untouched, low-frequency dims divided by the factor, a ramp between."""
    c = tiny_config(qk_rope_head_dim=64, rope_type="yarn", rope_factor=40.0, original_max_position_embeddings=4096)
    base = rope_inv_freq(c.replace(rope_type="default"))
    yarn = rope_inv_freq(c)
    assert torch.equal(yarn[:5], base[:5])  # wavelengths far below the original context: kept
    assert torch.allclose(yarn[-3:], base[-3:] / 40)  # wavelengths beyond it: interpolated
    assert torch.all(yarn <= base) and torch.all(yarn >= base / 40 * (1 - 1e-6))


def _reference_route(gate: Gate, x: torch.Tensor):
    """Token by token, as the report describes it, with Python loops."""
    scores = torch.sigmoid(x.float() @ gate.weight.float().T)
    out_w, out_i = [], []
    per_group = gate.n_experts // gate.n_groups
    for s in scores:
        biased = s + gate.bias
        gscore = [sorted(biased[g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(gate.n_groups)]
        kept = sorted(range(gate.n_groups), key=lambda g: -sum(gscore[g]))[:gate.topk_groups]
        cand = [e for e in range(gate.n_experts) if e // per_group in kept]
        chosen = sorted(cand, key=lambda e: -biased[e].item())[:gate.topk]
        w = torch.stack([s[e] for e in chosen])
        out_w.append(w / w.sum() * gate.route_scale)
        out_i.append(chosen)
    return torch.stack(out_w), torch.tensor(out_i)


def test_gate_matches_the_report_token_by_token():
    c = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    torch.manual_seed(0)
    gate = Gate(c)
    torch.nn.init.normal_(gate.weight, std=0.1)
    gate.bias.normal_(0, 0.1)
    x = torch.randn(50, c.hidden_size)
    w, idx, scores = gate(x)
    ref_w, ref_idx = _reference_route(gate, x)
    order, ref_order = idx.argsort(dim=1), ref_idx.argsort(dim=1)
    assert torch.equal(idx.gather(1, order), ref_idx.gather(1, ref_order))
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), atol=1e-6)
    assert w.dtype == torch.float32 and scores.dtype == torch.float32


def test_bias_selects_but_never_weights():
    c = tiny_config(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0)
    torch.manual_seed(0)
    gate = Gate(c)
    torch.nn.init.normal_(gate.weight, std=0.1)
    x = torch.randn(30, c.hidden_size)
    gate.bias[5] = 10.0  # forces expert 5 into every token's top-2
    w, idx, scores = gate(x)
    assert (idx == 5).any(dim=1).all()
    # the weights are the unbiased scores of the chosen experts, normalised
    chosen = scores.gather(1, idx)
    assert torch.allclose(w, chosen / chosen.sum(1, keepdim=True))


# grouped GEMMs vs a loop of F.linear: the same float32 sums in other orders (1e-5); bf16: a few roundings of 2^-8
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_grouped_moe_equals_per_expert_loop(dtype, tol, fp8, grad):
    c = tiny_config()
    model = random_model(c).to(dtype)
    moe: MoE = model.layers[1].ffn
    if fp8:
        from dsv3.quant import fp8 as q
        w = {n: getattr(moe.experts, n).detach().float() for n in ("w1", "w2", "w3")}
        moe.experts.to_fp8()
        for n, t in w.items():
            qw, s = q.weight_quant(t)
            getattr(moe.experts, n).data.copy_(qw)
            getattr(moe.experts, f"{n}_scale_inv").copy_(s)
    x = torch.randn(64, c.hidden_size, dtype=dtype)
    with torch.set_grad_enabled(grad):
        weights, experts, _ = moe.gate(x)
        assert rel_err(moe.routed(x, weights, experts), moe.routed_reference(x, weights, experts)) <= tol


def test_grouped_moe_gradients_equal_per_expert_loop():
    c = tiny_config()
    assert 6 * c.n_routed_experts <= 48
    moe: MoE = random_model(c).layers[1].ffn
    x = torch.randn(48, c.hidden_size)
    weights, experts, _ = moe.gate(x)
    grads = []
    for routed in (moe.routed, moe.routed_reference):
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        routed(xg, weights.detach(), experts).sum().backward()  # sum: an expanded gradient reaches the experts
        grads.append([xg.grad] + [getattr(moe.experts, n).grad.clone() for n in ("w1", "w2", "w3")])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-5
    # called directly, the experts get an expanded gradient from sum(), which grouped_mm's backward rejects
    counts = torch.tensor([6] * c.n_routed_experts)
    moe.zero_grad()
    moe.experts(x[: 6 * c.n_routed_experts], counts).sum().backward()
    w1_grad = moe.experts.w1.grad.clone()
    moe.zero_grad()
    moe.experts.forward_loop(x[: 6 * c.n_routed_experts], counts.tolist()).sum().backward()
    assert rel_err(w1_grad, moe.experts.w1.grad) <= 1e-5


def test_moe_with_unused_experts_and_single_token():
    c = tiny_config()
    moe = random_model(c).layers[1].ffn
    with torch.no_grad():
        y = moe(torch.randn(1, 1, c.hidden_size))
    assert y.shape == (1, 1, c.hidden_size) and torch.isfinite(y).all()


def test_causal_and_batch_independent():
    c = tiny_config()
    model = random_model(c)
    x = torch.randint(0, c.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        x2 = x.clone()
        x2[:, 12] = (x2[:, 12] + 1) % c.vocab_size
        changed = model(x2)
        alone = model(x[1:2])
    assert torch.allclose(full[:, :12], changed[:, :12], atol=1e-5)  # the future never leaks back
    assert not torch.allclose(full[:, 12:], changed[:, 12:], atol=1e-3)
    assert torch.allclose(full[1:2], alone, atol=1e-5)  # other sequences in the batch change nothing


def test_mtp_shapes_causality_and_loss():
    c = tiny_config(num_nextn_predict_layers=2)
    model = random_model(c)
    x = torch.randint(0, c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, mtp = model.forward_with_mtp(x)
        assert torch.equal(logits, model(x))
        assert [t.shape for t in mtp] == [(2, 15, c.vocab_size), (2, 14, c.vocab_size)]
        # module 1 at position i sees tokens up to i+1 (it predicts i+2): changing token 9 leaves i < 8 alone
        x2 = x.clone()
        x2[:, 9] = (x2[:, 9] + 1) % c.vocab_size
        _, mtp2 = model.forward_with_mtp(x2)
    assert torch.allclose(mtp[0][:, :8], mtp2[0][:, :8], atol=1e-5)
    assert not torch.allclose(mtp[0][:, 8], mtp2[0][:, 8], atol=1e-4)
    assert torch.allclose(mtp[1][:, :7], mtp2[1][:, :7], atol=1e-5)
    # L_MTP = mean over depths of the cross-entropy of predicting token i+k+1
    want = (F.cross_entropy(mtp[0][:, :14].flatten(0, 1), x[:, 2:].flatten())
            + F.cross_entropy(mtp[1][:, :13].flatten(0, 1), x[:, 3:].flatten())) / 2
    assert torch.allclose(mtp_loss(mtp, x), want, atol=1e-6)


def test_backward_reaches_every_parameter():
    c = tiny_config()
    model = random_model(c).train()
    x = torch.randint(0, c.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, mtp = model.forward_with_mtp(x)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) + 0.3 * mtp_loss(mtp, x)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad
    assert all(b.grad is None for b in model.buffers())


def test_keep_dtype_on_cast():
    c = tiny_config()
    model = random_model(c)
    model.layers[0].attn.wq_a.to_fp8()
    model = model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.layers[1].ffn.gate.bias.dtype == torch.float32  # aux-free bias updates need fp32
    assert model.rope.inv_freq.dtype == torch.float32
    assert model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].attn.wq_a.weight_scale_inv.dtype == torch.float32


def test_init_weights():
    c = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = DeepSeekV3(c)
    init_weights(model)
    assert c.initializer_range == 0.006
    assert abs(model.layers[1].ffn.experts.w1.std().item() - 0.006) < 3e-4
    assert abs(model.embed.weight.std().item() - 0.006) < 3e-4
    assert torch.equal(model.layers[0].attn_norm.weight, torch.ones(c.hidden_size))
    assert torch.equal(model.mtp[0].norm.weight, torch.ones(c.hidden_size))
    assert torch.equal(model.layers[1].ffn.gate.bias, torch.zeros(c.n_routed_experts))
    with torch.no_grad():
        logits = model(torch.randint(0, c.vocab_size, (1, 8)))
    # tiny weights: the untrained model is close to uniform over the vocabulary
    assert abs(F.cross_entropy(logits[0], torch.zeros(8, dtype=torch.long)).item() - math.log(c.vocab_size)) < 0.1


def test_dense_model_and_tied_embeddings():
    c = tiny_config(n_routed_experts=None, tie_word_embeddings=True, num_nextn_predict_layers=0)
    model = random_model(c)
    assert model.head.weight is model.embed.weight
    assert all(not isinstance(b.ffn, MoE) for b in model.layers)
    with torch.no_grad():
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, c.vocab_size)


def test_bad_input_ids():
    model = random_model(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(1, 4))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-5])
def test_rmsnorm_cpu_inference_path_equals_fused(scale):
    """Without grad on a CPU, RMSNorm takes a 5-op formulation (hypot of the norm and sqrt(D eps)); it must
    equal F.rms_norm, also where eps dominates (small activations)."""
    from dsv3.model.layers import RMSNorm
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 7, 96) * scale
    ref = F.rms_norm(x.double(), (96,), norm.weight.double(), 1e-6)
    with torch.no_grad():
        fast = norm(x)
    # float32 against a float64 reference: a few ulps, whose size depends on the CPU's reduction order; a wrong eps
    # term moves the result by 5e-5 or more (at scale 1e-5)
    assert rel_err(fast, ref) <= 1e-5
    assert rel_err(norm(x), ref) <= 1e-5  # the grad-enabled path agrees


@pytest.mark.parametrize("scale", [1.0, 1e-5])
def test_rmsnorm_cpu_training_path_gradients_equal_autograd(scale):
    """With grad on a CPU, RMSNorm's backward is written out (_RMSNormCPU): values and the gradients of input
    and weight equal autograd through F.rms_norm in float64, for a plain and an expanded incoming gradient."""
    from dsv3.model.layers import RMSNorm, _RMSNormCPU
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(5, 7, 96) * scale).requires_grad_()
    r = torch.randn(5, 7, 96)
    for reduce in (lambda y: (y * r).sum(), lambda y: y.sum()):
        grads = []
        for f in (norm, lambda t: F.rms_norm(t.double(), (96,), norm.weight.double(), 1e-6)):
            x.grad = norm.weight.grad = None
            y = f(x)
            reduce(y).backward()
            grads.append((y, x.grad, norm.weight.grad))
        for a, b in zip(*grads):
            assert rel_err(a, b) <= 1e-5
    xd = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    wd = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormCPU.apply(a, b, 1e-6), (xd, wd))


def test_pack_projections_keeps_values_names_and_falls_back_after_a_cast():
    c = tiny_config()
    model = random_model(c, std=0.1)
    ids = torch.randint(0, c.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.pack_projections()
    attn, moe = model.layers[1].attn, model.layers[1].ffn
    assert attn.wqkv_a.intact() and attn.wkv_a.weight.data_ptr() > attn.wqkv_a.tensor.data_ptr()
    assert moe.experts.w13.tensor.shape == (c.n_routed_experts, 2 * c.moe_intermediate_size, c.hidden_size)
    assert model.layers[0].ffn.w13 is not None and moe.shared_experts.w13 is not None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        # packed GEMMs take other kernels (and, on another CPU, other summation orders): float32 reassociation
        assert rel_err(model(ids), ref) <= 1e-5
        x = torch.randn(3, c.hidden_size)  # a few rows: the skinny-GEMM layout through the packed weights
        assert rel_err(moe(x), moe.routed_reference(x, *moe.gate(x)[:2]) + moe.shared_experts.w2(
            F.silu(moe.shared_experts.w1(x)) * moe.shared_experts.w3(x))) <= 1e-5
    model.to(torch.float64)  # new storage: the packed path must step aside, not read stale weights
    with torch.no_grad():
        assert rel_err(model(ids), ref) <= 1e-5
    assert attn.wqkv_a is None and model.layers[0].ffn.w13 is None  # the stale packs were dropped


def test_packed_model_still_trains_and_sees_a_replaced_weight():
    """With grad enabled the unpacked path runs, so every packed parameter gets its gradient; replacing the
    second of a packed pair (not only the first) takes the model off the packed path."""
    c = tiny_config()
    model = random_model(c, std=0.1).pack_projections()
    model(torch.randint(0, c.vocab_size, (2, 9))).sum().backward()
    for name in ("layers.1.attn.wkv_a.weight", "layers.0.ffn.w3.weight", "layers.1.ffn.experts.w3",
                 "layers.1.ffn.shared_experts.w1.weight"):
        assert model.get_parameter(name).grad is not None, name
    mlp = model.layers[0].ffn
    x = torch.randn(2, c.hidden_size)
    with torch.no_grad():
        mlp.w3.weight.data = torch.zeros_like(mlp.w3.weight)
        assert torch.equal(mlp(x), torch.zeros(2, c.hidden_size)) and mlp.w13 is None


def test_pack_projections_leaves_fp8_weights_alone():
    c = tiny_config()
    model = random_model(c, std=0.1)
    model.layers[1].ffn.experts.to_fp8()
    model.layers[0].attn.wq_a.to_fp8()
    model.layers[0].ffn.w1.to_fp8()
    model.pack_projections()
    assert model.layers[1].ffn.experts.w13 is None and model.layers[0].attn.wqkv_a is None
    assert model.layers[0].ffn.w13 is None
    assert model.layers[1].attn.wqkv_a is not None and model.layers[1].ffn.shared_experts.w13 is not None


def test_rmsnorm_cpu_path_follows_weight_updates():
    """The CPU inference path caches sqrt(D) * weight; an in-place update or a new tensor must show."""
    from dsv3.model.layers import RMSNorm
    norm, x = RMSNorm(16), torch.randn(3, 16)
    with torch.no_grad():
        first = norm(x)
        norm.weight.mul_(2.0)  # in place, as an optimiser step or load_state_dict does
        assert torch.allclose(norm(x), 2 * first, rtol=1e-6)
        norm.weight.data = torch.full((16,), 3.0)
        assert torch.allclose(norm(x), 3 * first, rtol=1e-6)


def test_moe_with_shared_experts_gradients_equal_reference():
    """MoE.forward adds the routed outputs into the shared experts' output in place; values and gradients
    (input and every weight) must equal routed_reference + shared computed separately."""
    c = tiny_config()
    moe = random_model(c, std=0.1).layers[1].ffn
    x = torch.randn(2, 5, c.hidden_size, requires_grad=True)
    r = torch.randn(2, 5, c.hidden_size)

    def grads(fn):
        moe.zero_grad()
        x.grad = None
        out = fn()
        (out * r).sum().backward()
        return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}

    def reference():
        x2 = x.reshape(-1, c.hidden_size)
        w, e, _ = moe.gate(x2)
        sh = moe.shared_experts
        return (moe.routed_reference(x2, w, e) + sh.w2(F.silu(sh.w1(x2)) * sh.w3(x2))).view(x.shape)

    out, gx, gp = grads(lambda: moe(x))
    out_ref, gx_ref, gp_ref = grads(reference)
    assert rel_err(out, out_ref) <= 1e-5 and rel_err(gx, gx_ref) <= 1e-5  # grouped vs per-expert GEMMs
    for name in gp:
        assert rel_err(gp[name], gp_ref[name]) <= 1e-5, name


def test_routed_experts_follow_autocast():
    """grouped_mm is not on autocast's list: under bf16 autocast the experts cast their operands themselves, as
    autocast casts a matmul's, so a BF16 run's experts compute (and keep for backward) BF16, not FP32."""
    from dsv3.model.moe import Experts
    g = torch.Generator().manual_seed(0)
    ex = Experts(4, 64, 32)
    for w in (ex.w1, ex.w2, ex.w3):
        torch.nn.init.normal_(w, std=0.1, generator=g)
    x, counts, gate = torch.randn(40, 64, generator=g), torch.tensor([10, 0, 25, 5]), torch.rand(40, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, counts, gate)
    bf16 = Experts(4, 64, 32)
    bf16.load_state_dict(ex.state_dict())
    bf16.to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, bf16(x.bfloat16(), counts, gate))


def test_rmsnorm_after_a_fused_optimizer_step_uses_the_new_weight():
    """torch's fused AdamW changes weights without bumping their version counters: a no_grad forward after a
    step (a trainer's evaluation) must see the new weights, as a fresh copy of the model does."""
    from dsv3.model.layers import RMSNorm
    norm = RMSNorm(16)
    x = torch.randn(3, 16)
    with torch.no_grad():
        norm(x)  # a first evaluation
    norm.weight.grad = torch.randn(16)
    torch.optim.AdamW(norm.parameters(), lr=0.1, fused=True).step()
    fresh = RMSNorm(16)
    with torch.no_grad():
        fresh.weight.copy_(norm.weight)
        assert torch.equal(norm(x), fresh(x))
    with torch.inference_mode():
        assert torch.equal(norm(x), fresh(x))
