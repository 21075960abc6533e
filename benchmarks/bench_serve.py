"""Serving throughput: N concurrent clients against `dsv3 serve` (continuous batching) versus the same requests
served one at a time, on the bench-small preset (random weights, a BPE tokenizer trained on the Python
standard library's sources), CPU fp32.

The server runs in a subprocess (`python -m dsv3 serve`), the clients here (asyncio + httpx, streaming
/v1/completions with usage in the last chunk). Every level sends the same requests: distinct prompts from the
standard library's sources, greedy, `ignore_eos` so that every request produces exactly --max-tokens tokens.
For each level: output tokens/s over the wall time of the whole level, per-request latency and time to first
token (the first chunk after the prefill), p50 and p99. One client = one request at a time. Afterwards, with the
server stopped, the engine alone (`LLM.generate` over all requests at once, no HTTP) gives the ceiling the
server can approach.

Like for like: the server keeps its prefix cache on (as users run it), but each level sends its requests under
its own `cache_salt`, so no level is served prompts an earlier level (or the warm-up) left in the cache; the
engine alone gets a fresh engine, warmed up on other prompts. The prompt tokens served from a cache are
counted (usage.prompt_tokens_details.cached_tokens) and printed: 0 everywhere. The server and the engine
alone run with the same torch thread count. The first line printed names the machine.

    python benchmarks/bench_serve.py [--clients 1,4,16] [--requests 32] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

import httpx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.infer import LLM, SamplingParams  # noqa: E402
from dsv3.tokenizer import train_bpe  # noqa: E402
from common import print_machine  # noqa: E402

MODEL = "bench-small"


def stdlib_texts(max_bytes: int) -> list[str]:
    """Python sources from the standard library, in a fixed order, up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(".py") and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            total += len(texts[-1])
            if total >= max_bytes:
                break
    return texts


def build_model(path: str) -> list[str]:
    """bench-small with random weights and a trained tokenizer, saved in fp32 -> the texts prompts come from."""
    texts = stdlib_texts(4 << 20)
    tok = train_bpe(texts, vocab_size=4096)
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("bench-small"))
    dsv3.init_weights(model, std=0.02)
    dsv3.save_pretrained(model, path, dtype=torch.float32, tokenizer=tok)
    return texts


def make_prompts(texts: list[str], n: int, prompt_chars: int) -> list[str]:
    """n distinct prompts: slices of the sources, prompt_chars long."""
    joined = "\n".join(texts)
    step = max(1, (len(joined) - prompt_chars) // n)
    return [joined[i * step: i * step + prompt_chars] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, salt: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "cache_salt": salt}
    t0 = time.perf_counter()
    ttft, tokens, cached = None, 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "cached": cached}


async def run_level(url: str, prompts: list[str], clients: int, max_tokens: int, salt: str) -> dict:
    """`clients` workers take the requests in order, each sending its next one when the last is answered; all
    under one cache_salt, the level's own, so the prefix cache holds nothing of theirs when the level starts."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        async def worker():
            while not queue.empty():
                results.append(await one_request(client, queue.get_nowait(), max_tokens, salt))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    assert tokens == len(prompts) * max_tokens, (tokens, len(prompts), max_tokens)

    def pct(key, q):
        xs = sorted(r[key] for r in results)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"clients": clients, "requests": len(prompts), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "cached_prompt_tokens": sum(r["cached"] for r in results),
            "latency_p50": pct("latency", 0.5), "latency_p99": pct("latency", 0.99),
            "ttft_p50": pct("ttft", 0.5), "ttft_p99": pct("ttft", 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels (1 = one request at a time)")
    ap.add_argument("--requests", type=int, default=32, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    ap.add_argument("--prompt-chars", type=int, default=300, help="prompt length in characters (~100 tokens)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="the server's --max-batch-size")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the server and of the engine-alone run (default: `dsv3 serve`'s, all "
                         "cores but one; 1 is steady on a shared 2-core VM and leaves a core to the event loop and "
                         "the clients)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    env = dict(os.environ)
    args.threads = args.threads or max(1, (os.cpu_count() or 2) - 1)  # the server's default, given to both
    torch.set_num_threads(args.threads)
    env["OMP_NUM_THREADS"] = str(args.threads)
    args.machine = print_machine()
    levels = [int(c) for c in args.clients.split(",")]

    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    try:
        run(args, env, levels, os.path.join(tmp, MODEL))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, env: dict, levels: list[int], model_dir: str) -> None:
    texts = build_model(model_dir)
    prompts = make_prompts(texts, args.requests, args.prompt_chars)
    cfg = dsv3.ModelConfig.from_hf(model_dir)
    print(f"bench-small ({cfg.num_params() / 1e6:.1f}M parameters), fp32, CPU, {os.cpu_count()} cores, "
          f"{args.threads} torch threads (server and engine alone), torch {torch.__version__}; {args.requests} "
          f"requests per level, ~{args.prompt_chars} characters of prompt, {args.max_tokens} tokens out each; "
          f"server --max-batch-size {args.max_batch_size}, prefix cache on, one cache_salt per level", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", model_dir, "--port", str(port),
                               "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024",
                               "--max-model-len", "1024", "--log-level", "warning", "--threads", str(args.threads)],
                              env=env)
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        asyncio.run(run_level(url, prompts[:4], 4, 4, "warm-up"))
        for c in levels:
            row = asyncio.run(run_level(url, prompts, c, args.max_tokens, f"level-{c}-clients"))
            rows.append(row)
            print(f"  {c:>2} clients: {row['tok_s']:7.1f} tok/s  ({row['wall_s']:.1f}s; "
                  f"{row['cached_prompt_tokens']} prompt tokens from the prefix cache)", flush=True)
    finally:
        server.terminate()
        server.wait(60)

    # the engine alone, all requests submitted at once: what the server could reach without HTTP
    llm = LLM(model_dir, max_model_len=1024, max_num_seqs=args.max_batch_size)
    params = SamplingParams(temperature=0, max_new_tokens=args.max_tokens, ignore_eos=True)
    warm = [p[len(p) // 2:] + p[:len(p) // 2] for p in prompts[:4]]  # rotated: none begins as a timed prompt
    llm.generate(warm, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    engine_s = time.perf_counter() - t0
    engine_tok_s = sum(len(o.token_ids) for o in outs) / engine_s
    engine_cached = sum(o.num_cached_tokens for o in outs)

    base = next((r["tok_s"] for r in rows if r["clients"] == 1), rows[0]["tok_s"])
    print("\n| clients | output tok/s | vs one at a time | latency p50 / p99 s | TTFT p50 / p99 s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {r['latency_p50']:.2f} / "
              f"{r['latency_p99']:.2f} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} |")
    print(f"| engine alone, no HTTP (LLM.generate, batch {args.max_batch_size}) | {engine_tok_s:.1f} | "
          f"{engine_tok_s / base:.2f}x | | |")
    print(f"prompt tokens served from the prefix cache: {', '.join(str(r['cached_prompt_tokens']) for r in rows)} "
          f"(levels), {engine_cached} (engine alone)")
    top = max(rows, key=lambda r: r["clients"])
    print(f"\n{top['clients']} concurrent clients: {top['tok_s'] / base:.2f}x the output tokens/s of one at a time; "
          f"the server reaches {100 * top['tok_s'] / engine_tok_s:.0f}% of the engine's own batched throughput")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": args.machine, "rows": rows, "engine_tok_s": engine_tok_s,
                       "engine_cached_prompt_tokens": engine_cached,
                       "args": {k: v for k, v in vars(args).items() if k != "machine"}}, f, indent=2)


if __name__ == "__main__":
    main()
