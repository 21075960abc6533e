"""CUDA graphs for decode steps.

A decode step of a small batch is launch-bound on a GPU: a few dozen kernels per layer, each with a few
microseconds of work, issued one by one from Python. A CUDA graph records a step's kernels once and replays
them with a single launch. Graphs need fixed shapes and fixed addresses, so a step is run at a *bucket*:

- the batch padded to the next batch bucket (1, 2, 4, 8, ... up to max_num_seqs). A padding row decodes token
  0 at position 0 and writes its latent to the cache's `scratch_slot`, a row no sequence owns;
- the context padded to the next context bucket (powers of two up to 4096, then multiples of 4096, up to
  MAX_CAPTURE_CONTEXT; longer contexts decode eagerly). Keys past a sequence's position are masked; the padded
  ones read the scratch slot.

Each bucket owns its static inputs (token ids, positions, cache slots, slot table) and its captured graph; a
step copies its inputs in, replays, and copies the logits out. Buckets are captured on first use and share one
memory pool.

`StaticDecode.forward` is plain PyTorch and runs anywhere: on a CPU, tests hold the padded fixed-shape step to
the engine's ordinary decode (same tokens); on CUDA it is what gets captured. Whether a model can be captured
is decided in one place, `capture_blocker`; the warm-up before a capture runs with CUDA's sync debug mode set
to error (a host read raises there, not inside the capture), one replay is checked against the eager step, and
a capture that fails anyway falls back to eager decode with a warning. The eager path
(`LLM(cuda_graphs=False)`, `--enforce-eager`) stays the reference.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..model.moe import Experts
from .model_runner import ModelRunner, StepBatch

CONTEXT_STEP = 4096  # context buckets: powers of two up to this, then its multiples
MAX_CAPTURE_CONTEXT = 8192  # longer contexts decode eagerly (vLLM's max_seq_len_to_capture default)


def batch_bucket(n: int, max_batch: int) -> int:
    """The padded batch size a decode of n sequences runs at."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch) if n <= max_batch else n


def context_bucket(s: int, max_context: int) -> int:
    """The padded context length a step whose longest sequence holds s positions runs at."""
    if s <= CONTEXT_STEP:
        c = 16
        while c < s:
            c *= 2
    else:
        c = -(-s // CONTEXT_STEP) * CONTEXT_STEP
    return max(s, min(c, max_context))


def capture_blocker(runner: ModelRunner) -> str | None:
    """Why this model's decode step cannot be captured in a CUDA graph, or None if it can. A graph may not
    synchronise with the host; the routed experts do wherever they fall back to a loop over experts."""
    model = runner.model
    if runner.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {runner.device.type}"
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if any(e.is_fp8 for e in experts):
        return "FP8 routed experts run as a loop over experts (the host reads the routing)"
    if experts:
        major = torch.cuda.get_device_capability(runner.device)[0]
        if not hasattr(F, "grouped_mm") or model.dtype != torch.bfloat16 or major not in (9, 10):
            return ("the routed experts' grouped GEMM has a graph-safe CUDA kernel only in bfloat16 on sm90/sm100 "
                    f"(this model: {model.dtype}, compute capability {major}.x)")
    return None


class StaticDecode:
    """One bucket: fixed-shape inputs on the model's device, the step that reads them, and (on CUDA) its
    graph."""

    def __init__(self, runner: ModelRunner, batch_size: int, context: int):
        self.runner = runner
        self.batch_size, self.context = batch_size, context
        dev, scratch = runner.device, runner.cache.scratch_slot
        self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.slots = torch.full((batch_size,), scratch, dtype=torch.long, device=dev)
        self.slot_table = torch.full((batch_size, context), scratch, dtype=torch.long, device=dev)
        self.q_index = torch.arange(batch_size, device=dev).view(batch_size, 1)  # every row is its own sequence
        self.q_valid = torch.ones(batch_size, 1, dtype=torch.bool, device=dev)
        self.key_positions = torch.arange(context, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the captured step's output

    def load(self, batch: StepBatch) -> None:
        """Copy a decode step's inputs (built on the CPU) into the static ones, padding the rest on the device."""
        B, S = batch.slot_table.shape
        scratch = self.runner.cache.scratch_slot
        for dst, src, pad in ((self.input_ids, batch.input_ids, 0), (self.positions, batch.positions, 0),
                              (self.slots, batch.slots, scratch)):
            dst[:B].copy_(src, non_blocking=True)
            dst[B:].fill_(pad)
        self.slot_table.fill_(scratch)
        self.slot_table[:B, :S].copy_(batch.slot_table, non_blocking=True)

    def forward(self) -> torch.Tensor:
        """The padded step on the static inputs -> logits (batch_size, vocab) float32."""
        B = self.batch_size
        # nothing here may copy from the host: a captured graph would replay the copy of a stale host buffer
        mask = self.key_positions <= self.positions[:, None]  # keys past each query's position, padding included
        batch = StepBatch(input_ids=self.input_ids, positions=self.positions, slots=self.slots,
                          q_index=self.q_index, q_valid=self.q_valid, slot_table=self.slot_table,
                          mask=mask.view(B, 1, 1, self.context), feed_lens=[1] * B, uniform=True)
        return self.runner.logits(self.runner.forward(batch))

    def capture(self, pool) -> None:
        """Warm up, capture, and check one replay against the eager step (on the padding inputs, which touch
        only the scratch slot). Raises if the step cannot be captured."""
        dev = self.runner.device
        with torch.cuda.device(dev):
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")  # a host sync in the step raises here, before any capture
            try:
                with torch.cuda.stream(stream):  # warm up off the capture (cuBLAS handles, lazy inits)
                    for _ in range(2):
                        expected = self.forward()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            previous = torch.cuda.current_stream(dev)
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    self.logits = self.forward()
            finally:
                torch.cuda.set_stream(previous)  # graph's context manager leaves the capture stream set if it fails
            graph.replay()
            # bf16 scatter-adds are not bitwise reproducible: compare loosely (an empty graph would be far off)
            if not torch.allclose(self.logits, expected, rtol=0.05, atol=0.05):
                raise RuntimeError("the replayed graph's logits differ from the eager step's")
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        with torch.cuda.device(self.runner.device):
            self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Plain decode steps (one new token per sequence) at fixed shapes: captured CUDA graphs when `capture`
    (and the model allows it), the same padded steps run eagerly otherwise (what the CPU tests exercise)."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_context: int, capture: bool = True):
        self.runner = runner
        # longer contexts decode eagerly: their steps are not launch-bound, and every bucket holds memory
        self.max_batch, self.max_context = max_batch, min(max_context, MAX_CAPTURE_CONTEXT)
        self.capture = capture
        self.broken = False  # a capture failed: stop using fixed-shape steps
        self.buckets: dict[tuple[int, int], StaticDecode] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def num_graphs(self) -> int:
        return sum(s.graph is not None for s in self.buckets.values())

    def fits(self, num_seqs: int, context: int) -> bool:
        """Whether a decode of num_seqs sequences whose longest holds `context` positions runs here."""
        return num_seqs <= self.max_batch and context <= self.max_context

    def decode(self, batch: StepBatch) -> torch.Tensor:
        """A decode step (built on the CPU by build_batch: one fed token per sequence) -> logits (B, vocab)."""
        B, S = batch.slot_table.shape
        key = (batch_bucket(B, self.max_batch), context_bucket(S, self.max_context))
        step = self.buckets.get(key)
        if step is None:
            try:
                step = StaticDecode(self.runner, *key)
                if self.capture:
                    step.capture(self.pool)
            except Exception as e:  # noqa: BLE001 - any capture failure leaves eager decode correct
                if not self.capture:
                    raise
                warnings.warn(f"CUDA graph capture failed, decoding eagerly from now on: {e}", stacklevel=2)
                self.capture, self.broken = False, True  # the engine drops back to its dynamic steps
                self.buckets.clear()
                step = StaticDecode(self.runner, *key)  # finish this step padded, eagerly
            self.buckets[key] = step
        step.load(batch)
        return step.run()[:B].clone()
