"""Training throughput over processes: `dsv3 train` on one process against data, expert, tensor and pipeline
parallelism on 2 and 4 processes (torchrun, gloo on CPU, NCCL on CUDA), with each layout's overhead over
perfect scaling: the share of its step time beyond the one-thread, one-process step divided among the
processes that can run at once (min(processes, cores)). That overhead is communication, waiting for it,
pipeline bubbles and load imbalance together.

    python benchmarks/bench_parallel.py [--preset tiny] [--steps 8] [--layouts dp2,ep2,pp2,dp4,ep4,pp2ep2]
    python benchmarks/bench_parallel.py --device cuda --layouts dp8,ep8,pp2ep4     # the same on GPUs

Every run trains the same steps of the same run (same seed, data, batch and micro-batch) from scratch in a
fresh directory; tokens/s is the global batch over the median step time after the first two steps. On a
CPU the processes share its cores: one process is given all the threads (and, to separate the two effects,
one thread), each of N processes cores/N threads (at least 1). On 2 cores more processes can only be
slower: what this measures here is the cost of the communication, not a speed-up; on GPUs each process
has its own device and the same script measures scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

LAYOUTS = {  # name: (processes, flags)
    "dp2": (2, ["--dp-shard", "2"]), "ep2": (2, ["--ep", "2"]), "tp2": (2, ["--tp", "2"]),
    "pp2": (2, ["--pp", "2", "--pp-schedule", "1f1b"]), "pp2v": (2, ["--pp", "2", "--pp-schedule", "dualpipev"]),
    "dp4": (4, ["--dp-shard", "4"]), "ep4": (4, ["--ep", "4"]), "pp2ep2": (4, ["--pp", "2", "--ep", "2"]),
    "dp8": (8, ["--dp-shard", "8"]), "ep8": (8, ["--ep", "8"]), "pp2ep4": (8, ["--pp", "2", "--ep", "4"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    """Under torchrun (or alone): train, profiling steps 3..N on rank 0; write rank 0's figures to args.out."""
    import torch

    from dsv3.parallel import mesh
    from dsv3.train.trainer import Trainer, TrainConfig

    torch.set_num_threads(args.threads)
    kw = dict(zip((a.lstrip("-").replace("-", "_") for a in args.flags[::2]), args.flags[1::2]))
    kw = {k: (v if k == "pp_schedule" else int(v)) for k, v in kw.items()}
    t = Trainer(TrainConfig(out=args.run, preset=args.preset, data=args.data, steps=args.steps,
                            save_every=10 ** 6, eval_every=10 ** 6, no_plots=True, precision="fp32",
                            batch_size=args.batch, micro_batch_size=args.micro, device=args.device, **kw))
    records = [t.step() for _ in range(args.steps)]  # the first two are not timed: they allocate and build
    if t.par is None or t.par.is_main:
        step_s = statistics.median(t.tokens_per_step / r["tokens_per_s"] for r in records[2:])
        with open(args.out, "w") as f:
            json.dump({"step_s": step_s, "tokens_per_s": t.tokens_per_step / step_s, "loss": records[-1]["loss"]}, f)
    mesh.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=8, help="steps per run, the first two not timed (default 8)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--layouts", default="dp2,ep2,pp2,pp2v,dp4,ep4,pp2ep2")
    p.add_argument("--device", default=None)
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads to share out (default: all)")
    p.add_argument("--json", default=None, help="write the table here")
    p.add_argument("--data", default=None, help="training data (default: the built-in corpus)")
    if "BENCH_PARALLEL_JOB" in os.environ:  # a run started below (torchrun's parser would take its options)
        return worker(argparse.Namespace(**json.loads(os.environ["BENCH_PARALLEL_JOB"])))
    args = p.parse_args()

    from common import print_machine
    machine = print_machine(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("1 process", 1, args.cores, []), ("1 process, 1 thread", 1, 1, [])]
        for name in filter(None, args.layouts.split(",")):
            nproc, flags = LAYOUTS[name]
            runs.append((name, nproc, max(1, args.cores // nproc), flags))
        for i, (name, nproc, threads, flags) in enumerate(runs):
            run, out = os.path.join(tmp, f"run{i}"), os.path.join(tmp, f"r{i}.json")
            job = {"run": run, "out": out, "preset": args.preset, "steps": args.steps, "batch": args.batch,
                   "micro": args.micro, "threads": threads, "device": args.device, "data": args.data,
                   "flags": flags}
            cmd = [sys.executable, __file__] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), BENCH_PARALLEL_JOB=json.dumps(job))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(f"{name}: failed\n{r.stderr[-2000:]}")
                continue
            with open(out) as f:
                res = json.load(f)
            one_thread = next((r["step_s"] for r in rows if r["layout"] == "1 process, 1 thread"), None)
            if nproc > 1 and one_thread is not None:
                ideal = one_thread / min(nproc, args.cores)
                res["overhead"] = max(0.0, 1 - ideal / res["step_s"])
            rows.append({"layout": name, "processes": nproc, "threads_each": threads, **res})
            print(f"{name:22s} {nproc} x {threads} threads  {res['tokens_per_s']:8.0f} tok/s  "
                  f"step {res['step_s']:.3f} s  loss {res['loss']:.4f}", flush=True)
    base = rows[0]["tokens_per_s"] if rows else float("nan")
    print("\nlayout                 processes x threads   tok/s   vs 1 process   overhead over perfect scaling")
    for r in rows:
        over = f"{100 * r['overhead']:4.1f}%" if "overhead" in r else "   -"
        print(f"{r['layout']:22s} {r['processes']} x {r['threads_each']:<17d} {r['tokens_per_s']:6.0f}   "
              f"{r['tokens_per_s'] / base:5.2f}x         {over}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
