"""MTP speculative decoding on any model directory with an MTP module: tokens/s with and without it, the
draft acceptance rate, tokens per main-model forward, and whether the greedy outputs are identical.

    python benchmarks/bench_mtp.py --model runs/tiny [--prompts FILE] [--batch 1] [--new-tokens 128] [--repeats 5]

The two engines run alternately, --repeats times each, on the same prompts; the speedup is the ratio of the
median times, printed beside the ratio of the best times and the median of the per-pair ratios (each plain run
against the MTP run right after it): this VM has slow spells that a single pair of runs can straddle.

Prompts: one per line from --prompts, else code-like openings (the built-in corpus is Python source).
A random model's MTP module guesses at chance, so run this on a trained one (`dsv3 train` writes one).

The MTP engine drafts only while drafting pays (--policy adaptive, the engine's default; speculative.py's
DraftPolicy): the report gives the share of decode steps that drafted and the policy's estimates per batch
size. --policy always drafts every step. Sampled requests carry no seed unless --seed is given: under the
adaptive policy a seeded sampled request decodes plainly (its seed fixes its tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.infer import LLM, SamplingParams  # noqa: E402
from common import print_machine  # noqa: E402

DEFAULT_PROMPTS = ["def ", "import os\n", "class ", "    def __init__(self", "# ", "for i in range(",
                   "if __name__ == '__main__':\n", "return "]


def run(llm: LLM, prompts: list, params: SamplingParams) -> tuple[float, list]:
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=2))  # warm up
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default=None, help="a file with one prompt per line")
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--topk", type=int, default=None,
                    help="MTP guesses a greedy step verifies at once (LLM's speculative_topk; default: adaptive)")
    ap.add_argument("--num-tokens", type=int, default=1,
                    help="positions the MTP module drafts per step (LLM's num_speculative_tokens; default 1)")
    ap.add_argument("--policy", default="adaptive", choices=["adaptive", "always"],
                    help="when the MTP engine drafts (LLM's speculative_policy; default adaptive)")
    ap.add_argument("--seed", type=int, default=None, help="a seed for every request (sampled ones then decode "
                    "plainly under the adaptive policy)")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each engine (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = DEFAULT_PROMPTS
    prompts = (prompts * args.num_prompts)[: args.num_prompts]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens, ignore_eos=True,
                            seed=args.seed)
    if args.threads:  # before the engines start: the CPU kernels are chosen for the thread count
        torch.set_num_threads(args.threads)
    print_machine(args.device)
    plain = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.batch)
    spec = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.batch, speculative="mtp",
               speculative_topk=args.topk, num_speculative_tokens=args.num_tokens, speculative_policy=args.policy)
    times_plain, times_spec = [], []
    for _ in range(args.repeats):
        t, out_plain = run(plain, prompts, params)
        times_plain.append(t)
        t, out_spec = run(spec, prompts, params)
        times_spec.append(t)
    t_plain, t_spec = statistics.median(times_plain), statistics.median(times_spec)
    n_plain = sum(len(o.token_ids) for o in out_plain)
    n_spec = sum(len(o.token_ids) for o in out_spec)
    st = spec.stats
    same = [a.token_ids for a in out_plain] == [b.token_ids for b in out_spec]
    print(f"model {args.model}: {len(prompts)} prompts, batch {args.batch}, {args.new_tokens} new tokens, "
          f"temperature {args.temperature}, {torch.get_num_threads()} threads")
    best = min(times_plain) / min(times_spec) * n_spec / n_plain
    # each plain run and the MTP run right after it share the machine's state of the moment
    paired = statistics.median(p / s for p, s in zip(times_plain, times_spec)) * n_spec / n_plain
    print(f"  plain        {n_plain / t_plain:8.1f} tokens/s (median of {args.repeats}; "
          f"best {n_plain / min(times_plain):.1f})")
    print(f"  MTP          {n_spec / t_spec:8.1f} tokens/s (best {n_spec / min(times_spec):.1f})   "
          f"speedup {t_plain / t_spec * n_spec / n_plain:.2f}x (medians), {best:.2f}x (best times), "
          f"{paired:.2f}x (median of the {args.repeats} back-to-back pairs)")
    if args.num_tokens == 1:
        where = ", ".join(f"{n / max(st['drafted'], 1):.1%} at rank {r + 1}"
                          for r, n in enumerate(st["accepted_by_rank"]))
    else:  # a chain: how far into it the kept drafts reach
        steps = max(st["verify_forwards"], 1)
        where = ", ".join(f"{n / steps:.1%} of steps keep draft {d + 1}" for d, n in enumerate(st["accepted_by_depth"]))
    print(f"  acceptance   {st['acceptance_rate']:.1%} of {st['drafted']} drafted positions (all runs; {where}); "
          f"{st['tokens_per_forward']:.2f} tokens per main-model forward")
    policy = st["draft_policy"]
    buckets = "; ".join(f"batch <= {b}: plain step {c['plain_ms']} ms, drafting step {c['drafting_ms']} ms"
                        + (f" (ratio {c['ratio']:.2f}), expected {c['gain']:.2f}x" if c["gain"] is not None else "")
                        for b, c in policy["buckets"].items())
    print(f"  policy       {policy['policy']}: {policy['drafting_fraction']:.0%} of {policy['decode_steps']} decode "
          f"steps drafted (all runs); {buckets}")
    if args.temperature == 0:
        print(f"  greedy outputs identical: {same}")


if __name__ == "__main__":
    main()
