"""Peak resident memory while loading a checkpoint, against the size of the loaded model.

`dsv3.load_pretrained` streams: it allocates the model once, in its final dtype, and reads every tensor
straight into its parameter. So loading should cost little more than the model itself; the target is
peak increase / model bytes <= 1.3. transformers' `from_pretrained` loads the same fp32 checkpoint as the
peer.

How a figure is taken. Every load runs in a FRESH Python process, so that its peak is the peak of that load
alone. The child imports torch and dsv3 (and transformers for the peer) first, reads its resident set
(VmRSS in /proc/self/status) as the baseline, loads the model, then reports ru_maxrss (the process's
high-water resident set, KiB on Linux) and the model's bytes (`dsv3.ckpt.model_bytes`):

    peak_increase = maxrss - baseline          ratio = peak_increase / model_bytes

The parent process stays small on purpose: it imports no torch and writes the checkpoints from a child
too. Linux keeps ru_maxrss across fork + exec, so a child started by a parent that once held a model
would inherit the parent's high-water mark. Each child also reports VmHWM (the same high-water mark, of
its own address space only) as a check.

The model: bench-small widened to hidden 1024 with 32 experts of 512 (about 0.93 GB in fp32, MTP
module included), random weights, written once to a temporary directory in fp32, bf16 and FP8. The first line
printed names the machine (from the child that writes the checkpoints: the parent imports no torch); --json
stores it too.

    python benchmarks/bench_load_memory.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TARGET_RATIO = 1.3

# bench-small (DESIGN.md) scaled up so that the weights are large next to the process's own few hundred MB
LOAD_BENCH_CONFIG = dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=16, q_lora_rank=384,
                         kv_lora_rank=256, moe_intermediate_size=512, n_routed_experts=32)

# (label, loader, checkpoint subdirectory, dtype to load in)
CASES = [
    ("dsv3 fp32 <- fp32 ckpt", "dsv3", "fp32", "float32"),
    ("dsv3 bf16 <- bf16 ckpt", "dsv3", "bf16", "bfloat16"),
    ("dsv3 fp8 <- fp8 ckpt (kept FP8)", "dsv3", "fp8", "bfloat16"),
    ("transformers fp32 <- fp32 ckpt", "transformers", "fp32", "float32"),
]


# ---- children --------------------------------------------------------------------------------------------

def status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, RssFile), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_write(path: str) -> None:
    """Build the random model and write it in fp32, bf16 and FP8 under path/{fp32,bf16,fp8}; print one JSON line:
    the machine (dsv3.bench.machine_info) and its line."""
    import torch

    import dsv3
    from dsv3.bench import machine_info, machine_line

    cfg = dsv3.ModelConfig.preset("bench-small").replace(**LOAD_BENCH_CONFIG)
    model = dsv3.DeepSeekV3(cfg)
    dsv3.init_weights(model, generator=torch.Generator().manual_seed(0))
    dsv3.save_pretrained(model, os.path.join(path, "fp32"), dtype=torch.float32)
    dsv3.save_pretrained(model, os.path.join(path, "bf16"), dtype=torch.bfloat16)
    dsv3.save_pretrained(model, os.path.join(path, "fp8"), dtype=torch.bfloat16, fp8=True)
    info = machine_info()
    print(json.dumps({"machine": info, "line": machine_line(info)}))


def child_load(loader: str, path: str, dtype_name: str) -> None:
    """Import, take the baseline, load, and print one JSON line with the figures."""
    import resource
    import warnings

    import torch

    import dsv3
    from dsv3.ckpt import model_bytes

    dtype = getattr(torch, dtype_name)
    if loader == "transformers":
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")

    baseline_kib = status_kib("VmRSS")
    baseline_file_kib = status_kib("RssFile")  # file-backed part (mapped files, e.g. an mmap'd checkpoint)
    start = time.perf_counter()
    if loader == "dsv3":
        model = dsv3.load_pretrained(path, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    seconds = time.perf_counter() - start
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    report = {"loader": loader, "path": path, "dtype": dtype_name, "baseline_kib": baseline_kib,
              "maxrss_kib": maxrss_kib, "vmhwm_kib": status_kib("VmHWM"), "after_kib": status_kib("VmRSS"),
              "baseline_file_kib": baseline_file_kib, "after_file_kib": status_kib("RssFile"),
              "model_bytes": model_bytes(model), "param_dtypes": dtypes, "seconds": seconds,
              "torch": torch.__version__}
    if loader == "transformers":
        report["transformers"] = transformers.__version__
    print(json.dumps(report))


# ---- the parent ------------------------------------------------------------------------------------------

def run_child(*args: str) -> str:
    """Run this script in a fresh interpreter with the given arguments; return its stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def run_all(json_out: str | None) -> None:
    """Write the checkpoints, measure every case in its own process, print the table."""
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-load-") as root:
        start = time.perf_counter()
        written = json.loads(run_child("--child-write", root).strip().splitlines()[-1])
        machine = written["machine"]
        print(written["line"])
        print(f"wrote the random model in fp32, bf16 and FP8 to {root} in {time.perf_counter() - start:.0f} s; "
              "each load below runs in a fresh process\n")
        results = []
        for label, loader, sub, dtype in CASES:
            path = os.path.join(root, sub)
            r = json.loads(run_child("--child-load", loader, path, dtype).strip().splitlines()[-1])
            r["label"], r["checkpoint_bytes"] = label, dir_bytes(path)
            r["peak_increase_bytes"] = (r["maxrss_kib"] - r["baseline_kib"]) * 1024
            r["ratio"] = r["peak_increase_bytes"] / r["model_bytes"]
            r["retained_bytes"] = (r["after_kib"] - r["baseline_kib"]) * 1024
            r["retained_file_bytes"] = (r["after_file_kib"] - r["baseline_file_kib"]) * 1024
            results.append(r)

    mib = 2 ** 20
    header = (f"{'load':<32} | {'ckpt MiB':>8} | {'model MiB':>9} | {'baseline':>8} | {'maxrss':>7} | "
              f"{'peak incr':>9} | {'ratio':>5} | {'after':>6} | {'of file':>7} | {'load s':>6} | target <= {TARGET_RATIO}")
    print(f"peak resident memory while loading (MiB; ratio = peak increase / model bytes); "
          f"torch {results[0]['torch']}, transformers {results[-1].get('transformers', '?')}")
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "(peer)"
        if r["loader"] == "dsv3":
            verdict = "PASS" if r["ratio"] <= TARGET_RATIO else "FAIL"
        print(f"{r['label']:<32} | {r['checkpoint_bytes'] / mib:>8.0f} | {r['model_bytes'] / mib:>9.0f} | "
              f"{r['baseline_kib'] / 1024:>8.0f} | {r['maxrss_kib'] / 1024:>7.0f} | "
              f"{r['peak_increase_bytes'] / mib:>9.0f} | {r['ratio']:>5.2f} | "
              f"{r['retained_bytes'] / mib:>6.0f} | {r['retained_file_bytes'] / mib:>7.0f} | {r['seconds']:>6.1f} | {verdict}")
    print("\nbaseline: VmRSS after the imports; maxrss: ru_maxrss; peak incr: maxrss - baseline; after: VmRSS "
          "increase once loaded; of file: the part of it that is file-backed (mapped files: shared libraries, "
          "an mmap'd checkpoint; pages the kernel can drop), not anonymous memory")
    for r in results:
        if r["maxrss_kib"] > r["vmhwm_kib"] + 1024:
            print(f"note: {r['label']}: VmHWM {r['vmhwm_kib'] / 1024:.0f} MiB differs from ru_maxrss "
                  f"{r['maxrss_kib'] / 1024:.0f} MiB (a high-water mark inherited across exec?)")
    ours_fp32, peer = results[0], results[-1]
    if peer["model_bytes"] < ours_fp32["model_bytes"]:
        print(f"note: transformers' model is {(ours_fp32['model_bytes'] - peer['model_bytes']) / mib:.0f} MiB smaller "
              "than dsv3's from the same files: it does not load the MTP module (model.layers.N.*)")
    over = [f"{r['label']} at {r['ratio']:.2f}" for r in results if r["loader"] == "dsv3" and r["ratio"] > TARGET_RATIO]
    print(f"dsv3 against the target peak increase <= {TARGET_RATIO} x model bytes: "
          + (f"FAIL ({'; '.join(over)})" if over else "PASS (every load)"))

    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "load_memory", "machine": machine, "target_ratio": TARGET_RATIO,
                       "config": LOAD_BENCH_CONFIG,
                       "results": results}, f, indent=2)
        print(f"wrote {json_out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    ap.add_argument("--child-write", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--child-load", nargs=3, metavar=("LOADER", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_write:
        child_write(args.child_write)
    elif args.child_load:
        child_load(*args.child_load)
    else:
        run_all(args.json)


if __name__ == "__main__":
    main()
