"""The scheduling policy, in pure Python (no torch): which sequences run in the next step, and which cache
blocks hold their tokens. Unit-tested on its own.

The latent cache is cut into blocks of `block_size` token positions; a sequence owns a list of blocks (its
block table) covering every position it has computed or is about to. Each step is either a prefill (new
sequences, their whole prompt at once) or a decode (every running sequence advances by one position, or by
`lookahead` positions when speculative decoding verifies drafts). When a decode step finds no free block,
the most recently admitted sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed from its tokens when there is room again.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request as the engine sees it: its tokens so far and where their latents live."""
    seq_id: int
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    params: Any = None  # the request's SamplingParams (opaque here)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # positions whose latents are in the cache (main model)
    num_mtp_cached: int = 0  # the same for the MTP module's cache
    draft: list[int] = field(default_factory=list)  # speculative tokens proposed for the next step
    finish_reason: str | None = None
    arrival: int = 0  # admission order, for preemption

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class BlockManager:
    """Hands out cache blocks. Block 0 .. num_blocks-1; a free list, nothing else."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token ({num_blocks=} {block_size=})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def can_grow(self, seq: Sequence, num_positions: int) -> bool:
        return self.blocks_for(num_positions) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_positions: int) -> None:
        """Make seq's block table cover positions [0, num_positions)."""
        need = self.blocks_for(num_positions) - len(seq.block_table)
        assert need <= len(self.free), f"{need=} free={len(self.free)}"
        seq.block_table.extend(self.free.popleft() for _ in range(max(need, 0)))

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = seq.num_mtp_cached = 0

    @property
    def num_free(self) -> int:
        return len(self.free)


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, lookahead: int = 1):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"{max_num_seqs=} and {max_num_batched_tokens=} must be >= 1")
        self.blocks = BlockManager(num_blocks, block_size)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.lookahead = lookahead  # positions a decode step may write per sequence
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    def check_fits(self, num_tokens: int) -> None:
        """A request that could never run (longer than the context, or than the whole cache) is an error."""
        if num_tokens > self.max_model_len:
            raise ValueError(f"the request needs {num_tokens} positions but the context is {self.max_model_len}")
        if self.blocks.blocks_for(min(num_tokens + self.lookahead, self.max_model_len)) > self.blocks.num_blocks:
            raise ValueError(f"the request needs {num_tokens} positions but the whole cache holds "
                             f"{self.blocks.num_blocks * self.blocks.block_size}")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_tokens)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """-> (the sequences of the next step, whether it is a prefill). Prefill first: admit waiting
        sequences while slots, the token budget and free blocks allow."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if batch and tokens + n > self.max_num_batched_tokens:
                break
            span = self._span(n)  # a speculative prefill drafts at the positions after the prompt
            if not self.blocks.can_grow(seq, span):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, span)
            seq.status, seq.arrival = Status.RUNNING, next(self._arrivals)
            batch.append(seq)
            tokens += n
        if batch:
            self.running.extend(batch)
            return batch, True
        # decode: each running sequence feeds its last token (and drafts) at positions num_tokens - 1 onwards
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING:
                continue  # preempted below
            need = self._span(seq.num_tokens)
            while not self.blocks.can_grow(seq, need):
                victim = max((s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.arrival)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, need)
        self.running = [s for s in self.running if s.status is Status.RUNNING]
        return list(self.running), False

    def _span(self, num_tokens: int) -> int:
        """Positions a step of a sequence with num_tokens tokens may write: up to its last token plus the
        lookahead, but none at or past the context's end (drafts there are cut: the sequence stops first)."""
        return min(num_tokens - 1 + self.lookahead, self.max_model_len)

    def preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.draft = []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.blocks.release(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (a client went away)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq, "abort")
