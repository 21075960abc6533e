"""Each rank's weight memory under model-parallel inference, against what the layout implies: the bench-small
model (random weights) as a BF16 and an FP8 checkpoint, `dsv3 generate` under torchrun with --tp N, --ep N and
both, and one process. For every layout: each rank's bytes as the engine reports them (model parameters and
buffers), the bytes the split predicts (whole tensors for what stays whole, 1/N of each split one: experts
under EP; heads, dense MLPs, shared experts, embedding and head under TP), and whether greedy tokens equal one
process's (float32 compute).

    python benchmarks/model_parallel_memory.py [--nproc 2] [--preset bench-small]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import random_model  # noqa: E402
from multiproc import free_port  # noqa: E402

import dsv3  # noqa: E402
from dsv3.bench import machine_line  # noqa: E402
from dsv3.ckpt.pretrained import load_pretrained, model_bytes  # noqa: E402
from dsv3.parallel.inference import Sharding  # noqa: E402
from dsv3.tokenizer import train_bpe  # noqa: E402


def generate(model: str, prompts: str, out: str, nproc: int | None, extra: list[str]) -> tuple[list, str]:
    cmd = ["-m", "dsv3", "generate", "--model", model, "--input-file", prompts, "--raw", "--temperature", "0",
           "--max-new-tokens", "16", "--output-file", out, "--dtype", "float32", *extra]
    if nproc:
        cmd = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--max-restarts=0", *cmd]
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        return [json.loads(line)["token_ids"] for line in f], p.stderr


def predicted(whole: torch.nn.Module, world: int, tp: int, ep: int) -> int:
    """The layout's arithmetic on the whole model's tensors: 1/ep of the routed experts, 1/tp of what tensor
    parallelism splits, the rest whole. (An FP8 projection whose slice would cut its 128-blocks is held
    dequantised, in float32 here: counted as such.)"""
    shard = Sharding(whole.config, 0, world, tp, ep)
    total = 0
    tensors = dict(whole.named_parameters())
    tensors.update({n: b for n, b in whole.named_buffers() if b is not None})
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if ".experts.w" in name:
            total += size // ep
            continue
        dim = shard.split_dim(name)
        if dim is None:
            total += size
        elif t.dtype == torch.float8_e4m3fn and (t.shape[dim] // tp) % 128:
            total += t.numel() // tp * 4  # held dequantised (and its scale dropped below)
        elif name.endswith("_scale_inv") and tensors[name[: -len("_scale_inv")]].dtype == torch.float8_e4m3fn \
                and (tensors[name[: -len("_scale_inv")]].shape[dim] // tp) % 128:
            continue
        else:
            total += size // tp
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--preset", default="bench-small")
    args = ap.parse_args()
    print(machine_line())
    n = args.nproc
    tmp = tempfile.mkdtemp()
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("def main(\nimport os\nclass Stack:\n")
    tok = train_bpe(["def main(): import os class Stack: pass " * 50], vocab_size=300)
    config = dsv3.ModelConfig.preset(args.preset)
    model = random_model(config, std=0.1)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{config.n_routed_experts} routed experts; {n} processes; weights held in float32 (FP8 kept FP8)")
    print(f"{'checkpoint':10s} {'layout':14s} {'rank MiB (reported)':>22s} {'predicted':>10s} {'one process':>12s} "
          f"{'ratio':>6s}  same tokens")
    for kind in ("bf16", "fp8"):
        path = os.path.join(tmp, kind)
        dsv3.save_pretrained(model, path, dtype=torch.bfloat16, fp8=kind == "fp8", tokenizer=tok)
        whole_model = load_pretrained(path, dtype=torch.float32)
        whole = model_bytes(whole_model)
        one, _ = generate(path, prompts, os.path.join(tmp, "one.jsonl"), None, [])
        for tp, ep in ((n, 1), (1, n), (n, n)):
            flags = (["--tp", str(tp)] if tp > 1 else []) + (["--ep", str(ep)] if ep > 1 else [])
            toks, log = generate(path, prompts, os.path.join(tmp, "mp.jsonl"), n, flags)
            m = re.search(r"weights per process ([0-9., ]+) MiB", log)
            ranks = [float(x) for x in m.group(1).split(",")]
            pred = predicted(whole_model, n, tp, ep) / 2**20
            print(f"{kind:10s} {' '.join(flags):14s} {', '.join(f'{r:.1f}' for r in ranks):>22s} {pred:10.1f} "
                  f"{whole / 2**20:12.1f} {max(ranks) / (whole / 2**20):6.3f}  {toks == one}")


if __name__ == "__main__":
    main()
