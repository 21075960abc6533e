"""Greedy decoding: dsv3's engine (latent cache, absorbed MLA) against transformers' `generate`, same
weights, same prompts, same process; CPU fp32 by default (the issue's case), any device and dtype by flag.

Cases (the inference issue's): batch 1 and 4 with 64-token prompts and 128 new tokens, and a long context
(2048-token prompt). For each: end-to-end time, the prefill time alone (max_new_tokens=1), decode tokens/s
with prefill subtracted, the ratio, whether the tokens are identical, and two floors of a decode step:

- the bandwidth floor (the headline): every weight a step touches, plus the latent cache it reads, over the
  bandwidth of a 512 MiB streaming read measured in this run (before and after the cold reads; the higher);
- the cold-read floor: each weight matrix a step reads (the engine's own tensors, wq_a|wkv_a and w1|w3 packed
  as it packs them; routed experts: the expected number of distinct ones the batch picks) read once from
  memory when it is not in cache, timed here as `.sum()` over a pool of copies of that shape larger than
  4x the last-level cache, best of 3 passes; summed, plus the vectors and the cache at the streaming rate.
  Small matrices read slower than one long stream (per-op start-up, prefetch ramp), so the gap between the
  two floors is what the memory system itself costs a step of this model's matrix sizes.

Like for like: every timed run gets fresh random prompts, the same for both engines, so dsv3's prefix cache
is on (as users run it) but never hits (the script checks: "0 prompt tokens served from it"). The effect of
the cache is shown as its own row in the long case (--cached-cases): dsv3 re-running a prompt it has already
seen, against dsv3 on a fresh one; transformers has no prefix cache, so that row has no ratio against it.
Also the cache bytes per token of each. The first line printed names the machine (dsv3.bench.machine_line).

    python benchmarks/bench_decode.py [--cases b1,b4,long] [--new-tokens 128] [--repeats 3] [--json out.json]
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16      # on a GPU

On a GPU, dsv3 decodes from captured CUDA graphs (cuda_graphs.py) and the same engine run eagerly is timed
alongside (the `eager` column), so the graphs' gain is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.infer import LLM, SamplingParams  # noqa: E402
from dsv3.infer.cuda_graphs import capture_blocker  # noqa: E402
from dsv3.model.layers import PackedWeights  # noqa: E402
from common import bench_small_checkpoint, print_machine  # noqa: E402

CASES = {"b1": (1, 64), "b4": (4, 64), "long": (1, 2048)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a streaming read (sum over a 512 MiB tensor) on the device, best of 5."""
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def step_bytes(cfg: dsv3.ModelConfig, batch: int, context: int, elem: int = 4) -> float:
    """Bytes one decode step must read at least: every weight it uses once (elem bytes each) and the latent cache.
    Routed experts: the expected number of distinct experts `batch` tokens pick, E (1 - (1 - k/E)^batch)."""
    E, k, d = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    expert = 3 * d * cfg.moe_intermediate_size
    used = E * (1 - (1 - k / E) ** batch)
    params = cfg.num_params(include_mtp=False) - cfg.vocab_size * d  # the embedding is read one row per token
    params -= n_moe * (E - used) * expert
    return elem * params + cache_bytes(cfg, batch, context, elem)


def cache_bytes(cfg: dsv3.ModelConfig, batch: int, context: int, elem: int) -> int:
    """The latent cache a decode step reads: every layer's (kv latent, rope key) of every position."""
    return elem * batch * context * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


# ---- the cold-read floor ---------------------------------------------------------------------------------

def decode_matrices(model: dsv3.DeepSeekV3) -> tuple[list[tuple[tuple[int, ...], torch.dtype, bool]], int]:
    """The weight tensors a decode step of the main model reads, as the engine holds them -> ([(matrix shape,
    dtype, routed), ...] one entry per matrix, bytes of the 1-D weights). Packed projections (wq_a|wkv_a,
    w1|w3) count as the one matrix they are; a routed experts' tensor (E, rows, cols) as E matrices with
    routed=True (a step reads only the experts it picks). Not read whole: the embedding (one row per token);
    not run: the MTP module."""
    covered, found = set(), []
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        for value in vars(module).values():
            if isinstance(value, PackedWeights) and value.intact():
                found.append(value.tensor)
                covered.update(id(p) for p in value.params)
    for name, p in model.named_parameters():
        if not (name.startswith(("mtp.", "embed.")) or id(p) in covered):
            found.append(p)
    matrices, vector_bytes = [], 0
    for t in found:
        if t.dim() == 1:
            vector_bytes += t.nbytes
        elif t.dim() == 3:  # routed experts
            matrices += [(tuple(t.shape[1:]), t.dtype, True)] * t.shape[0]
        else:
            matrices.append((tuple(t.shape), t.dtype, False))
    return matrices, vector_bytes


def last_level_cache_bytes(device: torch.device, machine: dict) -> int:
    """The cache a cold read must miss: the CPU's L3 (machine_info; 64 MiB if unknown), a GPU's L2."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return machine.get("l3_cache_bytes") or 64 * 2 ** 20


def cold_read_seconds(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pool_bytes: int,
                      passes: int = 3) -> float:
    """Seconds to read one matrix of this shape from memory, not cache: `.sum()` over each of a pool of copies
    (at least pool_bytes in all, so each is evicted before it comes round again), visited in a shuffled order
    (so no copy is prefetched as the tail of the one before); the best of `passes` passes, per matrix."""
    one = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n = max(8, min(50_000, -(-pool_bytes // one)))
    pool = torch.ones((n, *shape), dtype=dtype, device=device)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    views = [pool[i] for i in order]
    best = float("inf")
    for _ in range(passes + 1):  # the first pass warms up
        sync(device)
        t = time.perf_counter()
        for v in views:
            v.sum()
        sync(device)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def measure_cold_reads(matrices, device: torch.device, pool_bytes: int) -> dict:
    """Seconds per cold read of each distinct (shape, dtype) among the matrices."""
    return {(shape, dtype): cold_read_seconds(shape, dtype, device, pool_bytes)
            for shape, dtype in sorted({(s, d) for s, d, _ in matrices}, key=lambda k: -math.prod(k[0]))}


def cold_floor_seconds(matrices, vector_bytes: int, cold: dict, cfg: dsv3.ModelConfig, batch: int,
                       stream_bw: float, extra_bytes: int) -> tuple[float, float]:
    """-> (seconds of a decode step at the cold-read floor, matrices read). A step of `batch` tokens reads every
    matrix once, but of each routed-experts tensor of E matrices only the expected E (1 - (1 - k/E)^batch)
    distinct ones; the 1-D weights and extra_bytes (the cache) at the streaming rate."""
    k = cfg.num_experts_per_tok
    routed = Counter((s, d) for s, d, r in matrices if r)
    E = cfg.n_routed_experts
    share = (1 - (1 - k / E) ** batch) if E else 0.0  # the fraction of each layer's experts a step reads
    seconds, count = (vector_bytes + extra_bytes) / stream_bw, 0.0
    for (shape, dtype), t in cold.items():
        n = sum(1 for s, d, r in matrices if (s, d) == (shape, dtype) and not r) + routed[(shape, dtype)] * share
        seconds += n * t
        count += n
    return seconds, count


# ---- the peers -------------------------------------------------------------------------------------------

def hf_cache_bytes_per_token(hf, prompt: torch.Tensor) -> float:
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
    cache = out.past_key_values
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total / prompt.shape[1]


def timed(fn, *args) -> tuple[float, object]:
    """(seconds, output) of one call; outputs come back on the CPU, which waits for the device."""
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="b1,b4,long")
    ap.add_argument("--cached-cases", default="long",
                    help="cases that also get the cached-prompt row: dsv3 re-running a prompt it has seen, prefix "
                         "cache on (default long; '' for none)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of each engine, alternating, each on fresh prompts; medians")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine(device)
    import transformers
    logging.getLogger("transformers").setLevel(logging.ERROR)

    cfg, tmp = bench_small_checkpoint("bench_decode_")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    llm = LLM(tmp, dtype=dtype, device=device, max_num_seqs=8, kv_cache_tokens=8 * 4096)
    eager = None
    if llm.graphs is not None:
        eager = LLM(tmp, dtype=dtype, device=device, max_num_seqs=8, kv_cache_tokens=8 * 4096, cuda_graphs=False)
    elif device.type == "cuda":
        print("CUDA graphs are off for this model:", capture_blocker(llm.runner))
    bw_before = measure_bandwidth(device)
    matrices, vector_bytes = decode_matrices(llm.model)
    llc = last_level_cache_bytes(device, machine)
    cold = measure_cold_reads(matrices, device, 4 * llc)
    bw_after = measure_bandwidth(device)
    bw = max(bw_before, bw_after)  # a slow spell of a shared machine lowers one of them: the higher is the floor
    print(f"bench-small ({cfg.num_params() / 1e6:.1f}M parameters), {args.dtype} on {device}, "
          f"{torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; measured read bandwidth "
          f"{bw / 1e9:.1f} GB/s (streaming, 512 MiB; {bw_before / 1e9:.1f} before the cold reads, "
          f"{bw_after / 1e9:.1f} after)")
    print(f"cold reads (each matrix once from memory: .sum() over a pool of {4 * llc / 2 ** 20:.0f} MiB of copies, "
          f"4x the {'L2' if device.type == 'cuda' else 'L3'}, best of 3 passes):")
    for (shape, dt), t in cold.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        print(f"  {'x'.join(map(str, shape)):>10} {str(dt).removeprefix('torch.'):>8} {nbytes / 2 ** 10:7.0f} KiB "
              f"{t * 1e6:8.1f} us  {nbytes / t / 1e9:6.1f} GB/s ({100 * nbytes / t / bw:.0f}% of streaming)")
    hf_bpt = hf_cache_bytes_per_token(hf, torch.randint(0, cfg.vocab_size, (1, 64), device=device))
    print(f"cache bytes per token: dsv3 {llm.kv_cache_bytes_per_token} (latent: layers x (kv_lora + rope) x "
          f"{elem}), transformers {hf_bpt:.0f}, full per-head K/V would be "
          f"{cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem}")

    rows = []
    g = torch.Generator().manual_seed(1)
    cached_cases = {c for c in args.cached_cases.split(",") if c}
    for case in args.cases.split(","):
        B, T = CASES[case]
        N = args.new_tokens

        def fresh():
            return torch.randint(0, cfg.vocab_size, (B, T), generator=g)

        def hf_gen(prompts, n):
            ids = prompts.to(device)
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, T:].cpu()

        def gen(engine, prompts, n):
            outs = engine.generate(prompts.tolist(), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
            return torch.tensor([o.token_ids for o in outs])

        engines = [hf_gen, lambda p, n: gen(llm, p, n)] + ([lambda p, n: gen(eager, p, n)] if eager else [])
        warm = fresh()
        for e in engines:  # warm up (and capture the graphs of the buckets this case uses)
            e(warm, N)
        hits0 = [x.stats["prefix_cache_hit_tokens"] for x in (llm, eager) if x]
        full, prefill = [[] for _ in engines], [[] for _ in engines]
        same, same_eager = True, True
        for _ in range(args.repeats):  # engines in turns, so a slow spell of the machine falls on all alike
            prompts, short = fresh(), fresh()  # new to every engine: no prefix cache can serve them
            outs = []
            for i, e in enumerate(engines):
                t, out = timed(e, prompts, N)
                full[i].append(t)
                outs.append(out)
            same &= bool(torch.equal(outs[0], outs[1]))
            same_eager &= eager is None or bool(torch.equal(outs[2], outs[1]))
            for i, e in enumerate(engines):
                prefill[i].append(timed(e, short, 1)[0])
        hits = sum(x.stats["prefix_cache_hit_tokens"] for x in (llm, eager) if x) - sum(hits0)
        t_hf, t_us = statistics.median(full[0]), statistics.median(full[1])
        p_hf, p_us = statistics.median(prefill[0]), statistics.median(prefill[1])
        dec_hf = B * (N - 1) / max(t_hf - p_hf, 1e-9)
        dec_us = B * (N - 1) / max(t_us - p_us, 1e-9)
        context = T + N // 2
        floor_tps = B * bw / step_bytes(cfg, B, context, elem)  # tokens/s at the bandwidth floor
        cold_s, n_read = cold_floor_seconds(matrices, vector_bytes, cold, cfg, B, bw,
                                            cache_bytes(cfg, B, context, elem))
        cold_tps = B / cold_s
        row = dict(case=case, batch=B, prompt=T, new=N, same_tokens=same, fresh_prompts=True,
                   prefix_cache_hit_tokens=hits, e2e_tok_s_dsv3=B * N / t_us, e2e_tok_s_hf=B * N / t_hf,
                   decode_tok_s_dsv3=dec_us, decode_tok_s_hf=dec_hf, ratio=dec_us / dec_hf, e2e_ratio=t_hf / t_us,
                   prefill_s_dsv3=p_us, prefill_s_hf=p_hf, floor_tok_s=floor_tps, pct_of_floor=100 * dec_us / floor_tps,
                   cold_floor_tok_s=cold_tps, pct_of_cold_floor=100 * dec_us / cold_tps, cold_floor_matrices=n_read,
                   times_s=dict(dsv3=full[1], hf=full[0], prefill_dsv3=prefill[1], prefill_hf=prefill[0]))
        if eager:
            t_eg, p_eg = statistics.median(full[2]), statistics.median(prefill[2])
            row.update(decode_tok_s_dsv3_eager=B * (N - 1) / max(t_eg - p_eg, 1e-9), same_tokens_eager=same_eager,
                       cuda_graphs=llm.stats["cuda_graphs"])
        print(f"\n{case}: batch {B}, prompt {T}, {N} new tokens; every run a fresh random prompt, the same for both "
              f"engines (dsv3's prefix cache on, {hits} prompt tokens served from it); identical tokens: {same}")
        print(f"  {'':14}{'dsv3':>10}{'transformers':>14}{'ratio':>8}")
        print(f"  {'decode tok/s':14}{dec_us:10.1f}{dec_hf:14.1f}{dec_us / dec_hf:8.2f}")
        print(f"  {'end-to-end':14}{B * N / t_us:10.1f}{B * N / t_hf:14.1f}{t_hf / t_us:8.2f}")
        print(f"  {'prefill s':14}{p_us:10.3f}{p_hf:14.3f}{p_hf / p_us:8.2f}")
        if eager:
            print(f"  dsv3 eager (no CUDA graphs): {row['decode_tok_s_dsv3_eager']:.1f} decode tok/s; graphs "
                  f"{dec_us / row['decode_tok_s_dsv3_eager']:.2f}x ({row['cuda_graphs']} captured), identical "
                  f"tokens: {row['same_tokens_eager']}")
        print(f"  bandwidth floor: {floor_tps:.0f} tok/s ({step_bytes(cfg, B, context, elem) / 1e6:.1f} MB per step "
              f"at {bw / 1e9:.1f} GB/s); dsv3 decode at {row['pct_of_floor']:.0f}% of it")
        print(f"  cold-read floor: {cold_tps:.0f} tok/s ({n_read:.1f} matrices per step, each read once from memory "
              f"at its measured cold rate, {1e3 * cold_s:.2f} ms); dsv3 decode at {row['pct_of_cold_floor']:.0f}% "
              "of it")
        if case in cached_cases:
            row["cached"] = cached_row(llm, fresh(), N, args.repeats, B, p_us, t_us)
            c = row["cached"]
            print(f"  cached prompt, its own row (not like-for-like with transformers, which has no prefix cache): "
                  f"dsv3 re-running a prompt it has seen, {c['prefix_cache_hit_tokens_per_run']:.0f} of {B * T} "
                  "prompt tokens from its prefix cache")
            print(f"  {'':14}{'cached':>10}{'fresh':>14}{'gain':>8}")
            print(f"  {'end-to-end':14}{c['e2e_tok_s']:10.1f}{B * N / t_us:14.1f}{c['e2e_gain']:8.2f}")
            print(f"  {'prefill s':14}{c['prefill_s']:10.3f}{p_us:14.3f}{p_us / c['prefill_s']:8.2f}")
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, bandwidth=bw, bandwidth_before_after=[bw_before, bw_after],
                           last_level_cache_bytes=llc,
                           cold_read_s={f"{'x'.join(map(str, s))} {str(d).removeprefix('torch.')}": t
                                        for (s, d), t in cold.items()},
                           cache_bytes_per_token=dict(dsv3=llm.kv_cache_bytes_per_token, hf=hf_bpt), rows=rows),
                      f, indent=2)


def cached_row(llm: LLM, prompts: torch.Tensor, N: int, repeats: int, B: int, p_fresh: float, t_fresh: float) -> dict:
    """dsv3 with its prefix cache serving the prompt: one untimed run puts it there, then `repeats` timed runs
    of the same prompt (the whole generation, and the prefill alone)."""
    ids = prompts.tolist()

    def run(n):
        llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))

    run(N)  # the first sight of the prompt
    hits0 = llm.stats["prefix_cache_hit_tokens"]
    full, prefill = [], []
    for _ in range(repeats):
        full.append(timed(run, N)[0])
        prefill.append(timed(run, 1)[0])
    t, p = statistics.median(full), statistics.median(prefill)
    return dict(e2e_tok_s=B * N / t, prefill_s=p, e2e_gain=t_fresh / t, prefill_gain=p_fresh / p,
                prefix_cache_hit_tokens_per_run=(llm.stats["prefix_cache_hit_tokens"] - hits0) / (2 * repeats),
                times_s=dict(full=full, prefill=prefill))


if __name__ == "__main__":
    main()
