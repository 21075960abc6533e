"""dsv3 plan: the V3 layout's memory per GPU, refused layouts, the bubble simulated on torch's own schedule tables
against the report's formulas, parameters per rank against the model, all-to-all bytes. Costs are given (never
timed), so every assertion is arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.pipelining.schedules import OVERLAP_F_B, _Action

from dsv3 import ModelConfig
from dsv3.cli import main as cli_main
from dsv3.model.model import DeepSeekV3
from dsv3.parallel import plan as P

V3 = ModelConfig.preset("671B")
V3_LAYOUT = P.Layout(gpus=2048, pp=16, ep=64, tp=1, zero=1, schedule="dualpipev")
GIVEN = P.BlockCosts(F=1.0, B=2.0, W=1.0)


@pytest.fixture(scope="module")
def v3_plan() -> dict:
    return P.plan(V3, V3_LAYOUT, GIVEN)


def meta_model(cfg: ModelConfig) -> DeepSeekV3:
    with torch.device("meta"):
        return DeepSeekV3(cfg)


def table(layout: P.Layout) -> dict:
    """torch's action table for `layout`, built on a fake process group as `plan` builds it."""
    with P.fake_world(layout.gpus):
        dims = P.build_mesh(layout)
        return P.schedule_table(layout, dims["pp"].get_group(), P.stage_to_rank(layout))[0]


def uniform(layout: P.Layout, F: float, B: float, W: float, fb: float = 1.0) -> P.StageCosts:
    n = layout.n_stages
    return P.StageCosts([F] * n, [B] * n, [W] * n, fb)


# ---- the V3 layout ---------------------------------------------------------------------------------------

def test_v3_layout_fits_in_80_gb(v3_plan):
    lay, mesh = v3_plan["layout"], v3_plan["mesh"]
    assert (lay["dp"], lay["dp_mod_ep"], lay["n_stages"], lay["micro_batches"]) == (128, 2, 32, 120)
    assert mesh["shape"] == {"pp": 16, "dp_mod_ep": 2, "ep": 64, "tp": 1}
    assert mesh["ep"]["nodes"] == 8 and mesh["ep"]["ranks_of_rank0"] == "0-63"  # EP64 over 8 nodes
    m = v3_plan["model"]
    assert round(m["main"] / 1e9) == 671 and round(m["active_per_token"] / 1e9) == 37
    worst = max(r["total"] for r in v3_plan["ranks"])
    assert worst == next(r for r in v3_plan["ranks"] if r["rank"] == v3_plan["worst_rank"])["total"]
    assert 30 * P.GiB < worst < 80 * P.GiB
    # V: rank r holds stages r and 31 - r; rank 0 the embedding and the head (+ MTP)
    assert [r["stages"] for r in v3_plan["ranks"]] == [[r, 31 - r] for r in range(16)]
    # DualPipe's README: PP + 1 chunks of activations per device, PP the number of stages
    for r in v3_plan["ranks"]:
        assert sum(r["in_flight"].values()) == 2 * 16 + 1


def test_v3_memory_terms_follow_the_report_dtypes(v3_plan):
    """ZeRO-1: BF16 weights and FP32 gradients whole on every dp rank; FP32 master + two BF16 moments sharded
    over dp (dense) and dp_mod_ep (experts)."""
    for r in v3_plan["ranks"]:
        p = r["params"]
        dense, expert = p["replicated"] + p["tp_split"] + p["copy"], p["expert"]
        assert r["weights"] == pytest.approx(2 * (dense + expert))
        assert r["grads"] == pytest.approx(4 * (dense + expert))
        assert r["optimizer"] == pytest.approx(8 * (dense / 128 + expert / 2))
        assert p["copy"] == 0  # the V puts the embedding and the MTP module on one rank: no copy


def test_v3_all_to_all_bytes(v3_plan):
    a = v3_plan["all_to_all"]
    T, K, D = 4096, 8, 7168
    assert a["max_nodes_per_token"] == 4 and a["ep_nodes"] == 8  # node-limited routing: 4 groups of 8 -> 4 nodes
    assert a["dispatch"]["payload"] == pytest.approx(T * K * D * (1 + 4 / 128))  # FP8 + one FP32 scale per 128
    assert a["combine"]["payload"] == T * K * D * 2  # BF16
    assert a["dispatch"]["ib_worst"] == pytest.approx(T * 4 * D * (1 + 4 / 128))
    assert a["combine"]["ib_mean"] == pytest.approx(T * 4 * 7 / 8 * D * 2)


def test_v3_bubble_rows(v3_plan):
    rows = {r["schedule"]: r for r in v3_plan["bubble"]}
    # with F = I = W (B = 2F, W = F) the tables give the formulas exactly, in units of a block's F
    one = rows["1f1b"]
    c = one["chunk"]
    assert one["simulated"] == pytest.approx((16 - 1) * (c["F"] + c["B"]))
    dv = rows["dualpipev"]
    c = dv["chunk"]
    assert dv["simulated"] == pytest.approx((32 / 2 - 1) * (c["FB"] + c["B"] - 3 * c["W"]))
    assert dv["simulated"] < one["simulated"]
    assert "error" in rows["interleaved1f1b"]  # 120 micro-batches are not a multiple of its 7 rounds


# ---- refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(gpus=2040, pp=16, ep=64), r"--gpus 2040 is not divisible by --pp 16 x --tp 1"),
    (dict(gpus=2048, pp=16, ep=48), r"--ep 48 must divide the data-parallel degree dp = .* = 128"),
    (dict(gpus=2048, pp=32, ep=64), r"64 pipeline stages .* more than the model's 61 layers"),
    (dict(gpus=2048, pp=16, ep=128, global_batch=15000), r"--global-batch 15000 is not divisible"),
    (dict(gpus=3 * 16 * 128, pp=16, ep=384), r"--ep 384 must divide n_routed_experts=256"),
    (dict(gpus=2048, pp=16, ep=64, tp=3), r"--gpus 2048 is not divisible by --pp 16 x --tp 3"),
])
def test_inconsistent_layouts_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        P.Layout(**kw).check(V3)


def test_cli_refuses_with_the_numbers(capsys):
    assert cli_main(["plan", "--gpus", "2048", "--pp", "16", "--ep", "48", "--costs", "1,2,1"]) == 2
    assert "--ep 48 must divide the data-parallel degree dp" in capsys.readouterr().err
    with pytest.raises(ValueError, match="W=3.0 is part of the full backward"):
        P.parse_costs("1,2,3")


# ---- the bubble on torch's tables ---------------------------------------------------------------------------

@pytest.mark.parametrize("pp, micro", [(4, 8), (8, 24)])
@pytest.mark.parametrize("F, B, W", [(1.0, 2.0, 1.0), (1.0, 2.2, 0.9), (1.5, 2.0, 0.0)])
def test_1f1b_bubble_equals_the_formula(pp, micro, F, B, W):
    lay = P.Layout(gpus=pp, pp=pp, schedule="1f1b", global_batch=micro, seq_len=64)
    sim = P.simulate(table(lay), lay.n_stages, uniform(lay, F, B, W), [0.0] * lay.n_stages)
    assert sim.bubble == pytest.approx((pp - 1) * (F + B)) == P.formula_bubble("1f1b", pp, F, B, W, F + B)
    assert all(idle == pytest.approx(sim.bubble) for idle in sim.idle)
    assert sim.step == pytest.approx((micro + pp - 1) * (F + B))


@pytest.mark.parametrize("pp, micro", [(4, 10), (8, 64)])
def test_dualpipev_bubble_against_the_formula(pp, micro):
    """DualPipeV's formula is Table 2's with PP = 2 x ranks stages. torch's table gives it exactly when
    F = I = W; at F = 1, I = 1.5, W = 0.5 it gives one F less: the last rank runs its first F and B of the
    steady phase apart instead of overlapped (torch: 'We don't overlap these two chunks to further reduce
    bubble size'); overlap that pair and the formula holds. (For other costs, e.g. I < F, the table's bubble
    departs from the closed form either way: the command prints both.)"""
    lay = P.Layout(gpus=pp, pp=pp, schedule="dualpipev", global_batch=micro, seq_len=64)
    tab = table(lay)
    zeros = [0.0] * lay.n_stages
    formula = lambda F, B, W: P.formula_bubble("dualpipev", pp, F, B, W, F + B)  # noqa: E731
    assert formula(1, 2, 1) == (2 * pp / 2 - 1) * (3 + 2 - 3)
    assert P.simulate(tab, lay.n_stages, uniform(lay, 1.0, 2.0, 1.0), zeros).bubble == pytest.approx(formula(1, 2, 1))
    assert P.simulate(tab, lay.n_stages, uniform(lay, 1.0, 2.0, 0.5), zeros).bubble == \
        pytest.approx(formula(1, 2, 0.5) - 1.0)
    last = tab[pp - 1]
    i = next(i for i, (a, b) in enumerate(zip(last, last[1:]))
             if a.computation_type.value == "F" and b.computation_type.value == "B")
    last[i:i + 2] = [_Action(-1, OVERLAP_F_B, None, (last[i], last[i + 1]))]
    assert P.simulate(tab, lay.n_stages, uniform(lay, 1.0, 2.0, 0.5), zeros).bubble == pytest.approx(formula(1, 2, 0.5))


def test_in_flight_micro_batches_from_the_tables():
    """1F1B: rank r holds pp - r micro-batches; DualPipeV: 2 pp + 1 chunks on every rank."""
    pp = 4
    one = P.Layout(gpus=pp, pp=pp, schedule="1f1b", global_batch=8, seq_len=64)
    sim = P.simulate(table(one), pp, uniform(one, 1, 2, 1), [1.0] * pp)
    assert [f[r] for r, f in enumerate(sim.in_flight)] == [4, 3, 2, 1]
    assert sim.peak_activation == [4.0, 3.0, 2.0, 1.0]
    v = P.Layout(gpus=pp, pp=pp, schedule="dualpipev", global_batch=10, seq_len=64)
    sim = P.simulate(table(v), v.n_stages, uniform(v, 1, 2, 1), [1.0] * v.n_stages)
    assert [sum(f.values()) for f in sim.in_flight] == [2 * pp + 1] * pp


# ---- parameters, stages, activations -------------------------------------------------------------------------

@pytest.mark.parametrize("preset, layout", [
    ("671B", V3_LAYOUT),
    ("671B", P.Layout(gpus=2048, pp=16, ep=64, schedule="1f1b")),
    ("micro", P.Layout(gpus=16, pp=2, ep=2, tp=2, schedule="1f1b", global_batch=8, seq_len=64)),
    ("micro", P.Layout(gpus=8, pp=1, ep=8, schedule="1f1b", global_batch=8, seq_len=64)),
])
def test_parameters_per_rank_sum_to_the_model(preset, layout):
    cfg = ModelConfig.preset(preset)
    layout.check(cfg)
    model = meta_model(cfg)
    placement = P.stage_to_rank(layout)
    ranges = P.split_layers(cfg, layout.n_stages, layout.seq_len, placement)
    rps = P.params_per_rank(model, layout, ranges, placement)
    assert len(rps) == layout.pp
    assert sum(rp.distinct(layout) for rp in rps) == pytest.approx(sum(p.numel() for p in model.parameters()))
    assert sum(rp.distinct(layout) for rp in rps) == pytest.approx(cfg.num_params())
    copies = [rp.copy for rp in rps]
    if layout.schedule == "1f1b" and layout.pp > 1:  # MTP needs the embedding on the last stage: a copy
        assert copies == [0] * (layout.pp - 1) + [cfg.vocab_size * cfg.hidden_size]
    else:
        assert not any(copies)


def test_stage_split_balances_flops():
    ranges = P.split_layers(V3, 16, 4096)
    assert [i for r in ranges for i in r] == list(range(61)) and all(len(r) >= 1 for r in ranges)
    assert [len(r) for r in ranges] == [4] * 15 + [1]  # the head and MTP (~3.9 blocks of FLOPs) fill the last stage
    v = P.Layout(gpus=2048, pp=16, ep=64, schedule="dualpipev")
    ranges = P.split_layers(V3, 32, 4096, P.stage_to_rank(v))
    assert len(ranges[0]) == 1 and len(ranges[31]) == 1  # both on rank 0, beside the head and MTP
    with pytest.raises(ValueError, match="more than the model's 61 layers"):
        P.Layout(gpus=64, pp=32, schedule="zbv").check(V3)


def test_activation_rows_follow_the_recipe():
    """Per token and MoE layer: the routed copies keep the dispatched token and the SwiGLU input, in FP8 with a
    scale per 128 (1.03 bytes) and the SwiGLU output recomputed; in BF16 all three, 2 bytes each."""
    D, Im, K = V3.hidden_size, V3.moe_intermediate_size, V3.num_experts_per_tok
    moe = P._layer_kinds(V3)["moe"]

    def routed(precision):
        return sum(c.per_token(V3, 1) for c in P.layer_cache(V3, moe, precision) if c.routed)
    assert routed("fp8") == pytest.approx(K * (D + 2 * Im) * (1 + 4 / 128))
    assert routed("bf16") == K * (D + 3 * Im) * 2
    rows = {c.what.split(" (")[0]: c for c in P.layer_cache(V3, moe, "fp8")}
    assert rows["attention output = o_proj input"].nbytes == 1.5 + 4 / 128  # E5M6 (§3.3.2)
    names = " ".join(rows)
    assert "q_a" not in names and "query heads" not in names  # norm outputs and up-projections: recomputed
    bf16 = P.Layout(**{**V3_LAYOUT.__dict__, "precision": "bf16"})
    layers = range(10, 12)
    assert P.stage_activation_bytes(V3, bf16, 5, layers) > P.stage_activation_bytes(V3, V3_LAYOUT, 5, layers)


def test_zero_stages_shard_more():
    rp = P.RankParams(replicated=1e9, tp_split=0, expert=6e8)
    lay = {z: P.Layout(gpus=2048, pp=16, ep=64, zero=z) for z in (1, 2, 3)}
    b = {z: P.state_bytes(rp, lay[z], largest_layer=4e8) for z in (1, 2, 3)}
    assert b[1]["optimizer"] == b[2]["optimizer"] == b[3]["optimizer"] == pytest.approx(8 * (1e9 / 128 + 6e8 / 2))
    assert b[1]["grads"] == 4 * 1.6e9 and b[2]["grads"] == pytest.approx(4 * (1e9 / 128 + 6e8 / 2))
    assert b[1]["weights"] == b[2]["weights"] == 2 * 1.6e9
    assert b[3]["weights"] == pytest.approx(2 * (1e9 / 128 + 6e8 / 2) + 2 * 2 * 4e8)


# ---- the command ----------------------------------------------------------------------------------------------

def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--preset", "micro", "--gpus", "16", "--pp", "2", "--ep", "4", "--seq-len", "64",
            "--global-batch", "16", "--pp-schedule", "1f1b", "--costs", "1,2,1,2.5", "--json", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "worst GPU: rank" in text and "dualpipev" in text
    data = json.loads(out.read_text())
    assert data["layout"]["dp"] == 8 and data["layout"]["micro_batches"] == 2
    assert data["costs"]["FB"] == 2.5 and len(data["ranks"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # written under a temporary name, then renamed


def test_measured_costs_are_consistent():
    """The measurement on a scaled block (micro preset: quick) returns a full backward that contains W."""
    c = P.measure_block_costs(ModelConfig.preset("micro"), 64, repeats=1)
    assert c.F > 0 and c.B >= c.W > 0 and c.FB is None and "measured on this CPU" in c.source
    small, s, T = P.scaled_config(V3, 4096)
    assert (small.hidden_size, small.num_attention_heads, small.n_routed_experts, T) == (448, 8, 32, 256)
    assert small.num_experts_per_tok == 8 and small.qk_head_dim == V3.qk_head_dim


def test_even_split_as_the_training_pipeline():
    ranges = P.split_layers(V3, 32, 4096, how="even")
    assert [len(r) for r in ranges] == [2] * 29 + [1] * 3
    lay = P.Layout(gpus=2048, pp=16, ep=64, layer_split="even")
    with pytest.raises(ValueError, match="--layer-split 'flops'"):
        P.Layout(gpus=2048, pp=16, ep=64, layer_split="flops").check(V3)
    lay.check(V3)
