"""Prefix caching: the block manager's sharing, reference counts and eviction on their own (no torch), then
the engine with it on against the engine with it off: the same tokens and log-probabilities, plain and
speculative, across a chat's turns, shared prefixes and preemption."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer import LLM, SamplingParams
from dsv3.infer.scheduler import BlockManager, Scheduler, Sequence

from conftest import random_model, rel_err, tiny_config


def seq(i, tokens):
    return Sequence(seq_id=i, token_ids=list(tokens), num_prompt_tokens=len(tokens))


def computed(s: Sequence, sampled: int = 99) -> None:
    """What a step does to a sequence: every fed position computed (the MTP module's too), a token sampled."""
    s.num_cached = s.num_mtp_cached = s.num_tokens
    s.token_ids.append(sampled)


def committed(m: BlockManager, tokens, positions: int, sampled: int = 99) -> Sequence:
    """A sequence placed in m's blocks for `positions`, its tokens computed, and its full blocks committed."""
    s = seq(0, tokens)
    m.allocate(s, positions)
    computed(s, sampled)
    m.commit(s)
    return s


# ---- the block manager -------------------------------------------------------------------------------------

def test_full_final_blocks_are_shared_by_a_later_sequence_with_the_same_prefix():
    s = Scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_num_batched_tokens=100, max_model_len=64,
                  prefix_caching=True)
    a = seq(0, range(10))
    s.add(a)
    assert s.schedule()[0] == [a] and a.num_cached == 0  # nothing cached yet
    computed(a)
    s.commit([a])
    assert a.num_committed == 2  # positions 0-7 fill two blocks; the third holds 8, 9 and is not full
    b = seq(1, [*range(9), 55, 56])  # shares positions 0-8 with a: two full blocks
    c = seq(2, [0, 1, 2, 7, 8])  # differs inside the first block: nothing
    s.add(b), s.add(c)
    batch, prefill = s.schedule()
    assert prefill and batch == [a, b, c]  # a decodes alongside the new prompts
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached == b.num_mtp_cached == 8
    assert b.block_table[2] not in a.block_table and b.num_prefix_hit == 8
    assert c.num_cached == 0 and not set(c.block_table) & set(a.block_table)
    assert [s.blocks.refs[x] for x in a.block_table] == [2, 2, 1]
    assert s.num_hit_tokens == 8 and s.num_lookup_tokens == 10 + 11 + 5


def test_a_hit_leaves_the_last_token_to_compute():
    m = BlockManager(num_blocks=8, block_size=4, prefix_caching=True)
    a = committed(m, range(8), 8)
    assert a.num_committed == 2
    # the same 8 tokens again: the second block would leave nothing to feed, so only the first is taken
    assert [blk for blk, _ in m.match(seq(1, range(8)))] == a.block_table[:1]
    assert [blk for blk, _ in m.match(seq(1, range(9)))] == a.block_table[:2]


def test_blocks_stay_cached_after_release_and_are_evicted_lru_only_when_needed():
    m = BlockManager(num_blocks=4, block_size=2, prefix_caching=True)
    a = committed(m, range(5), 5)
    cached = a.block_table[:2]
    m.release(a)
    assert m.num_free == 4 and list(m.evictable) == [cached[1], cached[0]]  # the prefix's head evicted last
    b = seq(1, [*range(4), 9])
    assert [blk for blk, _ in m.match(b)] == cached
    c = seq(2, [7] * 5)
    m.allocate(c, 5)  # three blocks: the two never used (or not cached) first, then the least recently used
    assert not set(c.block_table[:2]) & set(cached) and c.block_table[2] == cached[1]
    assert [blk for blk, _ in m.match(b)] == cached[:1]  # the evicted block is forgotten
    assert m.can_allocate(2, m.match(b)) and not m.can_allocate(3, m.match(b))  # the hit itself is no spare


def test_the_mtp_tail_makes_a_block_depend_on_the_next_token():
    m = BlockManager(num_blocks=8, block_size=4, prefix_caching=True, tail=1)
    a = committed(m, range(8), 9, sampled=8)  # 9 tokens: the token after the second block is known: both final
    assert a.num_committed == 2
    assert len(m.match(seq(1, [*range(8), 5, 6]))) == 1  # the MTP row at position 7 saw token 8, not 5
    assert len(m.match(seq(1, [*range(9), 6]))) == 2
    half = seq(2, range(20, 28))
    m.allocate(half, 9)
    half.num_cached = 8  # the main model's rows are final, the MTP module's are not yet
    half.num_mtp_cached = 4
    half.token_ids.append(1)
    m.commit(half)
    assert half.num_committed == 1


def test_without_prefix_caching_nothing_is_remembered():
    m = BlockManager(num_blocks=4, block_size=2)
    m.release(committed(m, range(5), 5))
    assert not m.registry and not m.evictable and m.num_free == 4 and m.match(seq(1, range(5))) == []


# ---- the engine ------------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=0)
MODES = {"plain": {}, "mtp": {"speculative": "mtp"}, "mtp-chain": {"speculative": "mtp", "num_speculative_tokens": 3}}


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), std=0.2)


def engines(model, mode, **kw):
    kw = {"block_size": 4, "kv_cache_tokens": 512, **MODES[mode], **kw}
    return LLM(model, **kw), LLM(model, enable_prefix_caching=False, **kw)


def assert_same(a, b):
    """Same tokens, and log-probabilities equal to float32 rounding: the cached rows of a reply were computed by
    decode steps (absorbed attention), the recomputed ones by a prefill (naive attention); a wrong row would
    move them by tenths."""
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) <= 1e-4


@pytest.mark.parametrize("mode", list(MODES))
def test_a_chat_turn_reuses_the_last_one_and_changes_nothing(model, mode):
    cached, plain = engines(model, mode, speculative_policy="always")  # both draft every step: their stats compare
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, 300, (13,), generator=g).tolist()
    turn = system + torch.randint(0, 300, (6,), generator=g).tolist()
    computed = 0  # positions the last turn left in the cache: its prompt and reply, but the reply's last token
    for _ in range(3):  # each turn's prompt is the last one, its reply and a new message
        a, b = cached.generate(turn, GREEDY)[0], plain.generate(turn, GREEDY)[0]
        assert_same(a, b)
        assert a.num_cached_tokens == 4 * (computed // 4)  # every full block of the last turn's, none more
        computed = len(turn) + len(a.token_ids) - 1
        turn = turn + a.token_ids + torch.randint(0, 300, (5,), generator=g).tolist()
    assert b.num_cached_tokens == 0 and plain.stats["prefix_cache_hit_tokens"] == 0
    if mode != "plain":  # the MTP module's cached rows are right too: it drafted exactly as without the cache
        assert cached.stats["accepted_by_depth"] == plain.stats["accepted_by_depth"]
        assert cached.stats["drafted"] == plain.stats["drafted"]


@pytest.mark.parametrize("mode", ["plain", "mtp"])
def test_shared_prefixes_in_one_batch_and_after(model, mode):
    cached, plain = engines(model, mode)
    g = torch.Generator().manual_seed(2)
    system = torch.randint(0, 300, (17,), generator=g).tolist()
    batch = [system + torch.randint(0, 300, (n,), generator=g).tolist() for n in (1, 4, 9)]
    for a, b in zip(cached.generate(batch, GREEDY), plain.generate(batch, GREEDY)):
        assert_same(a, b)  # one batch: computed side by side, nothing to share yet
    later = [system + torch.randint(0, 300, (n,), generator=g).tolist() for n in (2, 7)]
    outs = cached.generate(later, GREEDY)
    for a, b in zip(outs, plain.generate(later, GREEDY)):
        assert_same(a, b)
    assert [o.num_cached_tokens for o in outs] == [16, 16]
    assert cached.stats["prefix_cache_hit_rate"] > 0


def test_preemption_under_a_full_cache_with_prefix_caching(model):
    """A cache too small for the batch: sequences are preempted, blocks evicted and reused, output unchanged."""
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 300, (9,), generator=g).tolist()
    ps = [system + torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 8, 5, 11)]
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    cached, plain = engines(model, "mtp", kv_cache_tokens=64)
    for _ in range(2):
        for a, b in zip(cached.generate(ps, params), plain.generate(ps, params)):
            assert a.token_ids == b.token_ids
    assert cached.stats["preemptions"] > 0 and cached.stats["prefix_cache_hit_tokens"] > 0


def test_prompt_logprobs_compute_the_whole_prompt(model):
    cached, plain = engines(model, "plain")
    p = torch.randint(0, 300, (15,), generator=torch.Generator().manual_seed(4)).tolist()
    cached.generate(p, GREEDY)
    want = SamplingParams(temperature=0, max_new_tokens=3, prompt_logprobs=0)
    a, b = cached.generate(p, want)[0], plain.generate(p, want)[0]
    assert a.num_cached_tokens == 0 and len(a.prompt_logprobs) == len(p)
    assert all(abs(x.logprob - y.logprob) <= 1e-4 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]))
    assert cached.generate(p, GREEDY)[0].num_cached_tokens == 12  # a plain request takes the blocks again


@pytest.mark.parametrize("mode", ["plain", "mtp"])
def test_cached_rows_equal_recomputed_rows_at_a_block_boundary(model, mode):
    """Two prompts that agree up to a block boundary and differ right after it: the second starts from the
    first's blocks, and every row of its cache, the MTP module's included (whose row at a block's last position
    depends on the token after the block), equals the rows a cold engine computes."""
    g = torch.Generator().manual_seed(5)
    system = torch.randint(0, 300, (16,), generator=g).tolist()
    first, second = system + [11, 12, 13], system + [21, 22, 23, 24, 25]
    cached, plain = engines(model, mode)
    cached.generate(first, GREEDY)
    rows, hits = [], []
    for llm in (cached, plain):
        rid = llm.add_request(second, GREEDY)
        llm.step()  # the prefill
        s = llm.requests[rid].seq
        slots = torch.tensor([s.block_table[p // 4] * 4 + p % 4 for p in range(len(second))])
        rows.append(llm.cache.data[:, slots].clone())
        hits.append(s.num_prefix_hit)
    assert hits == [16 if mode == "plain" else 12, 0]
    assert rel_err(rows[0], rows[1]) <= 1e-5


def test_a_cache_salt_keeps_prefixes_apart(model):
    llm = LLM(model, block_size=4)
    p = prompts_of([21], seed=6)[0]
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)

    def hit(salt):
        rid = llm.add_request(p, params, cache_salt=salt)
        while llm.has_unfinished():
            llm.step()
        return llm.release(rid).num_cached_tokens

    assert [hit(None), hit(None), hit("a"), hit("a"), hit("b"), hit(None)] == [0, 20, 0, 20, 0, 20]


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]
