"""The FP8 Triton kernels (dsv3.quant.kernels) at DeepSeek-V3's shapes, on a GPU:

- the block-scaled GEMM (1x128 activations x 128x128-block weights, FP32 promotion every 128 of K) in TFLOPS,
  against torch's BF16 matmul of the same shapes, same process: the Linears of one MoE layer for M = 4096
  tokens (q_a, q_b, o, the dense MLP's w1 and w2) and the routed experts as one grouped GEMM over 256
  experts (w13 of a gate/up pair and w2, 8 experts per token: 32768 rows) against torch's BF16 grouped_mm;
- the quantisers (act_quant, weight_quant, requant_transpose) in GB/s, as a share of the HBM bandwidth
  (H200: 4.8 TB/s; --peak-tbs for another GPU).

Each GEMM's output is also compared with the BF16 product (relative error norm-wise: e4m3 rounding, ~3%).
Shapes come from the 671B preset (dsv3.ModelConfig.preset("671B")). Never run in CI; benchmarks/gpu_checks.sh
runs it. Without CUDA it says so and exits 0; --smoke runs the code paths at 1/32 of the sizes (and experts) on CPU under
triton's interpreter (timings meaningless), to check the script itself.

    python benchmarks/bench_fp8_gemm.py [--tokens 4096] [--json out.json] [--peak-tbs 4.8] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from common import print_machine  # noqa: E402


def gemm_shapes(cfg: dsv3.ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of each Linear, y = x W^T with W (N, K)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    return {
        "q_a (wq_a)": (cfg.q_lora_rank, h),
        "q_b (wq_b)": (heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank),
        "o (wo)": (h, heads * cfg.v_head_dim),
        "dense w1": (cfg.intermediate_size, h),
        "dense w2": (h, cfg.intermediate_size),
    }


def grouped_shapes(cfg: dsv3.ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(G, N, K) of the routed experts' weights."""
    e, f, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    return {"experts w13": (e, 2 * f, h), "experts w2": (e, h, f)}


def timer(device: torch.device, repeats: int):
    """-> time(fn): the median seconds of one call, after warm-up (CUDA events on a GPU)."""
    def time_it(fn) -> float:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return time_it


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_gemms(kernels, time_it, device, m: int, shapes: dict, scale: int) -> list[dict]:
    rows = []
    for name, (n, k) in shapes.items():
        n, k = n // scale, k // scale
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5
        xq, xs = kernels.act_quant(x)
        wq, ws = kernels.weight_quant(w)
        t_fp8 = time_it(lambda: kernels.fp8_gemm(xq, xs, wq, ws))
        t_bf16 = time_it(lambda: x @ w.T)
        flops = 2 * m * n * k
        err = rel_err(kernels.fp8_gemm(xq, xs, wq, ws), x @ w.T)
        rows.append(dict(op=name, m=m, n=n, k=k, fp8_tflops=flops / t_fp8 / 1e12, bf16_tflops=flops / t_bf16 / 1e12,
                         speedup=t_bf16 / t_fp8, rel_err_vs_bf16=err))
    return rows


def bench_grouped(kernels, time_it, device, m: int, shapes: dict, top_k: int, scale: int) -> list[dict]:
    """Tokens routed uniformly at random to top_k experts each (group sizes vary as a real batch's do)."""
    rows = []
    for name, (g, n, k) in shapes.items():
        g, n, k = g // scale, n // scale, k // scale
        s = m * top_k
        counts = torch.bincount(torch.randint(0, g, (s,)), minlength=g)
        offs = counts.cumsum(0).to(device=device, dtype=torch.int32)
        x = torch.randn(s, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(g, n, k, device=device, dtype=torch.bfloat16) * k ** -0.5
        xq, xs = kernels.act_quant(x)
        wq, ws = kernels.weight_quant(w)
        t_fp8 = time_it(lambda: kernels.fp8_grouped_gemm(xq, xs, wq, ws, offs))
        bf16 = lambda: F.grouped_mm(x, w.transpose(1, 2), offs=offs)  # noqa: E731
        try:
            t_bf16, err = time_it(bf16), rel_err(kernels.fp8_grouped_gemm(xq, xs, wq, ws, offs), bf16())
        except (RuntimeError, NotImplementedError) as e:  # grouped_mm needs sm_90 for bf16
            print(f"  torch grouped_mm (bf16) unavailable here: {str(e).splitlines()[0]}")
            t_bf16, err = float("nan"), float("nan")
        flops = 2 * s * n * k
        rows.append(dict(op=f"{name} ({g} groups)", m=s, n=n, k=k, groups=g, fp8_tflops=flops / t_fp8 / 1e12,
                         bf16_tflops=flops / t_bf16 / 1e12, speedup=t_bf16 / t_fp8, rel_err_vs_bf16=err))
        del x, w, xq, wq
    return rows


def bench_quantisers(kernels, time_it, device, m: int, cfg: dsv3.ModelConfig, scale: int, peak: float) -> list[dict]:
    """Bytes moved = bytes read + bytes written (e4m3 values, float32 scales), once each."""
    h, inter = cfg.hidden_size // scale, cfg.intermediate_size // scale
    x = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    w = torch.randn(inter, h, device=device, dtype=torch.bfloat16)
    q, s = kernels.act_quant(x, scale_fmt="ue8m0")
    cases = [
        ("act_quant (bf16 -> e4m3, 1x128)", lambda: kernels.act_quant(x), x.numel() * (2 + 1 + 4 / 128)),
        ("weight_quant (bf16 -> e4m3, 128x128)", lambda: kernels.weight_quant(w), w.numel() * (2 + 1)),
        ("requant_transpose (e4m3 1x128 -> 128x1)", lambda: kernels.requant_transpose(q, s),
         q.numel() * 2 * (1 + 4 / 128)),
    ]
    rows = []
    for name, fn, nbytes in cases:
        t = time_it(fn)
        rows.append(dict(op=name, shape=list(x.shape if "weight" not in name else w.shape), gbps=nbytes / t / 1e9,
                         share_of_peak=nbytes / t / (peak * 1e12)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="M: tokens in the batch")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--peak-tbs", type=float, default=4.8, help="the GPU's memory bandwidth, TB/s (H200: 4.8)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="1/32 sizes on CPU under the interpreter")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by the kernels' module)
    elif not torch.cuda.is_available():
        print("bench_fp8_gemm: needs a CUDA GPU (compute capability >= 8.9 for FP8); nothing measured here")
        return
    from dsv3.quant import kernels

    if not kernels.available():
        print("bench_fp8_gemm: triton is missing or this GPU has no FP8 tensor cores (sm_89+); nothing measured")
        return
    device = torch.device("cpu" if args.smoke else "cuda")
    scale, m = (32, args.tokens // 32) if args.smoke else (1, args.tokens)
    machine = print_machine(device)
    cfg = dsv3.ModelConfig.preset("671B")
    time_it = timer(device, 2 if args.smoke else args.repeats)
    torch.manual_seed(0)

    gemms = bench_gemms(kernels, time_it, device, m, gemm_shapes(cfg), scale)
    gemms += bench_grouped(kernels, time_it, device, m, grouped_shapes(cfg), cfg.num_experts_per_tok, scale)
    print(f"\nblock-scaled FP8 GEMM vs torch BF16, M = {m} tokens" + (" (smoke: meaningless)" if args.smoke else ""))
    print(f"{'op':<24} {'M':>6} {'N':>6} {'K':>6} {'FP8 TFLOPS':>11} {'BF16 TFLOPS':>12} {'ratio':>6} {'err':>7}")
    for r in gemms:
        print(f"{r['op']:<24} {r['m']:>6} {r['n']:>6} {r['k']:>6} {r['fp8_tflops']:>11.1f} {r['bf16_tflops']:>12.1f} "
              f"{r['speedup']:>6.2f} {r['rel_err_vs_bf16']:>7.4f}")

    quant = bench_quantisers(kernels, time_it, device, m * cfg.num_experts_per_tok, cfg, scale, args.peak_tbs)
    print(f"\nquantisers: achieved bandwidth, share of {args.peak_tbs} TB/s")
    for r in quant:
        print(f"{r['op']:<42} {str(tuple(r['shape'])):>14} {r['gbps']:>8.0f} GB/s {100 * r['share_of_peak']:>5.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "tokens": m, "peak_tbs": args.peak_tbs, "gemms": gemms,
                       "quantisers": quant, "smoke": args.smoke}, f, indent=1)


if __name__ == "__main__":
    main()
