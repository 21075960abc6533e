"""One training step (forward, next-token loss, backward, AdamW) on bench-small: dsv3 against transformers'
DeepseekV3ForCausalLM, same weights (saved once, loaded by both), same batches, same process; fp32 on CPU by
default, any device and dtype by flag. MTP and balance losses are off so both compute the same thing. Also
the model FLOPs utilisation (MFU) against the device's measured matmul peak in the dtype the GEMMs run in.
The first line names the machine (CPU model and ISA flags, threads, torch and its BLAS, the GPU); --json
stores it too.

Both models get the same optimizer and the same process settings: torch's fused AdamW by default (what
transformers' Trainer and `dsv3 train` both use; --optimizer foreach for the other kernel), and the C
library's malloc as a plain script has it; --malloc retain has it keep freed memory instead, for both
models (dsv3.train.cpu, what `dsv3 train` sets on a CPU: no page faults on each step's fresh tensors).

    python benchmarks/bench_train.py [--shapes 8x256,4x512] [--steps 5] [--threads N] [--json out.json]
    python benchmarks/bench_train.py --autocast bf16                                      # bf16 autocast, both
    python benchmarks/bench_train.py --device cuda --dtype bfloat16 --shapes 16x1024     # on a GPU
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
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.train.cpu import retain_freed_memory  # noqa: E402
from dsv3.train.optim import torch_adamw  # noqa: E402
from common import bench_small_checkpoint, print_machine  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """The best of `repeats` n^3 products (fewer where one takes seconds: bf16 on a CPU without bf16 units)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = [_time(lambda: a @ b, device)]  # warm-up, and a measure of how long one takes
    times += [_time(lambda: a @ b, device) for _ in range(repeats if times[0] < 0.5 else 1)]
    return 2 * n ** 3 / min(times[1:])


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def step_flops(cfg: dsv3.ModelConfig, batch: int, seq: int) -> float:
    """6 x (matmul parameters a token uses) x tokens, plus attention's score and value products
    (2 * 2 * (qk + v) * heads per causal query-key pair per layer, x3 for forward and backward)."""
    per_token = cfg.num_active_params()  # excludes the embedding lookup, includes the head
    attn_pairs = batch * seq * (seq + 1) / 2
    attn = 2 * 2 * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_attention_heads * attn_pairs * cfg.num_hidden_layers
    return 6 * per_token * batch * seq + 3 * attn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x256,4x512")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    ap.add_argument("--dtype", default="float32", help="the weights' dtype: float32 (default), bfloat16")
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off",
                    help="bf16: both forwards under torch.autocast (weights stay in --dtype)")
    ap.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                    help="torch AdamW kernel, the same for both models (default fused)")
    ap.add_argument("--malloc", choices=["default", "retain"], default="default",
                    help="CPU: default = the C library's malloc; retain = it keeps freed memory (the whole process)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = device.type == "cpu" and args.malloc == "retain" and retain_freed_memory()
    machine = print_machine(device)
    gemm_dtype = torch.bfloat16 if args.autocast == "bf16" else dtype
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    import transformers
    logging.getLogger("transformers").setLevel(logging.ERROR)

    cfg, d = bench_small_checkpoint("bench_train_", num_nextn_predict_layers=0)
    peak = matmul_peak(device, gemm_dtype)
    print(f"bench-small without MTP ({cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_active_params() / 1e6:.1f}M "
          f"active), {args.dtype} on {device}" + (", bf16 autocast" if args.autocast == "bf16" else "") +
          f", {torch.get_num_threads()} CPU threads, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"measured {str(gemm_dtype).removeprefix('torch.')} matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"both models: AdamW {args.optimizer}; malloc " + ("keeps freed memory" if retained else "as the C library does"))
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device) for _ in range(args.steps + 2)]
        ours = dsv3.load_pretrained(d, dtype=dtype, device=device).train()
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).train()
        opt_kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        if args.optimizer == "fused":
            opt_ours, opt_hf = torch_adamw(ours.parameters(), **opt_kw), torch_adamw(hf.parameters(), **opt_kw)
        else:
            opt_ours = torch.optim.AdamW(ours.parameters(), foreach=True, **opt_kw)
            opt_hf = torch.optim.AdamW(hf.parameters(), foreach=True, **opt_kw)

        def step_ours(b):
            with autocast:
                logits = ours(b[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
            return loss.item()

        def step_hf(b):
            with autocast:
                logits = hf(b[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten())
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)
            return loss.item()

        t_ours, t_hf, l_ours, l_hf = [], [], [], []
        for i, b in enumerate(batches):  # alternate, so that slow spells of the machine hit both
            t = time.perf_counter()
            l_ours.append(step_ours(b))
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            l_hf.append(step_hf(b))
            t_hf.append(time.perf_counter() - t)
        t_ours, t_hf = t_ours[2:], t_hf[2:]  # two warm-up steps
        fl = step_flops(cfg, B, T)
        row = dict(shape=shape, tokens=B * T, dsv3_s=statistics.median(t_ours), hf_s=statistics.median(t_hf),
                   dsv3_best_s=min(t_ours), hf_best_s=min(t_hf), gflop=fl / 1e9,
                   max_loss_diff=max(abs(a - b) for a, b in zip(l_ours, l_hf)))
        row["ratio"] = row["hf_s"] / row["dsv3_s"]
        row["mfu_dsv3"] = fl / row["dsv3_s"] / peak
        row["mfu_hf"] = fl / row["hf_s"] / peak
        rows.append(row)
        print(f"\n{shape} ({B * T} tokens per step, {fl / 1e9:.1f} GFLOP): losses agree to {row['max_loss_diff']:.1e}")
        print(f"  {'':18}{'dsv3':>10}{'transformers':>14}")
        print(f"  {'step s (median)':18}{row['dsv3_s']:10.3f}{row['hf_s']:14.3f}   ratio {row['ratio']:.2f}")
        print(f"  {'step s (best)':18}{row['dsv3_best_s']:10.3f}{row['hf_best_s']:14.3f}   "
              f"ratio {row['hf_best_s'] / row['dsv3_best_s']:.2f}")
        print(f"  {'tokens/s':18}{B * T / row['dsv3_s']:10.0f}{B * T / row['hf_s']:14.0f}")
        print(f"  {'MFU':18}{row['mfu_dsv3']:10.1%}{row['mfu_hf']:14.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "peak_flops": peak, "autocast": args.autocast, "optimizer": args.optimizer,
                       "malloc_retained": retained, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
