"""Forward throughput of dsv3 next to transformers' DeepseekV3ForCausalLM, on the bench-small preset (CPU, fp32).

Both models are loaded from the same checkpoint directory (a random bench-small model written once with
`dsv3.save_pretrained`), run the same inputs under torch.no_grad in eval mode, and are timed alternately
(dsv3, transformers, dsv3, ...; all shapes round robin) so that any drift of the machine hits both alike.
For every shape the script prints tokens/s of each (the median of the timed runs), their ratio, and how
far each is from the compute floor: the model's FLOPs per forward divided by a fp32 matmul peak measured
here with a large torch.mm (before and after the runs; the higher is used). A second table shows the
spread of the runs (best / median / worst), which is large on a shared machine. The first line names the
machine (CPU model and ISA flags, threads, torch and its BLAS); --json stores it too. Neither side caches
anything between forwards (transformers runs with use_cache=False), so the ratio is like for like.

    python benchmarks/bench_forward.py                      # all cores, 1x512, 4x256, 8x128
    python benchmarks/bench_forward.py --threads 1 --repeats 5 --shapes 1x128,2x512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
import transformers

from common import print_machine  # puts src/ on the path first
import dsv3
from dsv3.ckpt import model_bytes


# ---- the compute floor ---------------------------------------------------------------------------------

def active_matmul_params(cfg: dsv3.ModelConfig) -> dict[str, int]:
    """Weights of the matmuls one token goes through in the main model (the MTP module is not part of
    `model(input_ids)`), by part. Each weight is one multiply-add per token, i.e. 2 FLOPs.

    Not counted: the embedding (a row lookup), RMSNorm weights, RoPE, softmax and activation functions
    (elementwise work, a few FLOPs per value, well under 1% here)."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    P, V = cfg.qk_nope_head_dim, cfg.v_head_dim

    # MLA: query down/up projections (or one q_proj), the kv latent + shared rotary key projection, the
    # latent's expansion to per-head keys and values (applied once per token in full-sequence mode), wo.
    if cfg.q_lora_rank is None:
        attn = d * H * (P + R)
    else:
        attn = d * cfg.q_lora_rank + cfg.q_lora_rank * H * (P + R)
    attn += d * (C + R) + C * H * (P + V) + H * V * d

    # One SwiGLU expert (or the dense MLP): gate, up and down projections.
    def swiglu(inter: int) -> int:
        return 3 * d * inter

    parts = {"attention projections": 0, "dense MLP": 0, "MoE gate": 0, "shared experts": 0,
             "routed experts (top-k)": 0}
    for layer in range(cfg.num_hidden_layers):
        parts["attention projections"] += attn
        if cfg.is_moe_layer(layer):
            parts["MoE gate"] += d * cfg.n_routed_experts  # every expert is scored
            parts["shared experts"] += swiglu(cfg.moe_intermediate_size * cfg.n_shared_experts)
            # only the k experts a token is routed to do work for it
            parts["routed experts (top-k)"] += cfg.num_experts_per_tok * swiglu(cfg.moe_intermediate_size)
        else:
            parts["dense MLP"] += swiglu(cfg.intermediate_size)
    parts["output head"] = d * cfg.vocab_size
    return parts


def forward_flops(cfg: dsv3.ModelConfig, batch: int, seq: int) -> float:
    """FLOPs of one forward over (batch, seq) tokens.

    - matmuls: 2 x (active matmul weights) per token (see active_matmul_params);
    - attention: for every layer, head and causal (query, key) pair (seq*(seq+1)/2 pairs per sequence),
      the score q.k costs 2*(qk_nope + qk_rope) FLOPs and adding weight*v costs 2*v_head_dim FLOPs.
      Only the pairs the causal mask allows are counted: that is the useful work."""
    tokens = batch * seq
    matmul = 2 * sum(active_matmul_params(cfg).values()) * tokens
    pairs = batch * seq * (seq + 1) // 2
    per_pair = 2 * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_attention_heads
    attention = cfg.num_hidden_layers * pairs * per_pair
    return float(matmul + attention)


def measure_matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    """fp32 FLOP/s of one n x n x n torch.mm, the best of `repeats` timed runs after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# ---- the models ----------------------------------------------------------------------------------------

def build_checkpoint(cfg: dsv3.ModelConfig, path: str, seed: int) -> None:
    """A random model (dsv3.init_weights, std 0.006 as the V3 report) written in fp32."""
    model = dsv3.DeepSeekV3(cfg)
    dsv3.init_weights(model, generator=torch.Generator().manual_seed(seed))
    dsv3.save_pretrained(model, path, dtype=torch.float32)


def load_both(path: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = dsv3.load_pretrained(path, dtype=torch.float32).eval()
    peer = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, peer


def run_ours(model, x):
    return model(x)


def run_peer(model, x):
    return model(input_ids=x, use_cache=False).logits  # no KV cache: a plain full-sequence forward


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the measure of tests/test_parity.py)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def seconds(fn, *args) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench(ours, peer, shapes: list[tuple[int, int]], vocab: int, warmup: int, repeats: int) -> list[dict]:
    """Seconds per forward of each model on each (batch, seq) shape, and their logits' difference.

    The timed runs go round robin: every round runs every shape, dsv3 then transformers. A slow spell of a
    shared machine then lands on both models and spreads over the shapes instead of spoiling one of them."""
    gen = torch.Generator().manual_seed(1234)
    inputs = [torch.randint(0, vocab, (b, t), generator=gen) for b, t in shapes]
    times_ours = [[] for _ in shapes]
    times_peer = [[] for _ in shapes]
    errors = []
    with torch.no_grad():
        for x in inputs:
            for _ in range(warmup):
                run_ours(ours, x)
                run_peer(peer, x)
            errors.append(rel_err(run_ours(ours, x), run_peer(peer, x)))
        for _ in range(repeats):
            for i, x in enumerate(inputs):
                times_ours[i].append(seconds(run_ours, ours, x))
                times_peer[i].append(seconds(run_peer, peer, x))
    return [{"batch": b, "seq": t, "tokens": b * t,
             "dsv3_s": statistics.median(times_ours[i]), "transformers_s": statistics.median(times_peer[i]),
             "dsv3_times_s": times_ours[i], "transformers_times_s": times_peer[i], "max_rel_err": errors[i]}
            for i, (b, t) in enumerate(shapes)]


# ---- main ----------------------------------------------------------------------------------------------

def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        b, t = item.lower().split("x")
        shapes.append((int(b), int(t)))
    return shapes


def print_tables(results: list[dict]) -> None:
    header = (f"{'shape':>7} | {'dsv3 tok/s':>10} | {'HF tok/s':>9} | {'dsv3/HF':>7} | {'GFLOP':>6} | "
              f"{'floor tok/s':>11} | {'dsv3 GFLOP/s':>12} | {'HF GFLOP/s':>10} | {'dsv3 %peak':>10} | "
              f"{'HF %peak':>8} | {'max rel err':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        ours_tps, peer_tps = r["tokens"] / r["dsv3_s"], r["tokens"] / r["transformers_s"]
        print(f"{r['batch']:>3}x{r['seq']:<3} | {ours_tps:>10.0f} | {peer_tps:>9.0f} | "
              f"{ours_tps / peer_tps:>7.2f} | {r['gflop']:>6.2f} | {r['tokens'] / r['floor_s']:>11.0f} | "
              f"{r['gflop'] / r['dsv3_s']:>12.1f} | {r['gflop'] / r['transformers_s']:>10.1f} | "
              f"{100 * r['floor_s'] / r['dsv3_s']:>9.1f}% | {100 * r['floor_s'] / r['transformers_s']:>7.1f}% | "
              f"{r['max_rel_err']:>11.2e}")

    # The spread of the timed runs: on a quiet machine best and median are close.
    print(f"\n{'shape':>7} | {'dsv3 ms best/median/worst':>27} | {'HF ms best/median/worst':>25} | "
          f"{'dsv3/HF (best)':>14}")
    for r in results:
        a, b = r["dsv3_times_s"], r["transformers_times_s"]
        print(f"{r['batch']:>3}x{r['seq']:<3} | {1e3 * min(a):>8.0f} {1e3 * r['dsv3_s']:>8.0f} {1e3 * max(a):>9.0f} | "
              f"{1e3 * min(b):>7.0f} {1e3 * r['transformers_s']:>8.0f} {1e3 * max(b):>8.0f} | "
              f"{min(b) / min(a):>14.2f}")

    worst = max(r["max_rel_err"] for r in results)
    verdict = "within" if worst <= 1e-5 else "ABOVE"
    print(f"\nlogits agreement: max rel err {worst:.2e} ({verdict} the 1e-5 parity target)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch intra-op threads (default: every core this process may use)")
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards per model and shape (median taken)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards per model and shape first")
    ap.add_argument("--shapes", default="1x512,4x256,8x128", help="comma-separated BATCHxSEQ")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    machine = print_machine()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    cfg = dsv3.ModelConfig.preset("bench-small")
    shapes = parse_shapes(args.shapes)
    peak_before = measure_matmul_peak()

    with tempfile.TemporaryDirectory(prefix="dsv3-bench-forward-") as path:
        build_checkpoint(cfg, path, args.seed)
        ours, peer = load_both(path)

    parts = active_matmul_params(cfg)
    print(f"bench-small forward, fp32, torch.no_grad, eval; {args.threads} thread(s); "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"transformers backends: attention={peer.config._attn_implementation}, "
          f"experts={getattr(peer.config, '_experts_implementation', 'n/a')}")
    print(f"weights: {model_bytes(ours) / 2**20:.1f} MiB (fp32); active matmul weights per token: "
          f"{sum(parts.values()) / 1e6:.2f} M = " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in parts.items()))
    print(f"{args.warmup} warm-up + {args.repeats} timed forwards per model and shape (round robin), median")

    results = bench(ours, peer, shapes, cfg.vocab_size, args.warmup, args.repeats)

    # The machine may be shared: measure the peak again after the runs and keep the higher of the two,
    # which is the conservative choice (it gives the lower % of peak).
    peak_after = measure_matmul_peak()
    peak = max(peak_before, peak_after)
    print(f"measured fp32 matmul peak (torch.mm 2048^3, best of 20): {peak_before / 1e9:.1f} GFLOP/s before, "
          f"{peak_after / 1e9:.1f} after the runs; using {peak / 1e9:.1f}\n")
    for r in results:
        r["gflop"] = forward_flops(cfg, r["batch"], r["seq"]) / 1e9
        r["floor_s"] = r["gflop"] * 1e9 / peak  # the time at the measured matmul peak

    print_tables(results)

    if args.json:
        out = {"benchmark": "forward", "machine": machine, "preset": "bench-small", "dtype": "float32",
               "threads": args.threads,
               "repeats": args.repeats, "warmup": args.warmup, "matmul_peak_flops": peak,
               "matmul_peak_before_flops": peak_before, "matmul_peak_after_flops": peak_after,
               "active_matmul_params": parts, "torch": torch.__version__,
               "transformers": transformers.__version__, "platform": platform.platform(),
               "transformers_attention": peer.config._attn_implementation,
               "transformers_experts": getattr(peer.config, "_experts_implementation", None),
               "results": results}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
