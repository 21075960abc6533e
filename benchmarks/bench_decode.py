"""Greedy decoding: dsv3's engine (latent cache, absorbed MLA) against transformers' `generate`, same
weights, same prompts, same process; CPU fp32 by default (the issue's case), any device and dtype by flag.

Cases (the inference issue's): batch 1 and 4 with 64-token prompts and 128 new tokens, and a long context
(2048-token prompt). For each: end-to-end time, the prefill time alone (max_new_tokens=1), decode tokens/s
with prefill subtracted, the ratio, whether the tokens are identical, and the memory-bandwidth floor of a
decode step (every weight a step touches, plus the cache it reads, over the measured read bandwidth).
Also the cache bytes per token of each.

    python benchmarks/bench_decode.py [--cases b1,b4,long] [--new-tokens 128] [--json out.json]
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16      # on a GPU

On a GPU, dsv3 decodes from captured CUDA graphs (cuda_graphs.py) and the same engine run eagerly is timed
alongside (the `eager` column), so the graphs' gain is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.infer import LLM, SamplingParams  # noqa: E402
from dsv3.infer.cuda_graphs import capture_blocker  # noqa: E402
from common import bench_small_checkpoint  # noqa: E402

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
    cache = batch * context * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return elem * (params + cache)


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


def timed(fns, repeats: int) -> list[tuple[float, object]]:
    """(median seconds, last output) of each function, run in turns (a, b, a, b, ...) so that a change in the
    machine's speed during the run (shared VMs drift by 10-30% over minutes) falls on all alike."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="b1,b4,long")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each engine, alternating; medians")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    ap.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    bw = measure_bandwidth(device)
    print(f"bench-small ({cfg.num_params() / 1e6:.1f}M parameters), {args.dtype} on {device}, "
          f"{torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; measured read bandwidth "
          f"{bw / 1e9:.1f} GB/s")
    hf_bpt = hf_cache_bytes_per_token(hf, torch.randint(0, cfg.vocab_size, (1, 64), device=device))
    print(f"cache bytes per token: dsv3 {llm.kv_cache_bytes_per_token} (latent: layers x (kv_lora + rope) x "
          f"{elem}), transformers {hf_bpt:.0f}, full per-head K/V would be "
          f"{cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem}")

    rows = []
    g = torch.Generator().manual_seed(1)
    for case in args.cases.split(","):
        B, T = CASES[case]
        N = args.new_tokens
        prompts = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        prompts_dev = prompts.to(device)
        mask = torch.ones_like(prompts_dev)

        def hf_gen(n):
            with torch.no_grad():
                return hf.generate(prompts_dev, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, T:].cpu()

        def gen(engine, n):
            outs = engine.generate(prompts.tolist(), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
            return torch.tensor([o.token_ids for o in outs])

        engines = [lambda n: hf_gen(n), lambda n: gen(llm, n)] + ([lambda n: gen(eager, n)] if eager else [])
        for e in engines:  # warm up (and capture the graphs of the buckets this case uses)
            e(N)
        full = timed([lambda e=e: e(N) for e in engines], args.repeats)
        prefill = timed([lambda e=e: e(1) for e in engines], args.repeats)
        (t_hf, tok_hf), (t_us, tok_us) = full[:2]
        p_hf, p_us = prefill[0][0], prefill[1][0]
        dec_hf = B * (N - 1) / max(t_hf - p_hf, 1e-9)
        dec_us = B * (N - 1) / max(t_us - p_us, 1e-9)
        floor_step = step_bytes(cfg, B, T + N // 2, elem) / bw  # seconds per decode step at the bandwidth floor
        floor_tps = B / floor_step
        row = dict(case=case, batch=B, prompt=T, new=N, same_tokens=bool(torch.equal(tok_hf, tok_us)),
                   e2e_tok_s_dsv3=B * N / t_us, e2e_tok_s_hf=B * N / t_hf, decode_tok_s_dsv3=dec_us,
                   decode_tok_s_hf=dec_hf, ratio=dec_us / dec_hf, prefill_s_dsv3=p_us, prefill_s_hf=p_hf,
                   floor_tok_s=floor_tps, pct_of_floor=100 * dec_us / floor_tps)
        if eager:
            (t_eg, tok_eg), p_eg = full[2], prefill[2][0]
            row.update(decode_tok_s_dsv3_eager=B * (N - 1) / max(t_eg - p_eg, 1e-9),
                       same_tokens_eager=bool(torch.equal(tok_eg, tok_us)), cuda_graphs=llm.stats["cuda_graphs"])
        rows.append(row)
        print(f"\n{case}: batch {B}, prompt {T}, {N} new tokens, identical tokens: {row['same_tokens']}")
        print(f"  {'':14}{'dsv3':>10}{'transformers':>14}{'ratio':>8}")
        print(f"  {'decode tok/s':14}{dec_us:10.1f}{dec_hf:14.1f}{dec_us / dec_hf:8.2f}")
        print(f"  {'end-to-end':14}{B * N / t_us:10.1f}{B * N / t_hf:14.1f}{t_hf / t_us:8.2f}")
        print(f"  {'prefill s':14}{p_us:10.3f}{p_hf:14.3f}{p_hf / p_us:8.2f}")
        if eager:
            print(f"  dsv3 eager (no CUDA graphs): {row['decode_tok_s_dsv3_eager']:.1f} decode tok/s; graphs "
                  f"{dec_us / row['decode_tok_s_dsv3_eager']:.2f}x ({row['cuda_graphs']} captured), identical "
                  f"tokens: {row['same_tokens_eager']}")
        print(f"  bandwidth floor: {floor_tps:.0f} tok/s ({step_bytes(cfg, B, T + N // 2, elem) / 1e6:.0f} MB per step); "
              f"dsv3 decode at {row['pct_of_floor']:.0f}% of it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, cache_bytes_per_token=dict(dsv3=llm.kv_cache_bytes_per_token, hf=hf_bpt),
                           rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
