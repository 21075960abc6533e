"""A long prompt's prefill: time and peak memory of dsv3's engine with chunked prefill (its default), the same
engine taking the prompt in one step, and transformers' `generate` (one new token), on bench-small's weights
with the context raised to fit. Each runs in its own process, so that its peak resident memory is its own
(the peak is reset after the model is loaded and warmed up, and read from /proc/self/status: Linux only).

Then the stall: a request already decoding when the long prompt arrives. Its longest gap between two tokens
while the prompt is prefilled, with chunks (decodes share each step with a chunk) and with the prompt in one
step (every decode waits for the whole prefill). transformers has no continuous batching to compare with.

Like for like: dsv3 runs with its prefix cache off (transformers has none; the warm-up's 64 tokens are the
prompt's own first ones, which a cache would otherwise serve). The first line printed names the machine.

    python benchmarks/bench_long_prefill.py [--tokens 16384] [--chunk 2048] [--skip-stall] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from common import bench_small_checkpoint, print_machine  # noqa: E402


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args) -> None:
    torch.manual_seed(0)
    prompt = torch.randint(0, 4096, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    warm = prompt[:64]
    if args.worker == "transformers":
        import transformers
        logging.getLogger("transformers").setLevel(logging.ERROR)
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

        def run(ids):
            x = torch.tensor([ids])
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            return int(out[0, -1])
    else:
        from dsv3.infer import LLM, SamplingParams
        budget = args.chunk if args.worker == "dsv3-chunked" else args.tokens
        llm = LLM(args.model, max_num_seqs=1, kv_cache_tokens=args.tokens + 128, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)
        params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)

        def run(ids):
            return llm.generate([ids], params)[0].token_ids[0]
    run(warm)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    before = rss_mb("VmRSS")
    t = time.perf_counter()
    token = run(prompt)
    seconds = time.perf_counter() - t
    print(json.dumps(dict(seconds=seconds, peak_growth_mb=rss_mb("VmHWM") - before, token=token)))


def stall(model_dir: str, tokens: int, budget: int) -> tuple[float, float, int]:
    """-> (the decoding request's longest gap between tokens in seconds, the long prompt's time to its first
    token, steps the prefill took) with max_num_batched_tokens = budget."""
    from dsv3.infer import LLM, SamplingParams
    llm = LLM(model_dir, max_num_seqs=2, kv_cache_tokens=tokens + 1024, max_num_batched_tokens=budget,
              enable_prefix_caching=False)
    g = torch.Generator().manual_seed(2)
    short = torch.randint(0, 4096, (32,), generator=g).tolist()
    long = torch.randint(0, 4096, (tokens,), generator=g).tolist()
    decoding = llm.add_request(short, SamplingParams(temperature=0, max_new_tokens=10 ** 6, ignore_eos=True))
    for _ in range(3):
        llm.step()
    t0 = last = time.perf_counter()
    arrived = llm.add_request(long, SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    gap, steps = 0.0, 0
    while True:
        outs = llm.step()
        steps += 1
        now = time.perf_counter()
        if any(o.request_id == decoding for o in outs):
            gap, last = max(gap, now - last), now
        if any(o.request_id == arrived for o in outs):
            return max(gap, now - last), now - t0, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="prompt length (default 16384)")
    ap.add_argument("--chunk", type=int, default=2048,
                    help="dsv3's max_num_batched_tokens (default 2048, the CPU default)")
    ap.add_argument("--skip-stall", action="store_true", help="skip the decoding-stall measurement")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    machine = print_machine()
    context = max(dsv3.ModelConfig.preset("bench-small").max_position_embeddings, args.tokens + 64)
    cfg, tmp = bench_small_checkpoint("bench_long_prefill_", max_position_embeddings=context)
    print(f"bench-small with a {cfg.max_position_embeddings}-position context, fp32 on CPU, "
          f"{torch.get_num_threads()} threads; one prompt of {args.tokens} tokens, one new token; dsv3's prefix "
          "cache off (transformers has none)")
    results = {}
    for name in ("dsv3-chunked", "dsv3-whole", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--model", tmp, "--tokens",
                              str(args.tokens), "--chunk", str(args.chunk)], capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    label = {"dsv3-chunked": f"dsv3, chunks of {args.chunk}", "dsv3-whole": "dsv3, one step",
             "transformers": "transformers generate"}
    print(f"\n{'':26}{'seconds':>10}{'peak memory growth MB':>24}{'next token':>12}")
    for name, r in results.items():
        print(f"{label[name]:26}{r['seconds']:10.2f}{r['peak_growth_mb']:24.0f}{r['token']:12d}")
    if "dsv3-chunked" in results and "transformers" in results:
        a, b = results["dsv3-chunked"], results["transformers"]
        print(f"dsv3 chunked vs transformers: {b['seconds'] / a['seconds']:.2f}x faster, "
              f"{b['peak_growth_mb'] / max(a['peak_growth_mb'], 1):.1f}x less peak memory")
    stalls = {}
    if not args.skip_stall:
        print(f"\na request decoding when the {args.tokens}-token prompt arrives (dsv3, prefix cache off):")
        print(f"{'':26}{'longest token gap s':>21}{'prompt TTFT s':>15}{'steps':>7}")
        for label_, budget in ((f"chunks of {args.chunk}", args.chunk), ("one step", args.tokens)):
            g, ttft, steps = stall(tmp, args.tokens, budget)
            stalls[label_] = dict(longest_gap_s=g, ttft_s=ttft, steps=steps)
            print(f"{label_:26}{g:21.2f}{ttft:15.2f}{steps:7d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, tokens=args.tokens, chunk=args.chunk, prefill=results, stall=stalls), f,
                      indent=2)


if __name__ == "__main__":
    main()
