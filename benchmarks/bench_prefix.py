"""Prefix caching on a multi-turn chat: dsv3's engine with the prefix cache on and off, against transformers'
`generate` recomputing the conversation every turn and reusing its own cache across turns (its documented way
to continue a chat: the previous turn's `past_key_values` passed back in). bench-small, same weights, same
conversations, same process; greedy, so every engine must give the same replies.

A conversation: a system prompt, then `--turns` turns, each adding `--user` new prompt tokens and a `--reply`
token greedy reply; turn t's prompt is turn t-1's prompt, its reply, and the new message. Reported per engine:
the whole conversation's time, the mean time to first token of the turns after the first (where reuse can
help), and the share of prompt tokens the engine computed. Each repeat uses a fresh conversation (a cache warm
from the last repeat would make the first turn free too); the engines run in turns within a repeat.

This benchmark compares caches on purpose, so every row and every ratio says what each side reuses: dsv3 with
its prefix cache on or off, transformers passing the previous turn's KV cache back in or recomputing the
whole conversation. The like-for-like ratios are the pairs that reuse the same thing (both nothing, both the
conversation so far); the others show what reuse is worth. The first line printed names the machine.

    python benchmarks/bench_prefix.py [--system 512] [--turns 6] [--user 64] [--reply 32] [--repeats 3]
                                      [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.infer import LLM, SamplingParams  # noqa: E402
from common import bench_small_checkpoint, print_machine  # noqa: E402

ON, OFF = "dsv3, prefix cache on", "dsv3, prefix cache off"
HF_REUSE, HF_RECOMPUTE = "transformers, KV cache passed back", "transformers, recomputes all"
COMPARISONS = [  # (ours, peer, what the pair compares)
    (OFF, HF_RECOMPUTE, "like for like: neither reuses the conversation"),
    (ON, HF_REUSE, "like for like: both reuse the conversation so far"),
    (ON, OFF, "dsv3's prefix cache, on against off"),
    (HF_REUSE, HF_RECOMPUTE, "transformers' cache passed back, against recomputing"),
    (ON, HF_RECOMPUTE, "not like for like: only dsv3 reuses"),
]


def conversation(vocab: int, args, seed: int) -> tuple[list[int], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(0, vocab, (args.system,), generator=g).tolist()
    return system, [torch.randint(0, vocab, (args.user,), generator=g).tolist() for _ in range(args.turns)]


def run_dsv3(llm: LLM, system, messages, reply: int):
    """-> (replies, seconds in all, time to first token per turn, prompt tokens computed)."""
    params = SamplingParams(temperature=0, max_new_tokens=reply, ignore_eos=True)
    history, replies, ttft = list(system), [], []
    hit0 = llm.stats["prefix_cache_hit_tokens"]
    computed = 0
    t0 = time.perf_counter()
    for msg in messages:
        prompt = history + msg
        t = time.perf_counter()
        rid = llm.add_request(prompt, params)
        finished = False
        while not finished:
            mine = [o for o in llm.step() if o.request_id == rid]
            if mine and len(ttft) < len(replies) + 1:  # its first output: the first token
                ttft.append(time.perf_counter() - t)
            finished = any(o.finished for o in mine)
        out = llm.release(rid)
        computed += len(prompt)
        replies.append(out.token_ids)
        history = prompt + out.token_ids
    total = time.perf_counter() - t0
    return replies, total, ttft, computed - (llm.stats["prefix_cache_hit_tokens"] - hit0)


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives (the first put is the prompt)."""

    def __init__(self):
        self.puts, self.t = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.t = time.perf_counter()

    def end(self):
        pass


@torch.no_grad()
def run_hf(hf, system, messages, reply: int, reuse: bool):
    history, replies, ttft = list(system), [], []
    cache, computed = None, 0
    t0 = time.perf_counter()
    for msg in messages:
        prompt = history + msg
        ids = torch.tensor([prompt])
        streamer = _FirstToken()
        computed += len(prompt) - (cache.get_seq_length() if cache is not None else 0)  # generate grows the cache
        t = time.perf_counter()
        kw = dict(past_key_values=cache, return_dict_in_generate=True) if reuse else {}
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=reply, do_sample=False,
                          eos_token_id=None, pad_token_id=0, streamer=streamer, **kw)
        seq = out.sequences if reuse else out
        ttft.append(streamer.t - t)
        if reuse:
            cache = out.past_key_values
        toks = seq[0, len(prompt):].tolist()
        replies.append(toks)
        history = prompt + toks
    return replies, time.perf_counter() - t0, ttft, computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", type=int, default=512, help="system prompt tokens (default 512)")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--user", type=int, default=64, help="new prompt tokens per turn (default 64)")
    ap.add_argument("--reply", type=int, default=32, help="reply tokens per turn (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine()
    import transformers
    logging.getLogger("transformers").setLevel(logging.ERROR)

    cfg, tmp = bench_small_checkpoint("bench_prefix_")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    length = args.system + args.turns * (args.user + args.reply)
    kw = dict(max_num_seqs=1, kv_cache_tokens=4 * length, block_size=16)
    on, off = LLM(tmp, **kw), LLM(tmp, enable_prefix_caching=False, **kw)
    print(f"bench-small, fp32 on cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; a conversation: system {args.system}, {args.turns} turns of {args.user} "
          f"new tokens and a {args.reply}-token reply ({length} tokens at the end); block size 16")

    engines = {ON: lambda s, m: run_dsv3(on, s, m, args.reply),
               OFF: lambda s, m: run_dsv3(off, s, m, args.reply),
               HF_REUSE: lambda s, m: run_hf(hf, s, m, args.reply, reuse=True),
               HF_RECOMPUTE: lambda s, m: run_hf(hf, s, m, args.reply, reuse=False)}
    warm = conversation(cfg.vocab_size, copy.copy(args), seed=999)
    for fn in engines.values():
        fn(*warm)
    results = {name: [] for name in engines}
    for r in range(args.repeats):
        system, messages = conversation(cfg.vocab_size, args, seed=r)
        replies = {}
        for name, fn in engines.items():
            out = fn(system, messages)
            replies[name] = out[0]
            results[name].append(out)
        same = all(rep == replies[ON] for rep in replies.values())
        print(f"repeat {r}: replies identical across engines: {same}")

    total_prompt = sum(args.system + t * (args.user + args.reply) + args.user for t in range(args.turns))
    print(f"\n{'':36}{'conversation s':>16}{'TTFT ms (turns 2+)':>20}{'prompt computed':>17}")
    rows = {}
    for name, runs in results.items():
        total = statistics.median(r[1] for r in runs)
        ttft = statistics.median(statistics.mean(r[2][1:]) for r in runs)
        computed = runs[-1][3]
        rows[name] = dict(conversation_s=total, ttft_s=ttft, prompt_computed=computed / total_prompt)
        print(f"{name:36}{total:16.3f}{1000 * ttft:20.1f}{computed / total_prompt:16.0%}")
    print("\nspeed-ups (the second's time over the first's):")
    ratios = []
    for a, b, what in COMPARISONS:
        conv, ttft = rows[b]["conversation_s"] / rows[a]["conversation_s"], rows[b]["ttft_s"] / rows[a]["ttft_s"]
        ratios.append(dict(engine=a, peer=b, compares=what, conversation=conv, ttft=ttft))
        print(f"  {a} vs {b} ({what}): conversation {conv:.2f}x, time to first token {ttft:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, args=vars(args), rows=rows, ratios=ratios), f, indent=2)


if __name__ == "__main__":
    main()
