"""The routed experts at decode sizes on CPU, float32, inference mode: the grouped GEMMs (dispatch by expert,
the reference), every hit expert on every token through batched GEMMs over runs of experts ("dense",
`cpu_kernels.experts_dense`), and for one token its K experts one by one ("loop", `cpu_kernels.experts_loop`).
The path the engine's calibration chose on this machine (`cpu_kernels.Calibration`, cached per machine) is
printed beside each measurement, so a choice that the measurements here contradict shows up.

Each MoE layer is a fresh random one (std 0.02) of the preset's shapes, several of them in turn so that their
weights are not in cache (as in a real decode step, where the other layers' weights pass through between two
visits), with the gate's own routing of random tokens. The first line printed names the machine.

    python benchmarks/bench_moe_decode.py [--presets bench-small,tiny] [--tokens 1,2,3,4,8,16] [--repeats 20]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from dsv3.infer import cpu_kernels as ck  # noqa: E402
from dsv3.model.moe import MoE  # noqa: E402
from common import print_machine  # noqa: E402


def layers_for(preset: str, count: int) -> list[MoE]:
    cfg = dsv3.ModelConfig.preset(preset)
    layers = []
    for _ in range(count):
        moe = MoE(cfg, None).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.02)
        moe.experts.pack_projections()
        layers.append(moe)
    return layers


def time_per_layer(layers: list[MoE], fn, n_tokens: int, repeats: int) -> float:
    """Median over repeats of the mean time per layer (seconds), cycling through the layers."""
    d = layers[0].experts.dim
    xs = [torch.randn(n_tokens, d) for _ in layers]
    routes = [moe.gate(x)[:2] for moe, x in zip(layers, xs)]
    times = []
    for _ in range(repeats):
        total = 0.0
        for moe, x, (w, e) in zip(layers, xs, routes):
            t = time.perf_counter()
            fn(moe, x, w, e)
            total += time.perf_counter() - t
        times.append(total / len(layers))
    return sorted(times)[len(times) // 2]


def grouped(moe: MoE, x, w, e):
    x_SD, weight_S, counts_E, handle = moe.dispatcher.dispatch(x, w, e)
    return moe.dispatcher.combine(moe.experts(x_SD, counts_E, weight_S), handle, torch.zeros_like(x))


def dense(moe: MoE, x, w, e):
    return ck.ExpertsKernel({b: "dense" for b in ck.EXPERT_TOKEN_BUCKETS}, F.linear)(
        moe.experts, x, w, e, torch.zeros_like(x))


def token(moe: MoE, x, w, e):
    return ck.experts_loop(moe.experts, x, w, e, torch.zeros_like(x), F.linear)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="bench-small,tiny")
    ap.add_argument("--tokens", default="1,2,3,4,6,8,16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", type=int, default=6, help="MoE layers cycled through (default 6)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine()
    rows = []
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; times per layer, medians of {args.repeats}")
    with torch.inference_mode():
        for preset in args.presets.split(","):
            layers = layers_for(preset, args.layers)
            ex = layers[0].experts
            topk = dsv3.ModelConfig.preset(preset).num_experts_per_tok
            mb = 3 * ex.dim * ex.inter_dim * 4 / 2**20
            cal = ck.Calibration(ck.machine_key(torch.float32))
            chosen = cal.experts_choice([m.experts for m in layers], topk, F.linear, list(ck.EXPERT_TOKEN_BUCKETS), 2 * ck.llc_bytes())
            print(f"\n{preset}: {ex.n_experts} experts of {mb:.2f} MB, top-{topk}")
            print(f"  {'tokens':>6} {'grouped us':>11} {'dense us':>9} {'loop us':>9}  path the calibration chose")
            for n in (int(t) for t in args.tokens.split(",")):
                for _ in range(2):  # the first pass warms up
                    times = {"grouped": time_per_layer(layers, grouped, n, args.repeats),
                             "dense": time_per_layer(layers, dense, n, args.repeats)}
                    if n == 1:
                        times["loop"] = time_per_layer(layers, token, n, args.repeats)
                pick = chosen.get(ck.bucket(n, ck.EXPERT_TOKEN_BUCKETS), "grouped")
                if pick == "dense" and "dense" not in times:
                    pick = "grouped"
                best = min(times, key=times.get)
                cells = "".join(f"{times[k] * 1e6:{w}.0f}" if k in times else f"{'-':>{w}}"
                                for k, w in (("grouped", 11), ("dense", 10), ("loop", 10)))
                print(f"  {n:>6}{cells}  {pick}" + ("" if pick == best else f" (measured faster here: {best})"))
                rows.append(dict(preset=preset, tokens=n, seconds=times, path_taken=pick, fastest=best))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, repeats=args.repeats, layers=args.layers, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
