"""The engine's working set at long context, on a 1-layer model with DeepSeek-V3's attention shapes.

One layer of V3's MLA (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v_head 128,
YaRN s = 40 over 4096), a small dense MLP and vocabulary (they are not what is measured). For each context
length S, in a fresh process:

1. the latent cache is allocated for S + the decoded tokens and positions 0..S-T-1 are filled (with random
   latents: what a prefill would have left there; the values do not change the memory);
2. the model runner (the engine's step, model_runner.py) prefills the last chunk of T tokens over that context:
   the largest attention a prefill of S tokens does;
3. it decodes a few tokens at positions S, S+1, ...

and the peak resident memory each phase adds above what the process held before it (Linux VmHWM, reset
before each phase) is printed. With pieces (the default attention workspace of 256 MiB) the growth is the
same at every S; with `--whole` (the workspace unbounded: every context read, expanded and scored at once, as
before pieces) it grows with S, about S x 128 heads x (192 + 128) x 4 bytes for the expanded keys and values.

    python benchmarks/long_context_memory.py                   # 16K, 32K, 64K, 128K, in pieces
    python benchmarks/long_context_memory.py --whole --lengths 8192,16384

A CPU prefill of all 128K positions would take hours (its attention alone is ~S^2/2 x 128 heads x 2 x 320
FLOPs); the last chunk is where a prefill's memory peaks, since every earlier chunk attends to less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

V3_ATTENTION = dict(model_type="deepseek_v3", vocab_size=1024, hidden_size=7168, intermediate_size=1024, num_hidden_layers=1,
                    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=256, first_k_dense_replace=1, num_nextn_predict_layers=0,
                    max_position_embeddings=163840, torch_dtype="float32",
                    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                      beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident set size (VmHWM)
        f.write("5")


def one(S: int, T: int, decode: int, workspace: int | None, dtype: str) -> dict:
    from dsv3 import DeepSeekV3, ModelConfig
    from dsv3.infer.kv_cache import LatentCache
    from dsv3.infer.model_runner import DEFAULT_ATTENTION_WORKSPACE, ModelRunner, build_batch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    config = ModelConfig.from_hf(V3_ATTENTION)
    model = DeepSeekV3(config).to(dt).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.pack_projections()
    block = 256
    n_blocks = -(-(S + decode) // block)
    cache = LatentCache(config, n_blocks, block, dt, torch.device("cpu"))
    runner = ModelRunner(model, cache, attention_workspace=workspace or DEFAULT_ATTENTION_WORKSPACE)
    out_ws = "unbounded" if workspace is None else workspace >> 20
    if workspace is None:
        runner.attention_workspace = 1 << 62  # unbounded: one piece, the whole context at once
    table = list(range(n_blocks))
    with torch.no_grad():  # positions before the last chunk: as a prefill would have left them
        cache.data[:, : S - T].normal_()
        cache.data[:, S - T:].zero_()
    cache_mb = cache.data.numel() * cache.data.element_size() / 2**20
    ids = torch.randint(0, config.vocab_size, (S + decode,)).tolist()
    out = {"context": S, "chunk": T, "cache_mb": round(cache_mb, 1), "whole": workspace is None,
           "workspace_mib": out_ws,
           "piece_prefill": runner.piece(model.layers[0].attn, 1, T, False),
           "piece_decode": runner.piece(model.layers[0].attn, 1, 1, True)}
    before = rss_mb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    runner.forward(build_batch([ids[S - T:S]], [S - T], [table], block, "cpu"))
    out["prefill_s"] = round(time.perf_counter() - t0, 2)
    out["prefill_peak_growth_mb"] = round(rss_mb("VmHWM") - before, 1)
    before = rss_mb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    for i in range(decode):
        runner.forward(build_batch([[ids[S + i]]], [S + i], [table], block, "cpu"))
    out["decode_s_per_token"] = round((time.perf_counter() - t0) / decode, 3)
    out["decode_peak_growth_mb"] = round(rss_mb("VmHWM") - before, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,32768,65536,131072", help="context lengths (comma-separated)")
    ap.add_argument("--chunk", type=int, default=256, help="the prefill chunk's tokens (default 256)")
    ap.add_argument("--decode", type=int, default=4, help="tokens decoded after the prefill (default 4)")
    ap.add_argument("--whole", action="store_true", help="no pieces: the whole context at once (the old path)")
    ap.add_argument("--workspace", type=int, default=256,
                    help="the engine's attention workspace in MiB (default 256, LLM's default)")
    ap.add_argument("--dtype", default="float32", help="float32 (default; CPUs without bf16 units) or bfloat16")
    ap.add_argument("--output", default=None, help="also write the rows as JSON here")
    ap.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one is not None:
        print(json.dumps(one(args._one, args.chunk, args.decode, None if args.whole else args.workspace << 20,
                             args.dtype)))
        return
    rows = []
    print(f"attention workspace: {'unbounded (--whole)' if args.whole else f'{args.workspace} MiB'}; prefill chunk "
          f"{args.chunk} tokens; {args.dtype}")
    print(f"{'context':>8} {'cache MB':>9} {'piece (prefill/decode)':>22} {'prefill +MB':>12} {'prefill s':>10} {'decode +MB':>11} "
          f"{'decode s/tok':>12}")
    for S in [int(x) for x in args.lengths.split(",")]:
        cmd = [sys.executable, __file__, "--_one", str(S), "--chunk", str(args.chunk), "--decode", str(args.decode),
               "--dtype", args.dtype, "--workspace", str(args.workspace)] + (["--whole"] if args.whole else [])
        # glibc's malloc keeps freed blocks below a threshold that grows with use: a fixed 1 MiB threshold
        # returns every large tensor to the system when freed, so the peak reads the live memory, not the heap's
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="1048576")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            print(f"{S:>8} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        piece = "all" if row["whole"] else f"{row['piece_prefill']}/{row['piece_decode']}"
        print(f"{S:>8} {row['cache_mb']:>9.1f} {piece:>22} {row['prefill_peak_growth_mb']:>12.1f} "
              f"{row['prefill_s']:>10.2f} {row['decode_peak_growth_mb']:>11.1f} {row['decode_s_per_token']:>12.3f}",
              flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
