"""Redundant experts on a trained model's own routing: `dsv3 generate` under torchrun with --ep N, with and
without redundant experts placed by EPLB, on the same prompts; prints what each rank's experts computed
(max / mean over ranks, per MoE layer and averaged) and whether the greedy tokens equal one process's.

    python benchmarks/eplb_serving.py --model runs/demo [--nproc 2] [--redundant 0 2 4] [--prompts 32]

Placements compared: none (expert e on rank e // (E/N)); R redundant experts placed by the training run's
measured expert loads (--expert-loads RUN/metrics.jsonl, when the model directory has one); and by the loads
served so far, re-placed every 8 steps (--eplb-interval 8). Prompts: lines of the built-in corpus' held-out documents, each
continued greedily for --new-tokens tokens, all in one batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from multiproc import free_port  # noqa: E402

from dsv3.bench import machine_line  # noqa: E402


def run(model: str, prompts: str, out: str, nproc: int | None, extra: list[str], new_tokens: int) -> tuple[list, str]:
    cmd = ["-m", "dsv3", "generate", "--model", model, "--input-file", prompts, "--raw", "--temperature", "0",
           "--max-new-tokens", str(new_tokens), "--output-file", out, "--dtype", "float32", "--max-batch-size", "64",
           *extra]
    if nproc:
        cmd = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--max-restarts=0", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        return [json.loads(line)["token_ids"] for line in f], p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo", help="a trained model directory (default runs/demo)")
    ap.add_argument("--nproc", type=int, default=2, help="expert-parallel processes (default 2)")
    ap.add_argument("--redundant", type=int, nargs="+", default=[2, 4], help="redundant experts to try")
    ap.add_argument("--prompts", type=int, default=32, help="prompts from the built-in corpus (default 32)")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt (default 24)")
    args = ap.parse_args()
    print(machine_line())
    from dsv3.data.corpus import builtin_corpus, split

    _, val = split(builtin_corpus())  # the held-out documents: text the model did not train on
    lines = [ln.strip() for d in val for ln in d.text.splitlines() if len(ln.strip()) > 20]
    step = max(1, len(lines) // args.prompts)
    chosen = lines[::step][: args.prompts]
    tmp = tempfile.mkdtemp()
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(chosen) + "\n")
    one, _ = run(args.model, prompts, os.path.join(tmp, "one.jsonl"), None, [], args.new_tokens)
    metrics = os.path.join(args.model, "metrics.jsonl")
    cases = [("no redundant experts", [])]
    for r in args.redundant:
        if os.path.isfile(metrics):
            cases.append((f"{r} redundant, placed by the training run's loads",
                          ["--num-redundant-experts", str(r), "--expert-loads", metrics]))
        cases.append((f"{r} redundant, re-placed by served loads every 8 steps",
                      ["--num-redundant-experts", str(r), "--eplb-interval", "8"]))
    print(f"{len(chosen)} prompts x {args.new_tokens} greedy tokens, --ep {args.nproc}, model {args.model}")
    print(f"{'placement':58s} {'max/mean':>8s}  per layer                      same tokens")
    for name, extra in cases:
        toks, log = run(args.model, prompts, os.path.join(tmp, "mp.jsonl"), args.nproc,
                        ["--ep", str(args.nproc), *extra], args.new_tokens)
        m = re.search(r"max / mean over \d+ ranks: ([0-9.]+)", log)
        ratio = float(m.group(1)) if m else float("nan")
        per_layer = re.search(r"per layer: (\[.*?\])", log)
        print(f"{name:58s} {ratio:8.3f}  {per_layer.group(1) if per_layer else '':30s} {toks == one}")


if __name__ == "__main__":
    main()
