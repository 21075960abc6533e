"""`make demo` / `python -m dsv3.demo`: the main job that exists today, end to end on a CPU in seconds.

Builds the `tiny` DeepSeek-V3 (MLA with a q latent, 3 MoE layers of 8 routed experts in 4 groups plus a
shared expert, one MTP module) with random weights, writes it as an HF model directory in FP32 and in the
official FP8 layout, loads both back, checks them, and decodes greedily from each (the weights are random,
so the tokens are too). Training (`dsv3 train`) replaces the random weights in a later release.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from . import DeepSeekV3, ModelConfig, init_weights, load_pretrained, save_pretrained
from .ckpt import model_bytes


@torch.no_grad()
def greedy(model: DeepSeekV3, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Plain greedy decoding that recomputes the whole sequence each step (no cache): the reference."""
    ids = prompt
    for _ in range(max_new_tokens):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="where to write the model directories (default demo_out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    config = ModelConfig.preset("tiny")
    model = DeepSeekV3(config)
    init_weights(model, std=0.02)
    model.eval()
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    print(f"tiny DeepSeek-V3: {config.num_params() / 1e6:.2f}M parameters ({config.num_active_params() / 1e6:.2f}M "
          f"active per token), {config.num_hidden_layers} layers ({n_moe} MoE: {config.n_routed_experts} experts in "
          f"{config.n_group} groups, top-{config.num_experts_per_tok}), MTP depth {config.num_nextn_predict_layers}")

    fp32_dir, fp8_dir = os.path.join(args.out, "tiny-fp32"), os.path.join(args.out, "tiny-fp8")
    t0 = time.perf_counter()
    save_pretrained(model, fp32_dir, dtype=torch.float32)
    save_pretrained(model, fp8_dir, dtype=torch.float32, fp8=True)
    print(f"saved {fp32_dir} ({_dir_bytes(fp32_dir) / 1e6:.1f} MB) and {fp8_dir} ({_dir_bytes(fp8_dir) / 1e6:.1f} MB, "
          f"projections in FP8 e4m3 with 128x128 block scales) in {time.perf_counter() - t0:.2f}s")

    t0 = time.perf_counter()
    loaded = load_pretrained(fp32_dir)
    loaded_fp8 = load_pretrained(fp8_dir)
    print(f"loaded both in {time.perf_counter() - t0:.2f}s: {model_bytes(loaded) / 1e6:.1f} MB and "
          f"{model_bytes(loaded_fp8) / 1e6:.1f} MB in memory")

    prompt = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        same = torch.equal(loaded(prompt), model(prompt))
        ref = model(prompt)
        err = ((loaded_fp8(prompt) - ref).norm() / ref.norm()).item()
        _, mtp = loaded.forward_with_mtp(prompt)
    print(f"FP32 round trip exact: {same}; FP8 logits differ from FP32 by {err:.2%} (relative norm)")
    print(f"MTP head: {len(mtp)} module(s), logits {tuple(mtp[0].shape)} (position i predicts token i+2)")

    for name, m in (("fp32", loaded), ("fp8", loaded_fp8)):
        t0 = time.perf_counter()
        out = greedy(m, prompt, args.new_tokens)
        dt = time.perf_counter() - t0
        print(f"greedy {name}: {out[0].tolist()}  ({args.new_tokens / dt:.0f} tokens/s without a cache)")
    print("(random weights: the tokens mean nothing yet; `python -m pytest tests/test_parity.py` shows the same "
          "model agreeing with transformers to 1e-5)")


if __name__ == "__main__":
    main()
