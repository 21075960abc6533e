"""A training step (forward, next-token loss, backward) of one model in each precision `dsv3 train` offers, on
this CPU, step-interleaved: FP32; BF16 autocast with the native BF16 kernels; BF16 autocast with its matrix
products taken as FP32 kernels (dsv3.quant.bf16.fp32_products, what the Trainer uses where BF16 is slower);
FP8 (dsv3.quant.training, the references) with the BF16 parts as the Trainer runs them. The same weights and
batch for all; every round runs each variant once, in turn, and the median over rounds is reported, so a
shared machine's drift hits all alike. Also the largest difference of the emulated BF16 step's loss and
gradients from the native one's (the same numbers up to FP32 summation order).

    python benchmarks/bench_precision_cpu.py [--preset tiny] [--shape 16x256] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.config import ModelConfig  # noqa: E402
from dsv3.model.model import DeepSeekV3, init_weights  # noqa: E402
from dsv3.quant.bf16 import fp32_products  # noqa: E402
from dsv3.quant.training import convert_to_fp8_training  # noqa: E402
from common import print_machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--shape", default="16x256", help="sequences x tokens (default 16x256, a tiny micro-batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-native-bf16", action="store_true", help="leave out BF16 with native kernels (slow "
                    "on AVX2: ~20x an FP32 step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine("cpu")
    batch, seq = (int(v) for v in args.shape.split("x"))
    cfg = ModelConfig.preset(args.preset)
    model = DeepSeekV3(cfg)
    init_weights(model, generator=torch.Generator().manual_seed(0))
    fp8_model = copy.deepcopy(model)
    convert_to_fp8_training(fp8_model)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def step(m, bf16: bool, products) -> tuple[float, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        with products:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, _ = m.forward_with_mtp(tokens[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
        return loss.item(), [p.grad for p in m.parameters() if p.grad is not None]

    variants = {"fp32": (model, False, contextlib.nullcontext), "bf16 (FP32 products)": (model, True, fp32_products),
                "fp8 (references; BF16 parts with FP32 products)": (fp8_model, True, fp32_products)}
    if not args.skip_native_bf16:
        variants["bf16 (native kernels)"] = (model, True, contextlib.nullcontext)
    times = {name: [] for name in variants}
    for name, (m, bf16, products) in variants.items():  # warm-up
        step(m, bf16, products())
    for _ in range(args.rounds):
        for name, (m, bf16, products) in variants.items():
            t = time.perf_counter()
            step(m, bf16, products())
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["fp32"])
    print(f"\n{args.preset}, {batch}x{seq} tokens, forward + backward, median of {args.rounds} interleaved rounds")
    print(f"{'variant':<50} {'s/step':>8} {'x fp32':>8}   all rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<50} {med:8.3f} {med / base:8.2f}   " + " ".join(f"{t:.2f}" for t in ts))
    if not args.skip_native_bf16:
        ln, gn = step(model, True, contextlib.nullcontext())
        le, ge = step(model, True, fp32_products())
        worst = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ge, gn))
        print(f"\nBF16 step, FP32 products vs native kernels: loss {le:.6f} vs {ln:.6f}; largest relative "
              f"difference of a parameter's gradient {worst:.2e}")


if __name__ == "__main__":
    main()
