"""Matrix products for CPU inference, each chosen by timing it on the machine at hand.

A decode step multiplies a few rows of activations by every weight matrix it uses, so it is bound by how
fast the weights stream from memory. How fast a CPU's BLAS streams one matrix depends on how the call is
laid out, and the best layout differs from CPU to CPU (benchmarks/RESULTS.md has the figures): on AMD Zen
MKL reads a matrix for one row at about half the bandwidth of the same product split into a batch of row
blocks, and x W^T for 2-8 rows at about half that of (W x^T)^T, while on an Intel Xeon with AVX-512 the
plain call wins and the split one is slower. So no layout is fixed here. Every candidate computes the same
product; `calibrate` times them on this machine for each weight shape and number of rows, with the weights
cold (a pool of matrices larger than the last-level cache, as a decode step sees them), and keeps the
fastest, the plain call unless another is clearly faster. The choices are cached per machine (CPU model
and flags, torch version, threads) in `~/.cache/dsv3/cpu_kernels.json` (`DSV3_CACHE_DIR` moves it), so only
the first engine on a machine pays for the calibration (a few seconds for a small model).

The same holds for the routed experts of a decode step: the reference dispatches each token to its experts
and runs grouped GEMMs (`MoE.routed`); for one token its K experts can instead run one after another as
matrix-vector products, and for a few tokens every hit expert can run on every token through batched GEMMs
(`ExpertsKernel`). Which pays is timed the same way, per number of tokens.

Kernels are installed on the model's modules (`Linear.kernel`, `PackedWeights.kernel`, `Experts.kernel`)
by the engine, and used only for CPU inference in float32 (in bfloat16 the layouts round differently, so
greedy tokens could differ from the reference's on near-ties; that dtype runs the reference);
`LLM(cpu_kernels=False)` (`--enforce-eager`) runs the plain reference, which the tests hold these to.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..ckpt.io import atomic_write_json
from ..model.layers import Linear, PackedWeights
from ..model.moe import Experts

log = logging.getLogger(__name__)

MAX_ROWS = 64  # products with more rows (prefill) always take F.linear: their GEMMs are compute-bound
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
EXPERT_TOKEN_BUCKETS = (1, 2, 4, 8, 16)  # the expert kernels run at most this many tokens; more: grouped GEMMs
# a candidate replaces the reference only when it is at least this much faster: a shared machine's timings
# wander by a few percent, and a wrong choice between near-equal layouts is cheap, a flapping one is not
MIN_GAIN = 0.05
# a gap of unpicked experts that costs more to read than one more batched GEMM: split the run there
DENSE_GAP_BYTES = 1 << 20
DENSE_MAX_SPANS = 8  # with more runs of experts than this the dense path issues too many GEMMs


def bucket(n: int, buckets: Iterable[int]) -> int | None:
    """The smallest bucket >= n, or None past the last."""
    for b in buckets:
        if n <= b:
            return b
    return None


# ---- candidates for y = x W^T (x (M, K) row-major, W (O, K) contiguous) --------------------------------

def mm_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference: x W^T as every engine computes it."""
    return F.linear(x, w)


def mm_transposed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(W x^T)^T, x^T a transposed view of the row-major x (a contiguous x^T takes a far slower BLAS path).
    The result is a column-major (M, O) view."""
    return torch.mm(w, x.t()).t()


def mm_split(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The weight's rows split into 2 x threads blocks, one batched GEMM: each thread streams its own
    contiguous blocks. (M, O); column-major when M > 1."""
    parts = 2 * torch.get_num_threads()
    M, K = x.shape
    return torch.bmm(w.view(parts, -1, K), x.t().expand(parts, K, M)).view(w.shape[0], M).t()


MATMULS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": mm_linear, "transposed": mm_transposed, "split": mm_split}


def matmul_candidates(shape: tuple[int, int], rows: int) -> list[str]:
    names = ["linear"]
    if rows > 1:
        names.append("transposed")
    if shape[0] % (2 * torch.get_num_threads()) == 0:
        names.append("split")
    return names


class MatmulKernel:
    """y = x W^T (+ b) for one weight shape, by the layout measured fastest for x's number of rows."""

    def __init__(self, shape: tuple[int, int], choice: dict[int, str]):
        self.shape = shape
        self.choice = choice  # row bucket -> candidate name; missing buckets take F.linear
        self.fns = {b: MATMULS[name] for b, name in choice.items() if name != "linear"}

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        fn = self.fns.get(bucket(rows, ROW_BUCKETS)) if rows <= MAX_ROWS else None
        if fn is None or not w.is_contiguous() or tuple(w.shape) != self.shape:
            return F.linear(x, w, bias)
        x2 = x.reshape(rows, x.shape[-1])
        if x2.stride(-1) != 1 or (rows > 1 and x2.stride(0) != x2.shape[1]):
            x2 = x2.contiguous()  # a column-major input (another skinny product's output): BLAS is slow on it
        y = fn(x2, w)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], self.shape[0]) if rows == 1 else y.reshape(*x.shape[:-1], self.shape[0])


# ---- the routed experts of a decode step --------------------------------------------------------------

def expert_spans(picked: list[int], max_gap: int) -> list[tuple[int, int]]:
    """Runs [lo, hi) of consecutive experts that cover every picked one: a run ends at a gap of more than
    max_gap unpicked experts (reading a short gap costs less than one more batched GEMM per weight)."""
    hit = sorted(set(picked))
    spans = [[hit[0], hit[0] + 1]]
    for e in hit[1:]:
        if e - spans[-1][1] > max_gap:
            spans.append([e, e + 1])
        else:
            spans[-1][1] = e + 1
    return [(lo, hi) for lo, hi in spans]


def experts_loop(ex: Experts, x_1D, weights_1K, experts_1K, out_1D, matmul: Callable) -> torch.Tensor:
    """One token: its K experts one after another as matrix-vector products (`matmul`, the calibrated layout),
    each added into out_1D with its gate weight. No dispatch, and no expert read but the K it uses."""
    w13, I = ex.w13.tensor, ex.inter_dim
    for g, e in zip(weights_1K[0].tolist(), experts_1K[0].tolist()):
        h = matmul(x_1D, w13[e])
        out_1D.add_(matmul(F.silu(h[:, :I]) * h[:, I:], ex.w2[e]), alpha=g)
    return out_1D


def experts_dense(ex: Experts, x_ND, weights_NK, experts_NK, out_ND, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Every expert the tokens hit, on every token, then each token's outputs summed with its gate weights
    (zero for the experts it did not pick): out_ND + sum_k w_k expert_k(x). No dispatch, a handful of ops, and
    each expert's weights read once by a batched GEMM whose right operand is column-major per expert. The
    batches are runs of consecutive experts (`expert_spans`), each expert's rows split into `parts` blocks when
    a run is shorter than 2 x threads, so that every thread has blocks to stream (a batch of one matrix is a
    single-threaded product in BLAS). Wasteful unless the tokens are few."""
    E, N, I, D = ex.n_experts, x_ND.shape[0], ex.inter_dim, ex.dim
    if x_ND.stride(-1) != 1:  # a column-major x (another skinny product's output) makes x^T the slow layout
        x_ND = x_ND.contiguous()
    R = sum(hi - lo for lo, hi in spans)  # experts read
    threads = 2 * torch.get_num_threads()
    parts = next((p for p in (threads, threads // 2, 2) if p > 1 and D % p == 0 and I % p == 0), 1) \
        if min(hi - lo for lo, hi in spans) < threads else 1

    def per_expert(w_E: torch.Tensor, x_PKN: torch.Tensor) -> torch.Tensor:
        """The read experts' row blocks w_E (E * parts, O / parts, K) times x (R * parts, K, N) -> (R, O, N): one
        batched GEMM per run of experts."""
        out = x_PKN.new_empty(R * parts, w_E.shape[1], N)
        off = 0
        for lo, hi in spans:
            n = (hi - lo) * parts
            torch.bmm(w_E[lo * parts: hi * parts], x_PKN[off: off + n], out=out[off: off + n])
            off += n
        return out.view(R, -1, N)

    w13 = ex.w13.tensor.view(E * parts, 2 * I // parts, D)
    gate_RIN, up_RIN = per_expert(w13, x_ND.t().expand(R * parts, D, N)).split(I, dim=1)
    # each token's gate weight (zero for an expert it did not pick) scales the expert's hidden state: the gated
    # sum over experts is then a plain sum of the down projections
    g_EN = weights_NK.new_zeros(N, E).scatter_(1, experts_NK, weights_NK).t()
    g_RN = g_EN if R == E else torch.cat([g_EN[lo:hi] for lo, hi in spans])
    # h (R, parts, I, N): each expert's hidden state once per row block of its down projection, column-major
    h = x_ND.new_empty(R, parts, N, I).transpose(2, 3)
    torch.mul(F.silu(gate_RIN) * g_RN.unsqueeze(1).to(gate_RIN.dtype), up_RIN, out=h[:, 0])
    if parts > 1:
        h[:, 1:] = h[:, :1]
    y = per_expert(ex.w2.view(E * parts, D // parts, I), h.view(R * parts, I, N))
    return out_ND.add_(y.sum(dim=0).t())


class ExpertsKernel:
    """The routed experts of a few tokens at CPU inference, by the path measured fastest for that many
    tokens: "loop" (one token: `experts_loop`), "dense" (`experts_dense`), or "grouped" (the reference)."""

    def __init__(self, choice: dict[int, str], matmul: Callable):
        self.choice = choice  # token bucket -> path
        self.matmul = matmul  # the calibrated product for one row through an expert's matrices

    def path(self, ex: Experts, x_ND: torch.Tensor) -> str:
        N = x_ND.shape[0]
        if ex.w13 is None or not ex.w13.intact() or x_ND.device.type != "cpu":
            return "grouped"
        return self.choice.get(bucket(N, EXPERT_TOKEN_BUCKETS), "grouped")

    def __call__(self, ex: Experts, x_ND, weights_NK, experts_NK, out_ND) -> torch.Tensor | None:
        """-> out_ND plus the tokens' gated routed outputs, or None to leave them to the reference."""
        path = self.path(ex, x_ND)
        if path == "loop" and x_ND.shape[0] == 1:
            return experts_loop(ex, x_ND, weights_NK, experts_NK, out_ND, self.matmul)
        if path == "dense":
            spans = expert_spans(experts_NK.flatten().tolist(), DENSE_GAP_BYTES // ex.expert_bytes)
            if len(spans) <= DENSE_MAX_SPANS:
                return experts_dense(ex, x_ND, weights_NK, experts_NK, out_ND, spans)
        return None


# ---- calibration -------------------------------------------------------------------------------------

def cache_path() -> str:
    root = os.environ.get("DSV3_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv3")
    return os.path.join(root, "cpu_kernels.json")


def _cpuinfo() -> dict[str, str]:
    info = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
# part of the cache key: raise it when a candidate changes, so that choices timed on the old code are not reused
KERNELS_VERSION = 3


def machine_key(dtype: torch.dtype) -> str:
    """What the timings depend on: the CPU (model name, family and model, vector and matrix flags), the torch
    build, the number of threads, the dtype and the candidates' code."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return " | ".join([
        info.get("model name") or platform.processor() or platform.machine(),
        f"family {info.get('cpu family', '?')} model {info.get('model', '?')}",
        "+".join(f for f in FLAGS if f in flags) or "-",
        f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", str(dtype).removeprefix("torch."),
        f"kernels v{KERNELS_VERSION}"])


def llc_bytes() -> int:
    """The largest cache's size (sysfs), 32 MiB if unknown."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 32 << 20


def _pool(tensors: list[torch.Tensor], min_bytes: int, max_copies: int = 64) -> list[torch.Tensor]:
    """The model's own tensors of one shape, plus random copies until they exceed min_bytes: each timed call
    then reads a matrix that is not in cache, as in a decode step. (At most max_copies: small matrices cost
    their call overhead more than their bytes, and a calibration should take seconds.)"""
    pool = list(tensors)
    nbytes = sum(t.nbytes for t in pool)
    proto = pool[0]
    while nbytes < min_bytes and len(pool) < max_copies:
        pool.append(torch.randn_like(proto).mul_(0.02))
        nbytes += proto.nbytes
    return pool


def _fastest(candidates: dict[str, Callable[[torch.Tensor], object]], pool: list, passes: int = 3) -> str:
    """Time each candidate over the pool (calls on successive pool members), in turns, `passes` times; the
    reference (the first candidate) unless another's best pass is MIN_GAIN faster."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm up: first-call allocations, thread pool
        fn(pool[0])
    calls = pool * -(-16 // len(pool))  # 16 calls a pass at least (a pool cycled in order stays as cold)
    for _ in range(passes):
        for name, fn in candidates.items():
            t = time.perf_counter()
            for operand in calls:
                fn(operand)
            times[name].append(time.perf_counter() - t)
    best = {name: min(ts) for name, ts in times.items()}
    ref = next(iter(candidates))
    winner = min(best, key=best.get)
    return winner if best[winner] < (1 - MIN_GAIN) * best[ref] else ref


def _weight_modules(model: nn.Module):
    """(module, weight) for every plain matrix product an inference step runs: Linear layers and packed pairs."""
    for module in model.modules():
        if isinstance(module, Linear) and not module.is_fp8:
            yield module, module.weight
        for name in ("w13", "wqkv_a"):
            packed = getattr(module, name, None)
            if isinstance(packed, PackedWeights) and packed.intact() and packed.tensor.dim() == 2:
                yield packed, packed.tensor


class Calibration:
    """The choices of one machine and dtype: {"matmul": {"OxK": {rows: name}}, "experts": {"ExIxD": {tokens:
    path}}}, loaded from and saved to the cache file."""

    def __init__(self, key: str, path: str | None = None):
        self.key, self.path = key, path or cache_path()
        self.matmul: dict[str, dict[str, str]] = {}
        self.experts: dict[str, dict[str, str]] = {}
        self.measured = 0  # choices timed by this process (0: all came from the cache)
        self.seconds = 0.0
        try:
            with open(self.path, encoding="utf-8") as f:
                entry = json.load(f).get(key, {})
            self.matmul, self.experts = dict(entry.get("matmul", {})), dict(entry.get("experts", {}))
        except (OSError, ValueError, AttributeError):
            pass  # no cache yet, or an unreadable one: measure again

    def save(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[self.key] = {"matmul": self.matmul, "experts": self.experts}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_json(self.path, data)
        except OSError as e:  # a read-only home: calibrate again next time
            log.warning("could not save the CPU kernel calibration to %s: %s", self.path, e)

    def matmul_choice(self, weights: list[torch.Tensor], rows_buckets: list[int], pool_bytes: int) -> dict[int, str]:
        shape = tuple(weights[0].shape)
        known = self.matmul.setdefault(f"{shape[0]}x{shape[1]}", {})
        pool = None
        for rows in rows_buckets:
            if str(rows) in known:
                continue
            pool = pool or _pool(weights, pool_bytes)
            x = torch.randn(rows, shape[1], dtype=weights[0].dtype)
            cands = {name: (lambda w, fn=MATMULS[name]: fn(x, w)) for name in matmul_candidates(shape, rows)}
            known[str(rows)] = _fastest(cands, pool)
            self.measured += 1
        return {int(r): name for r, name in known.items()}

    def experts_choice(self, experts: list[Experts], topk: int, matmul: Callable, token_buckets: list[int],
                       pool_bytes: int) -> dict[int, str]:
        ex0 = experts[0]
        known = self.experts.setdefault(f"{ex0.n_experts}x{ex0.inter_dim}x{ex0.dim} top{topk}", {})
        pool = None
        gen = torch.Generator().manual_seed(0)
        for n in token_buckets:
            if str(n) in known:
                continue
            if pool is None:
                pool = list(experts)
                while sum(3 * e.expert_bytes * e.n_experts for e in pool) < pool_bytes and len(pool) < 64:
                    pool.append(_copy_experts(ex0))
            x = torch.randn(n, ex0.dim, dtype=ex0.w2.dtype)
            picks = torch.stack([torch.randperm(ex0.n_experts, generator=gen)[:topk] for _ in range(n)])
            gates = torch.rand(n, topk, generator=gen)
            out = torch.zeros_like(x)
            kernels = {"grouped": None, "loop": "loop", "dense": "dense"}
            cands = {}
            for name, path in kernels.items():
                if path == "loop" and n != 1:
                    continue
                kernel = ExpertsKernel({b: path or "grouped" for b in EXPERT_TOKEN_BUCKETS}, matmul)
                cands[name] = (lambda ex, k=kernel: _run_experts(k, ex, x, gates, picks, out))
            known[str(n)] = _fastest(cands, pool)
            self.measured += 1
        return {int(n): path for n, path in known.items()}


def _copy_experts(ex: Experts) -> Experts:
    new = Experts(ex.n_experts, ex.dim, ex.inter_dim).to(ex.w2.dtype)
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, 0.02)
    new.pack_projections()
    return new


def _run_experts(kernel: ExpertsKernel, ex: Experts, x, gates, picks, out) -> torch.Tensor:
    y = kernel(ex, x, gates, picks, out)
    if y is None:  # the reference: dispatch, grouped GEMMs, combine (MoE.routed's own path)
        x_SD, token_S, weight_S, counts_E = _dispatch(x, gates, picks, ex.n_experts)
        y = out.index_add_(0, token_S, ex(x_SD, counts_E, weight_S).to(out.dtype))
    return y


def _dispatch(x, gates, picks, n_experts):
    expert_S = picks.flatten()
    order_S = expert_S.argsort(stable=True)
    return (x.index_select(0, order_S // picks.shape[1]), order_S // picks.shape[1],
            gates.flatten().index_select(0, order_S), torch.bincount(expert_S, minlength=n_experts))


@torch.inference_mode()
def install(model: nn.Module, max_rows: int, calibration: Calibration | None = None,
            progress: Callable[[str], None] | None = None) -> Calibration:
    """Time the candidates for every weight shape of `model` (cached per machine) and install the fastest on
    its modules. max_rows: the most rows a decode step feeds (sequences x tokens each)."""
    t0 = time.perf_counter()
    dtype = next(model.parameters()).dtype
    cal = calibration or Calibration(machine_key(dtype))
    pool_bytes = 2 * llc_bytes()
    rows_buckets = [b for b in ROW_BUCKETS if b <= max(1, min(max_rows, MAX_ROWS))]
    if bucket(min(max_rows, MAX_ROWS), ROW_BUCKETS) not in rows_buckets:
        rows_buckets.append(bucket(min(max_rows, MAX_ROWS), ROW_BUCKETS))
    by_shape: dict[tuple, list] = {}
    for module, weight in _weight_modules(model):
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous():
            by_shape.setdefault((tuple(weight.shape), weight.dtype), []).append((module, weight))
    todo = sum(1 for (shape, _), _ in by_shape.items() for r in rows_buckets
               if str(r) not in cal.matmul.get(f"{shape[0]}x{shape[1]}", {}))
    if todo and progress is not None:
        progress(f"calibrating CPU matrix products for this machine ({todo} shapes x rows; cached in {cal.path})")
    kernels: dict[tuple, MatmulKernel] = {}
    for (shape, _), entries in by_shape.items():
        choice = cal.matmul_choice([w for _, w in entries], rows_buckets, pool_bytes)
        kernels[shape] = MatmulKernel(shape, choice)
        for module, _ in entries:
            module.kernel = kernels[shape]
    experts = [m for m in model.modules() if isinstance(m, Experts) and not m.is_fp8 and m.w13 is not None
               and m.w13.intact() and m.w2.device.type == "cpu" and m.w2.dtype == torch.float32]
    groups: dict[tuple, list[Experts]] = {}
    for ex in experts:
        groups.setdefault((ex.n_experts, ex.inter_dim, ex.dim), []).append(ex)
    tokens = [b for b in EXPERT_TOKEN_BUCKETS if b <= max(1, max_rows)]
    for (_, I, D), group in groups.items():
        w13_shape = (2 * I, D)
        k13 = kernels.get(w13_shape) or MatmulKernel(w13_shape, cal.matmul_choice(
            [group[0].w13.tensor[0]], [1], pool_bytes))
        k2 = kernels.get((D, I)) or MatmulKernel((D, I), cal.matmul_choice([group[0].w2[0]], [1], pool_bytes))
        matmul = _ByShape({w13_shape: k13, (D, I): k2})
        topk = min(model.config.num_experts_per_tok, group[0].n_experts)
        kernel = ExpertsKernel(cal.experts_choice(group, topk, matmul, tokens, pool_bytes), matmul)
        for ex in group:
            ex.kernel = kernel
    cal.seconds = time.perf_counter() - t0
    if cal.measured:
        cal.save()
        if progress is not None:
            progress(f"calibrated {cal.measured} choices in {cal.seconds:.1f}s")
    return cal


class _ByShape:
    """A product that picks its MatmulKernel by the weight's shape."""

    def __init__(self, kernels: dict[tuple, MatmulKernel]):
        self.kernels = kernels

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        k = self.kernels.get(tuple(w.shape))
        return k(x, w) if k is not None else F.linear(x, w)


def uninstall(model: nn.Module) -> None:
    """Back to the reference path everywhere."""
    for module in model.modules():
        if hasattr(module, "kernel"):
            module.kernel = None
        for name in ("w13", "wqkv_a"):
            packed = getattr(module, name, None)
            if isinstance(packed, PackedWeights):
                packed.kernel = None


def describe(cal: Calibration) -> str:
    """One line per weight shape: the layout chosen per row bucket."""
    lines = [f"{shape}: " + ", ".join(f"{r} rows {n}" for r, n in sorted(c.items(), key=lambda kv: int(kv[0])))
             for shape, c in cal.matmul.items()]
    lines += [f"experts {shape}: " + ", ".join(f"{n} tokens {p}" for n, p in sorted(c.items(), key=lambda kv: int(kv[0])))
              for shape, c in cal.experts.items()]
    return "\n".join(lines)


