"""The CPU kernels' gain, measured step-interleaved: one engine decodes while the set of kernels it uses is
switched before every forward (the calibrated choice, the plain reference, each routed-experts path forced),
so adjacent steps of every variant share the machine's state of the moment (a shared VM's speed drifts by a
third from one minute to the next; a whole run per variant cannot be compared). Prints the median forward time
of each variant per number of fed rows, and each one's ratio to the reference. Greedy tokens are not checked
here: tests/test_cpu_kernels.py holds every variant to the reference's tokens.

    python benchmarks/bench_kernels.py [--model DIR] [--batch 1] [--new-tokens 128] [--rounds 2]

Without --model: bench-small in float32 (the weights bench_decode.py uses).
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
from dsv3.infer import cpu_kernels as ck  # noqa: E402
from common import bench_small_checkpoint, print_machine  # noqa: E402


def kernel_slots(model) -> list:
    """Every object an engine installs a CPU kernel on (Linear, Experts, packed weights)."""
    out = []
    for m in model.modules():
        if hasattr(m, "kernel"):
            out.append(m)
        for name in ("w13", "wqkv_a"):
            packed = getattr(m, name, None)
            if packed is not None and hasattr(packed, "kernel"):
                out.append(packed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: bench-small, float32)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="times the 8 prompts are decoded")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine()
    path = args.model or bench_small_checkpoint("bench_kernels")[1]
    llm = LLM(path, dtype=torch.float32, max_num_seqs=max(8, args.batch), kv_cache_tokens=8 * 4096)
    if llm.kernels is None:
        sys.exit("this engine installed no CPU kernels (not a float32 CPU model)")
    slots = kernel_slots(llm.model)
    calibrated = [(s, s.kernel) for s in slots]
    variants = {"calibrated": calibrated, "reference": [(s, None) for s in slots]}
    for path_name in ("dense", "loop", "grouped"):
        variants[f"experts {path_name}"] = [
            (s, ck.ExpertsKernel({b: path_name for b in ck.EXPERT_TOKEN_BUCKETS}, k.matmul)
             if isinstance(k, ck.ExpertsKernel) else k) for s, k in calibrated]
    names = list(variants)
    times: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    forward, turn = llm.runner.forward, [0]

    def interleaved(batch):
        name = names[turn[0] % len(names)]
        turn[0] += 1
        for slot, kernel in variants[name]:
            slot.kernel = kernel
        t = time.perf_counter()
        h = forward(batch)
        times[name].setdefault(batch.input_ids.numel(), []).append(time.perf_counter() - t)
        return h

    llm.runner.forward = interleaved
    vocab = llm.config.vocab_size
    prompts = [torch.randint(2, vocab, (16,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(args.rounds):
        for i in range(0, len(prompts), args.batch):
            llm.generate(prompts[i:i + args.batch], params, use_tqdm=False)
    llm.runner.forward = forward
    for slot, kernel in calibrated:
        slot.kernel = kernel
    print(f"{path}: batch {args.batch}, median forward time per variant (step-interleaved), ratio to the reference")
    for rows in sorted({r for v in times.values() for r in v}):
        ref = times["reference"].get(rows, [])
        if len(ref) < 5:
            continue  # (prefill steps: too few to compare)
        ref_ms = statistics.median(ref) * 1e3
        cells = [f"{n} {statistics.median(times[n][rows]) * 1e3:.3f} ms ({ref_ms / (statistics.median(times[n][rows]) * 1e3):.2f}x)"
                 for n in names if len(times[n].get(rows, [])) >= 5]
        print(f"  {rows} fed rows: " + "; ".join(cells))


if __name__ == "__main__":
    main()
