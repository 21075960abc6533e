"""`dsv3 bench`: how fast the engine runs a model directory on this machine, as `vllm bench` measures it.

    dsv3 bench latency --model DIR [--batch-size 1] [--input-len 128] [--output-len 128] [--iters 3]
    dsv3 bench throughput --model DIR [--num-prompts 64] [--input-len 128] [--output-len 128]

latency: one batch of prompts at a time, greedy with every token generated (no end-of-sequence stop): the
time to first token (prefill plus one token), the time per output token after it, decode and end-to-end
tokens/s, as medians over --iters runs after one warm-up. throughput: --num-prompts requests submitted at
once; requests/s and tokens/s over the whole run. Prompts are random token ids (seeded), so any model
directory works, tokenizer or not; each run gets fresh ones, so the prefix cache never makes a later run
cheaper than the first. The engine options are `dsv3 generate`'s (device, dtype, speculative decoding...).
The benchmarks/ scripts compare against other implementations; this measures one model where it runs.
Every figure depends on the machine: the report starts with `machine_line()` (CPU model and ISA flags,
threads, torch and its BLAS, the GPU when one is used), and the JSON holds `machine_info()` under "machine".
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

# torch is imported inside the functions: `machine_info` and the CLI's argument parser need no heavy imports.

# The instruction-set extensions that decide which CPU kernels run (fp32 FMA width, bf16 and AMX matmuls).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _size_bytes(text: str) -> int | None:
    """'32 MiB (1 instance)', '32768K', '1.5 MiB' -> bytes; None if unreadable."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)(i?B)?", text)
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2)])


def _key_values(text: str, sep: str = ":") -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, found, value = line.partition(sep)
        if found and key.strip() and key.strip() not in out:  # the first of a repeated key (one per CPU)
            out[key.strip()] = value.strip()
    return out


@functools.lru_cache(maxsize=None)
def _cpu() -> dict:
    """The CPU as lscpu names it; /proc/cpuinfo and sysfs where lscpu is missing (both Linux; elsewhere
    `platform`). Computed once: it does not change while the process runs."""
    lscpu: dict[str, str] = {}
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                                 env={**os.environ, "LC_ALL": "C"})
            lscpu = _key_values(out.stdout) if out.returncode == 0 else {}
        except (OSError, subprocess.SubprocessError):
            lscpu = {}
    cpuinfo: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = _key_values(f.read())
    except OSError:
        pass
    flags = set((lscpu.get("Flags") or cpuinfo.get("flags") or cpuinfo.get("Features") or "").split())
    info = {"cpu": lscpu.get("Model name") or cpuinfo.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": lscpu.get("CPU family") or cpuinfo.get("cpu family"),
            "cpu_model": lscpu.get("Model") or cpuinfo.get("model"),
            "cpu_flags": [f for f in ISA_FLAGS if f in flags], "arch": platform.machine()}
    if lscpu.get("Hypervisor vendor"):
        info["hypervisor"] = lscpu["Hypervisor vendor"]
    l3 = _size_bytes(lscpu["L3 cache"]) if lscpu.get("L3 cache") else None
    if l3 is None:  # sysfs: the L3 seen by CPU 0
        root = "/sys/devices/system/cpu/cpu0/cache"
        for index in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            try:
                with open(f"{root}/{index}/level") as f:
                    if f.read().strip() != "3":
                        continue
                with open(f"{root}/{index}/size") as f:
                    l3 = _size_bytes(f.read())
            except OSError:
                continue
    info["l3_cache_bytes"] = l3
    return info


def _blas(config: str) -> str:
    """The BLAS torch was built with, from torch.__config__.show(): 'MKL 2024.2', 'OpenBLAS', ..."""
    m = re.search(r"BLAS_INFO=([^,\s]+)", config)
    name = m.group(1) if m else "unknown"
    if name == "mkl":
        v = re.search(r"Math Kernel Library Version ([\w.]+)", config)
        return "MKL" + (f" {v.group(1)}" if v else "")
    return {"open": "OpenBLAS", "openblas": "OpenBLAS", "accelerate": "Accelerate"}.get(name, name)


def machine_info(device=None) -> dict:
    """What a figure measured here depends on: the CPU (lscpu's model name, family and model, the ISA flags
    of ISA_FLAGS it has, L3 size, hypervisor), logical and usable CPUs, torch's threads, torch's version,
    BLAS and CPU kernel level, and the GPU's name when `device` is a CUDA device. Every benchmark prints it
    (`machine_line`) and stores it in its JSON."""
    import torch

    info = dict(_cpu())
    info["logical_cpus"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    info["torch_threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    info["blas"] = _blas(torch.__config__.show())
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        pass
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict | None = None) -> str:
    """One readable line of `machine_info()` (computed here if not given), e.g. 'machine: AMD EPYC (family
    25, model 1; avx2 fma), KVM guest, L3 32 MiB, 2 logical CPUs, 2 torch threads; torch 2.13.0+cpu, MKL
    2024.2, CPU kernels AVX2'."""
    m = machine_info() if info is None else info
    cpu = m.get("cpu") or "unknown CPU"
    ident = ", ".join(f"{k} {m[f'cpu_{k}']}" for k in ("family", "model") if m.get(f"cpu_{k}"))
    flags = " ".join(m.get("cpu_flags") or []) or "none of " + "/".join(ISA_FLAGS)
    parts = [f"{cpu} ({ident + '; ' if ident else ''}{flags})"]
    if m.get("hypervisor"):
        parts.append(f"{m['hypervisor']} guest")
    if m.get("l3_cache_bytes"):
        parts.append(f"L3 {m['l3_cache_bytes'] / 2 ** 20:.0f} MiB")
    cpus = f"{m.get('logical_cpus')} logical CPUs"
    if m.get("usable_cpus") not in (None, m.get("logical_cpus")):
        cpus += f" ({m['usable_cpus']} usable)"
    parts += [cpus, f"{m.get('torch_threads')} torch threads"]
    line = "machine: " + ", ".join(parts) + f"; torch {m.get('torch')}, {m.get('blas')}"
    if m.get("cpu_capability"):
        line += f", CPU kernels {m['cpu_capability']}"
    if m.get("gpu"):
        line += f"; GPU {m['gpu']} (CUDA {m.get('cuda')})"
    return line


def add_args(p) -> None:
    p.add_argument("mode", choices=["latency", "throughput"],
                   help="latency: one batch at a time; throughput: many requests at once")
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--batch-size", type=int, default=1, help="latency: requests per batch (default 1)")
    p.add_argument("--iters", type=int, default=3, help="latency: timed runs after one warm-up (default 3)")
    p.add_argument("--num-prompts", type=int, default=64, help="throughput: requests in all (default 64)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="sequences decoded together (default: --batch-size for latency, 16 for throughput)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: input-len + output-len)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="latent cache size in token positions (default: the engine's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _sync(llm) -> None:
    import torch
    if llm.model.device.type == "cuda":
        torch.cuda.synchronize(llm.model.device)


def _timed(llm, prompts, params) -> float:
    _sync(llm)
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    _sync(llm)
    return time.perf_counter() - t


def latency(llm, args) -> dict:
    from .infer import SamplingParams
    B, n_in, n_out = args.batch_size, args.input_len, args.output_len
    full = SamplingParams(temperature=0, max_new_tokens=n_out, ignore_eos=True)
    first = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    vocab = llm.config.vocab_size
    _timed(llm, _prompts(vocab, B, n_in, args.seed + 10_000), full)  # warm-up
    ttfts, totals = [], []
    for i in range(args.iters):
        ttfts.append(_timed(llm, _prompts(vocab, B, n_in, args.seed + 2 * i), first))
        totals.append(_timed(llm, _prompts(vocab, B, n_in, args.seed + 2 * i + 1), full))
        print(f"  run {i + 1}/{args.iters}: {totals[-1]:.3f} s, first token {ttfts[-1]:.3f} s", file=sys.stderr)
    ttft, total = statistics.median(ttfts), statistics.median(totals)
    decode_s = max(total - ttft, 1e-9)
    return {"mode": "latency", "batch_size": B, "input_len": n_in, "output_len": n_out, "iters": args.iters,
            "latency_s": total, "latency_s_all": totals, "ttft_s": ttft, "ttft_s_all": ttfts,
            "time_per_output_token_ms": 1000 * decode_s / max(n_out - 1, 1),
            "decode_tokens_per_s": B * (n_out - 1) / decode_s, "end_to_end_tokens_per_s": B * n_out / total}


def throughput(llm, args) -> dict:
    from .infer import SamplingParams
    params = SamplingParams(temperature=0, max_new_tokens=args.output_len, ignore_eos=True)
    vocab = llm.config.vocab_size
    llm.generate(_prompts(vocab, 1, args.input_len, args.seed + 10_000), params, use_tqdm=False)  # warm-up
    prompts = _prompts(vocab, args.num_prompts, args.input_len, args.seed)
    _sync(llm)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    _sync(llm)
    seconds = time.perf_counter() - t
    n_out = sum(len(o.token_ids) for o in outs)
    return {"mode": "throughput", "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "seconds": seconds, "requests_per_s": len(outs) / seconds,
            "output_tokens_per_s": n_out / seconds,
            "total_tokens_per_s": (n_out + args.num_prompts * args.input_len) / seconds}


def run(args, engine) -> dict:
    """engine(args, **kwargs) -> the LLM (cli._engine: the shared engine options)."""
    import torch
    for name in ("input_len", "output_len", "batch_size", "iters", "num_prompts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_batch_size is None:
        args.max_batch_size = args.batch_size if args.mode == "latency" else 16
    if args.max_model_len is None:
        args.max_model_len = args.input_len + args.output_len
    llm = engine(args, kv_cache_tokens=args.kv_cache_tokens)
    dev = llm.model.device
    machine = machine_info(dev)
    caching = bool(getattr(args, "enable_prefix_caching", True))
    print(f"{args.model}: {llm.model.dtype} on {dev}"
          f"{'' if dev.type != 'cpu' else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}; "
          f"speculative {args.speculative or 'off'}, CUDA graphs {'on' if llm.graphs is not None else 'off'}, "
          f"prefix cache {'on' if caching else 'off'} (fresh random prompts every run: it "
          "cannot hit)", file=sys.stderr)
    result = latency(llm, args) if args.mode == "latency" else throughput(llm, args)
    stats = llm.stats
    result.update(device=str(dev), dtype=str(llm.model.dtype).removeprefix("torch."), model=args.model,
                  speculative=args.speculative, steps=stats["steps"], preemptions=stats["preemptions"],
                  kv_cache_bytes_per_token=llm.kv_cache_bytes_per_token,
                  enable_prefix_caching=caching,
                  prefix_cache_hit_tokens=stats["prefix_cache_hit_tokens"], machine=machine)
    if args.speculative:
        result.update(acceptance_rate=stats["acceptance_rate"], tokens_per_forward=stats["tokens_per_forward"],
                      speculative_policy=args.speculative_policy, drafting_fraction=stats["drafting_fraction"])
    _report(result)
    if args.json:
        from .ckpt.io import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


def _report(r: dict) -> None:
    lines = [machine_line(r["machine"])]
    if r["mode"] == "latency":
        lines += [f"batch {r['batch_size']}, {r['input_len']} prompt tokens, {r['output_len']} output tokens "
                  f"(medians of {r['iters']} runs)",
                  f"  latency             {r['latency_s']:10.3f} s",
                  f"  time to first token {r['ttft_s']:10.3f} s",
                  f"  per output token    {r['time_per_output_token_ms']:10.2f} ms",
                  f"  decode              {r['decode_tokens_per_s']:10.1f} tokens/s",
                  f"  end to end          {r['end_to_end_tokens_per_s']:10.1f} tokens/s"]
    else:
        lines += [f"{r['num_prompts']} requests of {r['input_len']} prompt and {r['output_len']} output tokens "
                  f"in {r['seconds']:.2f} s",
                  f"  {r['requests_per_s']:.2f} requests/s, {r['output_tokens_per_s']:.1f} output tokens/s, "
                  f"{r['total_tokens_per_s']:.1f} tokens/s in all"]
    if r.get("speculative"):
        lines.append(f"  MTP drafts accepted {r['acceptance_rate']:.0%}, {r['tokens_per_forward']:.2f} tokens per "
                     f"verifying forward; {r['speculative_policy']} policy drafted {r['drafting_fraction']:.0%} of "
                     "decode steps")
    lines.append(f"  cache {r['kv_cache_bytes_per_token']} bytes per token; {r['steps']} engine steps, "
                 f"{r['preemptions']} preemptions; prefix cache {'on' if r['enable_prefix_caching'] else 'off'}, "
                 f"{r['prefix_cache_hit_tokens']} prompt tokens served from it")
    print("\n".join(lines))
