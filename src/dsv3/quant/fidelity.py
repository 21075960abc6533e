"""How close each FP8 GEMM of a model comes to FP32, op by op: the per-op table of `dsv3 experiment fp8` and of
the tests.

The model runs one FP32 forward and backward (next-token cross-entropy) with every FP8-eligible Linear's input
and output gradient captured, and the routed experts' too (their three projections taken apart). Each op is then
recomputed twice from exactly those tensors, in FP32 and through the FP8 recipe, and compared as a
signal-to-quantisation-noise ratio (dB) of its output, its input gradient and its weight gradient. Feeding both
the same inputs keeps the figures about each op alone, not about errors that earlier layers passed down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Linear
from ..model.moe import Experts
from .training import DEFAULT_SKIP, Fp8Recipe, _Fp8Linear, sqnr_db


def _linear_fidelity(x_MK: torch.Tensor, w_NK: torch.Tensor, gy_MN: torch.Tensor, recipe: Fp8Recipe
                     ) -> tuple[torch.Tensor, ...]:
    """-> FP32 (y, dx, dw) and FP8 (y, dx, dw) of y = x W^T for output gradient gy."""
    x, w = x_MK.float().detach().requires_grad_(), w_NK.float().detach().requires_grad_()
    y = x @ w.T
    y.backward(gy_MN.float())
    x8, w8 = x_MK.float().detach().requires_grad_(), w_NK.float().detach().requires_grad_()
    y8 = _Fp8Linear.apply(x8, w8, recipe, torch.float32)
    y8.backward(gy_MN.float())
    return (y.detach(), x.grad, w.grad), (y8.detach(), x8.grad, w8.grad)


def _row(name: str, ref: tuple, fp8: tuple) -> dict:
    return {"op": name, "output_db": sqnr_db(ref[0], fp8[0]), "input_grad_db": sqnr_db(ref[1], fp8[1]),
            "weight_grad_db": sqnr_db(ref[2], fp8[2])}


def _expert_rows(name: str, ex: Experts, x_SD, counts_E, weight_S, gy_SD, recipe: Fp8Recipe) -> list[dict]:
    """The routed experts' w1, w3 (input x) and w2 (input h = silu(x W1^T) * x W3^T * gate), each expert's
    rows through its own matrices; every expert's outputs and gradients pooled into one figure per projection."""
    x = x_SD.float().detach().requires_grad_()
    starts = [0] + torch.cumsum(counts_E, 0).tolist()
    pooled = {n: ([], []) for n in ("w1", "w3", "w2")}
    dw_ref = {n: torch.zeros_like(getattr(ex, n), dtype=torch.float32) for n in pooled}
    dw_fp8 = {n: torch.zeros_like(getattr(ex, n), dtype=torch.float32) for n in pooled}
    for e in range(ex.n_experts):
        lo, hi = starts[e], starts[e + 1]
        if hi == lo:
            continue
        xe = x[lo:hi].detach().requires_grad_()
        gate = xe @ ex.w1[e].float().T
        up = xe @ ex.w3[e].float().T
        h = F.silu(gate) * up * (weight_S[lo:hi, None].float() if weight_S is not None else 1)
        gate.retain_grad()
        up.retain_grad()
        h.retain_grad()
        (h @ ex.w2[e].float().T).backward(gy_SD[lo:hi].float())
        for n, inp, g in (("w1", xe, gate.grad), ("w3", xe, up.grad), ("w2", h, h.grad)):
            grad_out = gy_SD[lo:hi] if n == "w2" else g
            ref, q = _linear_fidelity(inp.detach(), getattr(ex, n)[e], grad_out, recipe)
            pooled[n][0].append(ref[:2])
            pooled[n][1].append(q[:2])
            dw_ref[n][e], dw_fp8[n][e] = ref[2], q[2]
    rows = []
    for n, (refs, qs) in pooled.items():
        if not refs:
            continue
        ref = (torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs]), dw_ref[n])
        q = (torch.cat([r[0] for r in qs]), torch.cat([r[1] for r in qs]), dw_fp8[n])
        rows.append(_row(f"{name}.{n}", ref, q))
    return rows


def per_op_fidelity(model: nn.Module, input_ids: torch.Tensor, recipe: Fp8Recipe | None = None,
                    skip: tuple[str, ...] = DEFAULT_SKIP) -> list[dict]:
    """-> one row per FP8-eligible Linear (and per routed-expert projection) of `model` (an FP32 model, not
    converted): {"op", "output_db", "input_grad_db", "weight_grad_db"}, measured on the batch input_ids (B, T+1)
    (the model reads [:, :-1] and predicts [:, 1:]). The model's parameters get gradients; nothing else changes."""
    recipe = recipe or Fp8Recipe()
    captured: dict[str, list] = {}

    def hook(name):
        def record(mod, args, out):
            captured[name] = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            out.register_hook(lambda g: captured[name].append(g.detach()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (Linear, Experts)) and n.rsplit(".", 1)[-1] not in skip]
    try:
        was_training = model.training
        model.train()
        with torch.autocast(input_ids.device.type, enabled=False):
            logits = model(input_ids[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), input_ids[:, 1:].flatten()).backward()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, (*args, gy) in ((n, c) for n, c in captured.items() if len(c) >= 2):
        mod = model.get_submodule(name)
        if isinstance(mod, Experts):
            x_SD, counts_E, weight_S = (list(args) + [None])[:3]
            rows += _expert_rows(name, mod, x_SD, counts_E, weight_S, gy, recipe)
        else:
            x = args[0].reshape(-1, mod.in_features)
            ref, q = _linear_fidelity(x, mod.weight, gy.reshape(-1, mod.out_features), recipe)
            rows.append(_row(name, ref, q))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| op | output (dB) | input gradient (dB) | weight gradient (dB) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['output_db']:.1f} | {r['input_grad_db']:.1f} | {r['weight_grad_db']:.1f} |")
    if rows:
        lines.append(f"| **minimum** | {min(r['output_db'] for r in rows):.1f} | "
                     f"{min(r['input_grad_db'] for r in rows):.1f} | {min(r['weight_grad_db'] for r in rows):.1f} |")
    return "\n".join(lines)
