"""The CPU inference kernels (infer/cpu_kernels.py), each held to the plain reference: every layout of a matrix
product equals F.linear, the experts' decode paths equal the per-expert loop, an engine with any choice of
kernels decodes the tokens of the reference engine; and the calibration is cached per machine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dsv3.infer import LLM, SamplingParams
from dsv3.infer import cpu_kernels as ck
from dsv3.model import MoE, RoutingStats

from conftest import random_model, rel_err, tiny_config


@pytest.mark.parametrize("name", sorted(ck.MATMULS))
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 17, 64])
def test_every_layout_equals_f_linear(name, rows):
    """Same values (float32 reassociation: 1e-5 relative), shape, and bias handling, for row-major and
    column-major inputs (a previous skinny product's output), through MatmulKernel as the model calls it."""
    torch.manual_seed(0)
    for out_features, in_features in ((256, 96), (40, 200)):
        w = torch.randn(out_features, in_features) * 0.05
        b = torch.randn(out_features)
        if name == "split" and out_features % (2 * torch.get_num_threads()):
            continue
        kernel = ck.MatmulKernel((out_features, in_features), {r: name for r in ck.ROW_BUCKETS})
        x = torch.randn(rows, in_features)
        for inp in (x, x.t().contiguous().t(), x.view(1, rows, in_features)):
            for bias in (None, b):
                ref = F.linear(inp, w, bias)
                y = kernel(inp, w, bias)
                assert y.shape == ref.shape and rel_err(y, ref) <= 1e-5, (name, rows, inp.shape)


def test_a_kernel_steps_aside_where_it_was_not_measured(monkeypatch):
    """More rows than any bucket (prefill), another shape, or a non-contiguous weight: plain F.linear."""
    calls = []
    monkeypatch.setitem(ck.MATMULS, "split", lambda x, w: calls.append(1) or F.linear(x, w))
    kernel = ck.MatmulKernel((64, 32), {r: "split" for r in ck.ROW_BUCKETS})
    w = torch.randn(64, 32)
    kernel.fns = {b: ck.MATMULS["split"] for b in ck.ROW_BUCKETS}
    kernel(torch.randn(4, 32), w)
    assert calls == [1]
    for x, weight in ((torch.randn(65, 32), w), (torch.randn(4, 32), torch.randn(32, 64).t()),
                      (torch.randn(4, 16), torch.randn(64, 16))):
        assert torch.equal(kernel(x, weight), F.linear(x, weight))
    assert calls == [1]


def test_expert_spans():
    assert ck.expert_spans([5, 1, 2, 9, 2], max_gap=0) == [(1, 3), (5, 6), (9, 10)]
    assert ck.expert_spans([5, 1, 2, 9, 2], max_gap=2) == [(1, 6), (9, 10)]
    assert ck.expert_spans([7, 0], max_gap=6) == [(0, 8)]


@pytest.mark.parametrize("path", ["loop", "dense", "grouped"])
def test_expert_paths_equal_the_per_expert_loop(path):
    """A single token's K experts one by one, a few tokens' through every hit expert weighted by a dense gate
    matrix, or the grouped reference: what the per-expert loop gives, added into a given output (the shared
    experts'), for picks in one run of experts, in several, and spread too wide for the dense path."""
    c = tiny_config(n_routed_experts=32, moe_intermediate_size=64, n_group=1, topk_group=1, num_experts_per_tok=3)
    moe = MoE(c, None)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe.experts.pack_projections()
    moe.experts.kernel = ck.ExpertsKernel({b: path for b in ck.EXPERT_TOKEN_BUCKETS}, F.linear)
    with torch.no_grad():
        for picks in ([[0, 1, 2]], [[31, 7, 12]], [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
                      [[0, 5, 9], [31, 30, 12], [5, 9, 0]], [[2 * i, 2 * i + 1, (2 * i + 5) % 32] for i in range(16)]):
            experts = torch.tensor(picks)
            x = torch.randn(len(picks), c.hidden_size)
            weights = torch.rand(len(picks), 3)
            ref = moe.routed_reference(x, weights, experts)
            base = torch.randn_like(x)
            assert rel_err(moe.routed(x, weights, experts, base.clone()), ref + base) <= 1e-5, picks
            assert rel_err(moe.routed(x, weights, experts), ref) <= 1e-5, picks


def test_expert_kernels_leave_training_and_load_counting_to_the_reference(monkeypatch):
    c = tiny_config()
    moe: MoE = random_model(c).pack_projections().layers[1].ffn
    used = []
    moe.experts.kernel = lambda *a: used.append(1)  # would return None: the reference follows
    x = torch.randn(2, c.hidden_size)
    moe(x)  # grad enabled: training
    with torch.no_grad():
        moe(x, stats=RoutingStats())  # a forward whose routing is recorded (the trainer's evaluation)
    assert used == []
    with torch.no_grad():
        moe(x)
    assert used == [1]


def _forced(model, matmul: str, experts: str) -> None:
    """Install one choice everywhere, bypassing calibration."""
    for module, weight in ck._weight_modules(model):
        module.kernel = ck.MatmulKernel(tuple(weight.shape), {b: matmul for b in ck.ROW_BUCKETS})
    for m in model.modules():
        if isinstance(m, MoE) and m.experts.w13 is not None:
            m.experts.kernel = ck.ExpertsKernel({b: experts for b in ck.EXPERT_TOKEN_BUCKETS}, F.linear)


@pytest.mark.parametrize("matmul, experts", [("transposed", "dense"), ("split", "loop"), ("linear", "grouped")])
@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_engine_with_any_kernels_decodes_the_reference_tokens(matmul, experts, speculative):
    """Greedy tokens identical, and the logprobs within float32 reassociation, at batch 1 and 3, plain and
    speculative, whatever the layouts chosen (the choice differs by machine)."""
    c = tiny_config(hidden_size=96, num_attention_heads=2, q_lora_rank=48, kv_lora_rank=32, intermediate_size=64,
                    moe_intermediate_size=32)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=0)
    prompts = [[5, 17, 2, 9], [1, 2, 3, 4, 5, 6, 7], [8]]
    ref = LLM(random_model(c), cpu_kernels=False, speculative=speculative, max_num_seqs=4)
    fast = LLM(random_model(c), cpu_kernels=False, speculative=speculative, max_num_seqs=4)
    _forced(fast.model, matmul, experts)
    for batch in (prompts[:1], prompts):
        want, got = ref.generate(batch, params), fast.generate(batch, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for a, b in zip(got, want):
            lp_a = torch.tensor([lp.logprob for lp in a.logprobs])
            lp_b = torch.tensor([lp.logprob for lp in b.logprobs])
            assert torch.allclose(lp_a, lp_b, rtol=1e-5, atol=1e-5)


def test_calibration_is_cached_per_machine(tmp_path, monkeypatch):
    """The first engine on a machine times the candidates and saves its choices under the machine's key; the
    next one measures nothing. Another machine (key) measures again; a corrupt cache file is replaced."""
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path))
    c = tiny_config()
    first = LLM(random_model(c), max_num_seqs=2)
    assert first.kernels is not None and first.kernels.measured > 0
    data = json.loads((tmp_path / "cpu_kernels.json").read_text())
    key = ck.machine_key(torch.float32)
    assert list(data) == [key] and data[key]["matmul"] and data[key]["experts"]
    assert LLM(random_model(c), max_num_seqs=2).kernels.measured == 0
    assert isinstance(first.model.layers[0].attn.wo.kernel, ck.MatmulKernel)
    monkeypatch.setattr(ck, "machine_key", lambda dtype: "another machine")
    assert LLM(random_model(c), max_num_seqs=2).kernels.measured > 0
    assert set(json.loads((tmp_path / "cpu_kernels.json").read_text())) == {key, "another machine"}
    (tmp_path / "cpu_kernels.json").write_text("{not json")
    assert LLM(random_model(c), max_num_seqs=2).kernels.measured > 0
    assert "another machine" in json.loads((tmp_path / "cpu_kernels.json").read_text())


def test_reference_engine_uninstalls_kernels():
    c = tiny_config()
    model = random_model(c)
    LLM(model, max_num_seqs=2)
    assert model.layers[0].attn.wo.kernel is not None
    LLM(model, cpu_kernels=False, max_num_seqs=2)
    assert all(getattr(m, "kernel", None) is None for m in model.modules())
