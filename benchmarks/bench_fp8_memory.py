"""What FP8 training saves in memory: one bench-small training micro-batch (forward, V3's pretraining loss,
backward) in BF16 and in FP8, measured, and the same accounting computed for the 671B config.

Measured, each precision in its own fresh process (same seed, weights and batch):
- the tensors autograd keeps for backward (saved_tensors_hooks over the forward; each storage counted once,
  parameters left out), by dtype, and by where they were saved: inside a converted Linear (its input: what
  FP8 keeps at one byte per element, plus a float32 scale per 128), inside the routed experts (their input
  and SwiGLU activations), the output head's input (BF16 in both), the master weights' BF16 copies autocast
  keeps for backward, and everything else (norms, attention core, RoPE, router, losses);
- the peak of live tensor memory over forward + backward: torch.profiler's allocation events
  (profile_memory=True) replayed in time order, counting what is allocated after the step starts (the
  weights, already there, are not in it; the gradients, allocated in backward, are);
- the process's max RSS, a secondary and noisy figure (malloc keeps and reuses memory as it likes).
It also checks that the FP8 step caches its Linear inputs as float8_e4m3fn and that its routed experts run
no per-expert Python loop (the same ops dispatched with twice the experts).

Both precisions run under bf16 autocast with FP32 master weights, as `dsv3 train --precision bf16|fp8`; on a
CPU that multiplies BF16 matrices more slowly than FP32 ones, BF16 products are taken in FP32 kernels
(quant/bf16.py: the same numbers). The FP8 GEMMs here are the CPU references of quant/fp8.py, which
dequantise their operands to FP32 for a moment: transients a GPU kernel would not allocate, counted in the
peak as they are. Nothing about speed is reported.

    python benchmarks/bench_fp8_memory.py [--batch 16] [--seq 256] [--threads N] [--json out.json]
    python benchmarks/bench_fp8_memory.py --smoke     # the micro preset: about a minute, mostly start-up
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.model.layers import Linear  # noqa: E402
from dsv3.model.moe import Experts, RoutingStats  # noqa: E402
from dsv3.train.objectives import Pretraining  # noqa: E402
from common import print_machine  # noqa: E402

MiB = 2 ** 20
FP8_DTYPE = torch.float8_e4m3fn
CATEGORIES = ("Linear inputs", "routed experts", "head input", "weight copies", "other")
CATEGORY_HELP = {
    "Linear inputs": "inputs of the converted Linears (attention projections, dense MLP, shared experts, MTP "
                     "projection); FP8: e4m3 + float32 scales",
    "routed experts": "the grouped experts' input and SwiGLU activations (and gate values)",
    "head input": "the output head's input (the head stays BF16 in both)",
    "weight copies": "BF16 casts of the master weights autocast keeps for backward",
    "other": "norms, attention core, RoPE, router, residual sums, losses",
}


# ---- one measured step ----------------------------------------------------------------------------------

class SavedTensorLog:
    """Records each tensor autograd saves for backward while active: its storage (address, bytes), dtype and
    where it was saved (the innermost Linear or Experts module running, by module hooks). Keeps no reference
    to the tensors, so their lifetimes and the measured peak are untouched."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.scope: list[tuple[str, torch.nn.Module]] = []  # (name, module) of the Linear/Experts calls running
        self.saved: dict[int, dict] = {}  # storage address -> record (the first save of a storage)
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.handles = []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, (Linear, Experts)):
                self.handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: self.scope.append((n, mod))))
                self.handles.append(m.register_forward_hook(lambda mod, args, out: self._leave()))
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.at_exit = self.live()

    def _leave(self) -> None:  # a forward hook returning a value would replace the module's output
        self.scope.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.params or t.device.type == "meta":
            return t
        category = self.category(t)
        rec = self.saved.get(ptr)
        if rec is None or rec["tensor"]() is None:  # a new storage (perhaps at the address of a freed one)
            self.saved[ptr] = dict(bytes=storage.nbytes(), dtype=str(t.dtype).removeprefix("torch."),
                                   category=category, shape=list(t.shape), tensor=weakref.ref(t))
        elif rec["category"] == "other" and category != "other":
            rec["category"] = category  # a storage a Linear caches is counted as the Linear's
        return t

    def live(self) -> list[dict]:
        """The records of the storages still held for backward (autograd keeps the tensors `pack` returned, so
        a dead weak reference means that part of the graph was freed)."""
        return [{k: v for k, v in r.items() if k != "tensor"} for r in self.saved.values() if r["tensor"]() is not None]

    def category(self, t: torch.Tensor) -> str:
        if not self.scope:
            return "other"
        name, module = self.scope[-1]
        if isinstance(module, Experts):
            return "routed experts"
        w = module.weight.detach()
        if t.dtype == torch.bfloat16 and t.dim() == 2 and t.numel() == w.numel():  # autocast's cast of it?
            for view in (w, w.T):  # F.linear keeps W^T
                if t.shape == view.shape and torch.equal(t, view.to(t.dtype)):
                    return "weight copies"
        return "head input" if name.rsplit(".", 1)[-1] == "head" else "Linear inputs"


@functools.cache
def bf16_speedup() -> float:
    from dsv3.train.cpu import bf16_matmul_speedup
    return bf16_matmul_speedup()


def bf16_products():
    """As `dsv3 train` does: BF16 products in FP32 kernels where this CPU multiplies BF16 more slowly."""
    speedup = bf16_speedup()
    if speedup >= 1:
        return contextlib.nullcontext(), speedup
    from dsv3.quant.bf16 import fp32_products
    return fp32_products(), speedup


def build(preset: str, seed: int, precision: str, **overrides) -> dsv3.DeepSeekV3:
    cfg = dsv3.ModelConfig.preset(preset)
    if overrides:
        cfg = cfg.replace(**overrides)
    torch.manual_seed(seed)
    model = dsv3.DeepSeekV3(cfg)
    dsv3.init_weights(model, std=0.02)
    if precision == "fp8":
        from dsv3.quant.training import convert_to_fp8_training
        convert_to_fp8_training(model)
    return model


def train_step(model, batch_BT, products, forward_ctx=None) -> torch.Tensor:
    """Forward (V3's pretraining loss: next token + MTP + sequence-wise balance) and backward, as the
    Trainer's micro-batch step; record_function marks the two halves for the profiler; `forward_ctx` is
    entered around the forward alone."""
    objective = Pretraining(steps=1)
    with products:
        with torch.profiler.record_function("## forward"), forward_ctx or contextlib.nullcontext(), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = objective(model, batch_BT, RoutingStats("sequence"), 0)
        with torch.profiler.record_function("## backward"):
            loss.backward()
    return loss.detach()


def replay_allocations(prof) -> dict:
    """Replay the profiler's allocation events in time order -> peaks (bytes) over the step, the forward and the
    backward, and what is live when the forward ends. Counts from zero at the step's start: memory allocated
    before it (the weights) is neither counted nor, when freed, subtracted (the CPU allocator reports only
    the frees of what it saw allocated while profiling)."""
    from torch._C._profiler import _EventType
    allocs, marks = [], {}

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation:
                allocs.append((n.start_time_ns, n.extra_fields.alloc_size))
            elif n.name in ("## forward", "## backward"):
                marks[n.name] = (n.start_time_ns, n.end_time_ns)
            walk(n.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    allocs.sort(key=lambda a: a[0])
    f0, f1 = marks["## forward"]
    b0, b1 = marks["## backward"]
    live = peak = peak_fwd = peak_bwd = 0
    live_end_fwd = None
    for t, size in allocs:
        if live_end_fwd is None and t > f1:
            live_end_fwd = live
        live += size
        peak = max(peak, live)
        if f0 <= t <= f1:
            peak_fwd = max(peak_fwd, live)
        if b0 <= t <= b1:
            peak_bwd = max(peak_bwd, live)
    return dict(peak=peak, peak_forward=peak_fwd, peak_backward=peak_bwd, live_end_forward=live_end_fwd or live,
                live_end=live, events=len(allocs))


def measure(precision: str, preset: str, batch: int, seq: int, seed: int) -> dict:
    """One fresh model, one warm-up step (lazy initialisations), then the measured step."""
    model = build(preset, seed, precision)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    batch_BT = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    products, speedup = bf16_products()
    train_step(model, batch_BT[:2, : min(seq, 64) + 1], products)  # warm-up, small
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        log = SavedTensorLog(model)  # over the forward: what it leaves for backward
        loss = train_step(model, batch_BT, products, forward_ctx=log)
    saved = collections.defaultdict(lambda: collections.defaultdict(int))
    for rec in log.at_exit:
        saved[rec["category"]][rec["dtype"]] += rec["bytes"]
    linear_dtypes = sorted({r["dtype"] for r in log.at_exit if r["category"] == "Linear inputs"})
    if precision == "fp8":
        check_fp8_inputs(log.at_exit)
    return dict(precision=precision, loss=loss.item(), saved={k: dict(v) for k, v in saved.items()},
                linear_input_dtypes=linear_dtypes, memory=replay_allocations(prof),
                max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                bf16_speedup=speedup, fp32_products=speedup < 1)


def check_fp8_inputs(records: list[dict]) -> None:
    """Every saved Linear input of an FP8 step is e4m3 (one byte per element); the float32 tensors saved there
    are its scales, one per 128 elements of a row."""
    recs = [r for r in records if r["category"] == "Linear inputs"]
    fp8_rows = {}
    for r in recs:
        assert r["dtype"] in ("float8_e4m3fn", "float32"), f"an FP8 Linear cached a {r['dtype']} tensor {r['shape']}"
        if r["dtype"] == "float8_e4m3fn":
            fp8_rows.setdefault(r["shape"][0], []).append(r["shape"][-1])
    for r in recs:
        if r["dtype"] == "float32":
            widths = fp8_rows.get(r["shape"][0], [])
            assert any(r["shape"][-1] == math.ceil(k / 128) for k in widths), \
                f"a float32 tensor {r['shape']} cached by an FP8 Linear is not the scales of an e4m3 input {widths}"
    assert fp8_rows, "the FP8 step cached no e4m3 Linear input"


# ---- no per-expert loop -----------------------------------------------------------------------------------

class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(preset: str, seed: int, n_experts: int, batch: int, seq: int) -> collections.Counter:
    """The aten ops one FP8 step (forward + backward) dispatches, with `n_experts` routed experts."""
    model = build(preset, seed, "fp8", n_routed_experts=n_experts)
    g = torch.Generator().manual_seed(seed)
    batch_BT = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
    products, _ = bf16_products()
    with CountOps() as ops:
        train_step(model, batch_BT, products)
    return ops.counts


# ---- the 671B accounting (computed, not measured) ------------------------------------------------------

def accounting_671b(cfg: dsv3.ModelConfig, block: int = 128) -> list[tuple[str, str, int, int, float]]:
    """Per token and layer: (layer kind, what, elements, BF16 bytes, FP8 bytes) of the tensors a step caches for
    backward at each Linear: the Linear's input (BF16: 2 bytes; FP8: 1 byte plus a float32 scale per 128),
    the routed experts' SwiGLU input (FP8 in the recipe), the SwiGLU input of the dense MLP and shared expert
    (BF16 in both: the recipe keeps only the routed experts' in FP8). As dsv3 does it: each Linear quantises
    and keeps its own input (q_a and kv_a read the same x, so do w1 and w3), the routed experts keep x once
    for w1 and w3 in the grouped layout (per routed expert), and FP8 recomputes the SwiGLU output (w2's
    input) where BF16 keeps it."""
    fp8 = 1 + 4 / block
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    Im, Ish, Id = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.intermediate_size
    attn = [("q_a_proj input", D), ("q_b_proj input", cfg.q_lora_rank), ("kv_a_proj_with_mqa input", D),
            ("kv_b_proj input", cfg.kv_lora_rank), ("o_proj input", cfg.num_attention_heads * cfg.v_head_dim)]
    rows = [("attention", what, n, 2 * n, fp8 * n) for what, n in attn]
    rows += [("dense MLP", "gate_proj, up_proj inputs", 2 * D, 4 * D, fp8 * 2 * D),
             ("dense MLP", "down_proj input", Id, 2 * Id, fp8 * Id),
             ("dense MLP", "SwiGLU input (BF16 in both)", 2 * Id, 4 * Id, 4 * Id)]
    rows += [("MoE", "shared expert gate_proj, up_proj inputs", 2 * D, 4 * D, fp8 * 2 * D),
             ("MoE", "shared expert down_proj input", Ish, 2 * Ish, fp8 * Ish),
             ("MoE", "shared expert SwiGLU input (BF16 in both)", 2 * Ish, 4 * Ish, 4 * Ish),
             ("MoE", f"routed: x, once per routed expert ({K} of {cfg.n_routed_experts})", K * D, 2 * K * D,
              fp8 * K * D),
             ("MoE", f"routed: SwiGLU input, 2 x {Im} per routed expert", 2 * K * Im, 4 * K * Im, fp8 * 2 * K * Im),
             ("MoE", "routed: down_proj input (FP8: recomputed)", K * Im, 2 * K * Im, 0)]
    return rows


def layer_totals(rows) -> dict[str, tuple[float, float]]:
    """-> {"dense": (bf16, fp8), "moe": (bf16, fp8)} bytes per token of a dense and of an MoE layer."""
    out = {}
    for kind, ffn in (("dense", "dense MLP"), ("moe", "MoE")):
        sel = [r for r in rows if r[0] in ("attention", ffn)]
        out[kind] = (sum(r[3] for r in sel), sum(r[4] for r in sel))
    return out


# ---- report -----------------------------------------------------------------------------------------------

def run_worker(precision: str, args) -> dict:
    """`measure` in a fresh process (so the peak and max RSS of one precision see nothing of the other's)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", precision, "--worker-out", out,
               "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def mib(b: float) -> str:
    return f"{b / MiB:,.2f}"


def print_saved(results: dict) -> None:
    dtypes = sorted({d for r in results.values() for c in r["saved"].values() for d in c})
    print("\nsaved for backward by the forward (measured; MiB; each storage once, parameters excluded):")
    print("| where saved | dtype | BF16 step | FP8 step |")
    print("|---|---|---|---|")
    totals = {p: 0 for p in results}
    for cat in CATEGORIES:
        for d in dtypes:
            vals = {p: r["saved"].get(cat, {}).get(d, 0) for p, r in results.items()}
            if not any(vals.values()):
                continue
            for p in vals:
                totals[p] += vals[p]
            print(f"| {cat} | {d} | {mib(vals['bf16'])} | {mib(vals['fp8'])} |")
        sub = {p: sum(r["saved"].get(cat, {}).values()) for p, r in results.items()}
        if any(sub.values()):
            print(f"| **{cat}, all** | | **{mib(sub['bf16'])}** | **{mib(sub['fp8'])}** |")
    print(f"| **total** | | **{mib(totals['bf16'])}** | **{mib(totals['fp8'])}** "
          f"({totals['fp8'] / totals['bf16']:.2f}x) |")
    for cat in CATEGORIES:
        print(f"  {cat}: {CATEGORY_HELP[cat]}")


def print_peaks(results: dict) -> None:
    b, f = results["bf16"]["memory"], results["fp8"]["memory"]
    print("\nlive tensor memory over the step (measured: profiler allocation events replayed; MiB above the "
          "weights; includes the FP32 gradients):")
    print("| | BF16 step | FP8 step | FP8 / BF16 |")
    print("|---|---|---|---|")
    for key, label in (("peak", "**peak over forward + backward**"), ("peak_forward", "peak during the forward"),
                       ("live_end_forward", "live when the forward ends"),
                       ("peak_backward", "peak during the backward"),
                       ("live_end", "live after the backward (the gradients)")):
        print(f"| {label} | {mib(b[key])} | {mib(f[key])} | {f[key] / b[key]:.2f} |")
    rb, rf = results["bf16"]["max_rss"], results["fp8"]["max_rss"]
    print(f"secondary, noisy (malloc keeps and reuses freed memory; includes the weights, torch and the warm-up): "
          f"process max RSS BF16 {mib(rb)} MiB, FP8 {mib(rf)} MiB ({rf / rb:.2f}x)")


def print_671b(parallel: dict) -> dict:
    cfg = dsv3.ModelConfig.preset("671B")
    rows = accounting_671b(cfg)
    print("\n671B: bytes cached at the Linears per token and layer (COMPUTED from the config, not measured):")
    print("| layer | cached tensor | elements | BF16 bytes | FP8 bytes |")
    print("|---|---|---|---|---|")
    for kind, what, n, b, f in rows:
        print(f"| {kind} | {what} | {n:,} | {b:,.0f} | {f:,.0f} |")
    tot = layer_totals(rows)
    T, L, inflight = parallel["tokens"], parallel["layers_per_stage"], parallel["micro_batches_in_flight"]
    print("\n| per layer (attention + FFN) | BF16 | FP8 | FP8 / BF16 |")
    print("|---|---|---|---|")
    for kind in ("dense", "moe"):
        b, f = tot[kind]
        print(f"| {kind}, per token | {b / 1024:,.1f} KiB | {f / 1024:,.1f} KiB | {f / b:.3f} |")
        print(f"| {kind}, per micro-batch of {T} tokens | {b * T / 2**30:,.2f} GiB | {f * T / 2**30:,.2f} GiB | |")
    b, f = tot["moe"]
    per_gpu = (b * T * L * inflight, f * T * L * inflight)
    print(f"| per GPU: {L} MoE layers x {T} tokens x {inflight} micro-batches in flight | "
          f"{per_gpu[0] / 2**30:,.1f} GiB | {per_gpu[1] / 2**30:,.1f} GiB | {per_gpu[1] / per_gpu[0]:.3f} |")
    print(f"assumptions: {parallel['note']}")
    return dict(rows=[list(r) for r in rows], per_layer_per_token={k: list(v) for k, v in tot.items()},
                per_gpu_bytes=list(per_gpu), parallel=parallel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-small")
    ap.add_argument("--batch", type=int, default=16, help="sequences in the micro-batch (default 16)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures and the machine here")
    ap.add_argument("--smoke", action="store_true", help="the micro preset, 2 x 64 tokens: checks the script")
    ap.add_argument("--worker", choices=["bf16", "fp8"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(measure(args.worker, args.preset, args.batch, args.seq, args.seed), f)
        return
    if args.smoke:
        args.preset, args.batch, args.seq = "micro", 2, 64

    info = print_machine()
    cfg = dsv3.ModelConfig.preset(args.preset)
    print(f"{args.preset}: {args.batch} x {args.seq} tokens, one micro-batch (forward with MTP and the "
          f"sequence-wise balance loss, backward), seed {args.seed}; FP32 master weights, bf16 autocast")
    results = {p: run_worker(p, args) for p in ("bf16", "fp8")}
    r = results["bf16"]
    print(f"BF16 matmul at {r['bf16_speedup']:.2f}x FP32 speed on this CPU: BF16 products "
          + ("taken in FP32 kernels (quant/bf16.py, same numbers)" if r["fp32_products"] else "native"))
    print(f"losses: BF16 {results['bf16']['loss']:.4f}, FP8 {results['fp8']['loss']:.4f}")
    print(f"FP8 step's cached Linear inputs: {', '.join(results['fp8']['linear_input_dtypes'])} "
          f"(e4m3 data, one byte per element, and float32 scales per 128; checked)")
    print_saved(results)
    print_peaks(results)

    # no per-expert loop: the same aten ops, as many of each, with twice the experts
    E = cfg.n_routed_experts
    small = dict(preset=args.preset, seed=args.seed, batch=2, seq=64)
    c1, c2 = count_ops(n_experts=E, **small), count_ops(n_experts=2 * E, **small)
    same = c1 == c2
    print(f"\nFP8 step with {E} and {2 * E} routed experts: aten::_grouped_mm {c1['_grouped_mm']} and "
          f"{c2['_grouped_mm']} calls, aten::mm {c1['mm']} and {c2['mm']}, {sum(c1.values())} and "
          f"{sum(c2.values())} ops in all: {'identical op counts, no per-expert loop' if same else 'DIFFERENT'}")
    assert same, f"op counts differ with the number of experts: {(c1 - c2) + (c2 - c1)}"

    parallel = dict(tokens=4096, layers_per_stage=4, micro_batches_in_flight=17, note=(
        "one 4096-token sequence per micro-batch; PP16 over 61 layers + the MTP block = 4 MoE layers on the "
        "heaviest stage; DualPipe keeps PP + 1 = 17 micro-batches' activations per rank (its README's table; "
        "1F1B: PP); EP64 with balanced routing: each GPU's experts process, on average, 8 routed copies of as "
        "many tokens as the GPU feeds in; expert groups not padded (128-row padding is < 1% at these sizes); "
        "the recipe of quant/training.py: o_proj's input in e4m3, where V3 used E5M6 (1.5 bytes), and the routed "
        "experts' input kept once, in FP8; the BF16 column keeps each tensor once in BF16 (the measured BF16 step "
        "keeps 5 I-wide tensors per routed pair, autograd's saves for grouped_mm and SwiGLU); only the caches at the Linears: attention core, norms, residuals and router not counted; no "
        "recomputation beyond the routed SwiGLU output"))
    extrap = print_671b(parallel)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, preset=args.preset, batch=args.batch, seq=args.seq, measured=results,
                           op_counts={str(E): dict(c1), str(2 * E): dict(c2)}, accounting_671b=extrap), f, indent=1)


if __name__ == "__main__":
    main()
