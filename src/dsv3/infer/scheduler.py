"""The scheduling policy, in pure Python (no torch): which sequences run in the next step, and which cache
blocks hold their tokens. Unit-tested on its own.

The latent cache is cut into blocks of `block_size` token positions; a sequence owns a list of blocks (its
block table) covering every position it has computed or is about to. A step feeds each of its sequences
some tokens: a decoding sequence its last token (and its drafts, when speculative decoding verifies them, up to
`lookahead` positions), a new sequence its prompt, less any prefix already in the cache. A step feeds at most
`max_num_batched_tokens` tokens in all: a longer prompt is computed in chunks over several steps, alongside the
decoding sequences, so that no step's activations and attention masks grow with the whole prompt and no
decoding sequence waits for one. When a decoding sequence finds no free block, the most recently admitted
sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed from its tokens when there is room again (from its cached blocks, if still there).

Prefix caching (`BlockManager`): full blocks stay in the cache after their sequence ends, found again by a
hash of the tokens up to their end; blocks are shared by reference count, and only full, final blocks are
ever shared, so no sequence writes to a block another one reads.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
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
    prefix_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first full blocks, as computed
    num_committed: int = 0  # its first blocks that are registered in the prefix cache (or were found there)
    cache_salt: str | None = None  # mixed into its keys: only requests with the same salt share its blocks
    reuse_prefix: bool = True  # may start from cached blocks (not while its prompt's logprobs are wanted)
    num_scheduled: int = 0  # tokens the step being run feeds from token_ids[num_cached:] (before any drafts)
    num_prefix_hit: int | None = None  # positions found in the prefix cache at its first admission

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class BlockManager:
    """Hands out cache blocks and, with prefix caching, remembers what full blocks hold.

    Blocks 0 .. num_blocks-1, each with a reference count: the sequences whose block tables hold it. With
    `prefix_caching`, a full block whose rows are final is registered under a key: a SHA-256 of its tokens,
    chained through the key of the block before it, so equal keys mean equal token prefixes (a cryptographic
    hash, as vLLM moved to: a server's users must not be able to forge a collision and read another's
    latents). A new sequence whose tokens begin with registered blocks takes them, shared, instead of
    computing them again: a chat's next turn, or requests with one system prompt. A registered block nobody
    holds stays cached, evicted least recently used first, and only when no never-used block is left.

    `tail`: tokens after a block that its rows also depend on, so its key covers them too. 1 when the cache
    holds the MTP module's rows: the module's row at position p is computed from token p + 1.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, tail: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token ({num_blocks=} {block_size=})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching, self.tail = prefix_caching, tail
        self.free: deque[int] = deque(range(num_blocks))  # never registered (or evicted): contents unknown
        self.refs = [0] * num_blocks
        self.registry: dict[bytes, int] = {}  # key -> the block that holds those tokens' rows
        self.key_of: dict[int, bytes] = {}  # the inverse, for registered blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered, held by no one; oldest first

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never used, or cached but held by no one."""
        return len(self.free) + len(self.evictable)

    def _key(self, seq: Sequence, b: int) -> bytes:
        """The key of seq's block b (its tokens, and `tail` more, must be known), computed once per sequence:
        a key depends only on the tokens up to it, and a sequence's tokens only grow."""
        keys = seq.prefix_keys
        while len(keys) <= b:
            if keys:
                parent = keys[-1]
            else:  # the chain's root: a salt keeps one tenant's blocks out of another's reach
                parent = hashlib.sha256(seq.cache_salt.encode()).digest() if seq.cache_salt else b""
            lo = len(keys) * self.block_size
            tokens = array("q", seq.token_ids[lo: lo + self.block_size + self.tail])
            keys.append(hashlib.sha256(parent + tokens.tobytes()).digest())
        return keys[b]

    def match(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """The registered blocks seq's tokens begin with, as (block, key): at most enough to leave its last
        token to compute (a step must feed something to sample from)."""
        if not self.prefix_caching:
            return []
        hits = []
        for b in range((seq.num_tokens - 1) // self.block_size):  # also keeps every key's tail tokens known
            key = self._key(seq, b)
            block = self.registry.get(key)
            if block is None:
                break
            hits.append((block, key))
        return hits

    def can_allocate(self, num_positions: int, hits: list[tuple[int, bytes]] = ()) -> bool:
        """Whether a sequence starting with the cached blocks `hits` can get blocks for num_positions."""
        new = self.blocks_for(num_positions) - len(hits)
        return new <= self.num_free - sum(1 for b, _ in hits if b in self.evictable)

    def allocate(self, seq: Sequence, num_positions: int, hits: list[tuple[int, bytes]] = ()) -> None:
        """Give an unplaced sequence the cached blocks `hits` (their positions count as computed, for the MTP
        module's rows too), then fresh blocks to cover num_positions."""
        assert not seq.block_table, "allocate() places a sequence that holds no blocks"
        for block, _ in hits:
            self.evictable.pop(block, None)
            self.refs[block] += 1
        seq.block_table = [b for b, _ in hits]
        seq.num_committed = len(hits)
        seq.num_cached = seq.num_mtp_cached = len(hits) * self.block_size
        self.grow(seq, num_positions)

    def can_grow(self, seq: Sequence, num_positions: int) -> bool:
        return self.blocks_for(num_positions) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_positions: int) -> None:
        """Make seq's block table cover positions [0, num_positions)."""
        need = self.blocks_for(num_positions) - len(seq.block_table)
        assert need <= self.num_free, f"{need=} free={self.num_free}"
        for _ in range(max(need, 0)):
            if self.free:
                block = self.free.popleft()
            else:  # evict the least recently used cached block: its rows are about to be overwritten
                block, _ = self.evictable.popitem(last=False)
                del self.registry[self.key_of.pop(block)]
            self.refs[block] = 1
            seq.block_table.append(block)

    def commit(self, seq: Sequence) -> None:
        """Register seq's blocks that are now full of final rows (after a step computed them). Rows past
        num_cached may be drafts that lose; a block counts once every position in it is confirmed and, with
        a tail, the tokens after it are known."""
        if not self.prefix_caching:
            return
        done = min(seq.num_cached, seq.num_mtp_cached) if self.tail else seq.num_cached
        done = min(done, seq.num_tokens - self.tail)
        for b in range(seq.num_committed, min(done // self.block_size, len(seq.block_table))):
            key = self._key(seq, b)
            if key not in self.registry:  # else an equal block is cached already (computed beside this one)
                block = seq.block_table[b]
                self.registry[key], self.key_of[block] = block, key
            seq.num_committed = b + 1

    def forget_prefixes(self) -> None:
        """Drop every registered prefix (the weights that computed their rows have changed): blocks held by no
        one become free, blocks still held stay with their sequences but are no longer found by others."""
        for block in self.evictable:
            self.free.append(block)
        self.evictable.clear()
        self.registry.clear()
        self.key_of.clear()

    def release(self, seq: Sequence) -> None:
        """seq lets go of its blocks. Registered ones nobody else holds stay cached, its last blocks first in
        line for eviction (a prefix's first blocks are the likeliest to be asked for again)."""
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        seq.block_table, seq.num_committed = [], 0
        seq.num_cached = seq.num_mtp_cached = 0


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, lookahead: int = 1, prefix_caching: bool = False, tail: int = 0):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"{max_num_seqs=} and {max_num_batched_tokens=} must be >= 1")
        if max_num_batched_tokens < max_num_seqs * lookahead:  # else decodes alone could use up every step
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be at least max_num_seqs x the "
                             f"tokens a decoding sequence may feed per step ({max_num_seqs} x {lookahead}), so that "
                             "prompts always get part of a step")
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching, tail)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.lookahead = lookahead  # positions a decode step may write per sequence
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self.num_lookup_tokens = self.num_hit_tokens = 0  # prefix cache: positions looked up, and found

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
        """-> (the sequences of the next step, whether any of them computes prompt tokens); each sequence's
        `num_scheduled` says how many of its tokens the step feeds. Within the token budget, in this order:
        1. every running sequence that is decoding advances by one position (plus its drafts); its blocks grow
           first, and if none is free the most recently admitted sequence is preempted;
        2. prompts being prefilled in chunks get their next chunk;
        3. waiting sequences are admitted while slots, the budget and free blocks allow, each starting from
           the blocks of its prefix found in the prefix cache and computing the rest (in chunks, if long).
        So a long prompt never stalls the sequences already decoding: they advance in the same steps as its
        chunks (as vLLM schedules)."""
        budget = self.max_num_batched_tokens
        batch: list[Sequence] = []
        for seq in sorted(self.running, key=lambda s: s.arrival):  # 1. decodes, oldest first
            if seq.status is not Status.RUNNING or seq.num_tokens - seq.num_cached != 1:
                continue  # preempted below, or prefilling
            need = self._span(seq.num_tokens)
            while not self.blocks.can_grow(seq, need):
                victim = max((s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.arrival)
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, need)
                seq.num_scheduled = 1
                batch.append(seq)
        # (a victim is always newer than the sequence growing, so none of those already in the batch)
        self.running = [s for s in self.running if s.status is Status.RUNNING]
        budget -= sum(1 + len(s.draft) for s in batch)
        prefilling = False
        for seq in self.running:  # 2. prompts computed in chunks: their next chunk
            pending = seq.num_tokens - seq.num_cached
            if pending > 1 and budget > 0:
                seq.num_scheduled = min(pending, budget)
                budget -= seq.num_scheduled
                batch.append(seq)
                prefilling = True
        admitted: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) + len(admitted) < self.max_num_seqs:  # 3.
            seq = self.waiting[0]
            hits = self.blocks.match(seq) if seq.reuse_prefix else []
            n = seq.num_tokens - len(hits) * self.blocks.block_size  # tokens to compute
            span = self._span(seq.num_tokens)  # a speculative prefill drafts at the positions after the prompt
            if not self.blocks.can_allocate(span, hits):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, span, hits)
            seq.status, seq.arrival = Status.RUNNING, next(self._arrivals)
            seq.num_scheduled = min(n, budget)
            budget -= seq.num_scheduled
            if seq.num_prefix_hit is None:  # its first admission (not a preempted one's return)
                seq.num_prefix_hit = seq.num_cached
                if self.blocks.prefix_caching and seq.reuse_prefix:
                    self.num_lookup_tokens += seq.num_tokens
                    self.num_hit_tokens += seq.num_cached
            admitted.append(seq)
            batch.append(seq)
        self.running.extend(admitted)
        return batch, prefilling or bool(admitted)

    def _span(self, num_tokens: int) -> int:
        """Positions a step of a sequence with num_tokens tokens may write: up to its last token plus the
        lookahead, but none at or past the context's end (drafts there are cut: the sequence stops first)."""
        return min(num_tokens - 1 + self.lookahead, self.max_model_len)

    def commit(self, seqs: list[Sequence]) -> None:
        """After a step: the blocks it filled with final rows become reusable prefixes."""
        for seq in seqs:
            self.blocks.commit(seq)

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
