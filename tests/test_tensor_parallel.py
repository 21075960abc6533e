"""Tensor parallelism (dsv3.parallel.tensor_parallel) against one process, on the micro preset, with gloo
processes launched by tests/multiproc.py running tests/tp_worker.py. The worker writes what it measured to
tmp_path; the comparisons are made here, so a failure prints the numbers.

Tolerance: 1e-5 relative, float32 reassociation (wo's and w2's sums over heads and hidden units are taken in
two halves and added by the all-reduce). Weights after AdamW steps are not compared: AdamW divides each
gradient by its own magnitude, so an element whose gradient is near zero (|g| ~ eps) moves by up to lr
whichever way a 1e-7 rounding tips it; the losses those weights give are compared instead."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import rel_err
from multiproc import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of 2 processes for the tests below that need 2 (a launch costs seconds)."""
    out = tmp_path_factory.mktemp("tp2")
    torchrun([WORKER, "equiv,refuse", str(out)], nproc=2)
    return out


def worst(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, str]:
    return max((rel_err(a, b), name) for name, (a, b) in pairs.items())


def test_tp2_equals_one_process(two_ranks):
    """TP x2 vs one process from the same weights: first-step logits (main and MTP), every parameter's gradient
    (split ones gathered), and the losses of 3 AdamW steps; all ranks agree and keep equal replicated weights."""
    for variant in ("micro", "micro_no_qlora"):
        d = torch.load(two_ranks / f"{variant}.pt")
        ref, tp = d["ref"], d["tp"]
        q = "wq" if variant == "micro_no_qlora" else "wq_b"
        for block in ("layers.0", "layers.1", "mtp.0.block"):  # dense, MoE, the MTP module's (MoE) block
            mlp = "ffn" if block == "layers.0" else "ffn.shared_experts"
            expected = {f"{block}.attn.{w}.weight" for w in (q, "wkv_b", "wo")}
            expected |= {f"{block}.{mlp}.{w}.weight" for w in ("w1", "w2", "w3")}
            assert expected <= set(d["split"]), (variant, sorted(expected - set(d["split"])))
        assert not [n for n in d["split"] if ".ffn.experts." in n or ".gate." in n or "wkv_a" in n], d["split"]

        errs = {"logits": rel_err(tp["logits"], ref["logits"])}
        errs |= {f"mtp{k}": rel_err(a, b) for k, (a, b) in enumerate(zip(tp["mtp_logits"], ref["mtp_logits"]))}
        grad_err, grad_name = worst({n: (tp["grads"][n], ref["grads"][n]) for n in ref["grads"]})
        errs[f"grad {grad_name}"] = grad_err
        errs["losses"] = rel_err(tp["losses"], ref["losses"])
        print(variant, errs)
        assert set(tp["grads"]) == set(ref["grads"])
        assert all(e <= TOL for e in errs.values()), (variant, errs, tp["losses"], ref["losses"])
        assert all(r == tp["losses_by_rank"][0] for r in tp["losses_by_rank"]), tp["losses_by_rank"]
        assert tp["replica_drift"] == 0.0, (variant, tp["replica_drift"])


def test_apply_tp_refuses_what_does_not_split(two_ranks):
    errors = json.loads((two_ranks / "refuse.json").read_text())
    assert errors["heads"] == "tensor parallelism over 2 processes needs num_attention_heads=3 divisible by 2"
    assert "intermediate_size=129" in errors["dense"]
    assert "moe_intermediate_size * n_shared_experts=33" in errors["shared"]
    assert "attn.wo is a Linear with FP8 weights" in errors["fp8"]


def test_tp2_under_fsdp2_on_a_2x2_mesh(two_ranks, tmp_path):
    """apply_tp over "tp", then fully_shard over "dp" (each dp rank on half the batch): the losses of 3 AdamW
    steps equal one process's on the whole batch (the reference that the 2-process run computed)."""
    torchrun([WORKER, "fsdp", str(tmp_path)], nproc=4)
    losses = torch.load(tmp_path / "fsdp.pt")["losses"]
    ref = torch.load(two_ranks / "micro.pt")["ref"]["losses"]
    err = rel_err(losses, ref)
    print("2x2", err, losses, ref)
    assert err <= TOL, (err, losses, ref)
