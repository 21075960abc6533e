"""The scheduling policy on its own (no torch, no model)."""

from __future__ import annotations

import pytest

from dsv3.infer.scheduler import BlockManager, Scheduler, Sequence, Status


def seq(i, n):
    return Sequence(seq_id=i, token_ids=list(range(n)), num_prompt_tokens=n)


def test_prefill_admits_within_slots_budget_and_blocks():
    s = Scheduler(num_blocks=10, block_size=4, max_num_seqs=3, max_num_batched_tokens=20, max_model_len=64)
    for i, n in enumerate([5, 9, 3, 2]):
        s.add(seq(i, n))
    batch, prefill = s.schedule()
    assert prefill and [q.seq_id for q in batch] == [0, 1, 2]  # three slots; 17 tokens within the budget of 20
    assert [len(q.block_table) for q in batch] == [2, 3, 1] and s.blocks.num_free == 4
    assert [q.seq_id for q in s.waiting] == [3]
    for q in batch:
        assert q.num_scheduled == q.num_tokens
        q.num_cached = q.num_tokens
        q.token_ids.append(7)
    assert s.schedule() == (batch, False)  # no free slot: the next step decodes the running three
    assert [q.num_scheduled for q in batch] == [1, 1, 1]


def test_prefill_respects_each_limit():
    # slots
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=2, max_num_batched_tokens=1000, max_model_len=64)
    for i in range(3):
        s.add(seq(i, 4))
    batch, _ = s.schedule()
    assert [q.seq_id for q in batch] == [0, 1]
    # token budget: a prompt longer than what is left of it is computed in chunks
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=10, max_model_len=64)
    a, b = seq(0, 12), seq(1, 4)
    s.add(a), s.add(b)
    assert s.schedule() == ([a], True) and a.num_scheduled == 10 and len(a.block_table) == 3  # blocks for all 12
    a.num_cached = 10
    assert s.schedule() == ([a, b], True) and (a.num_scheduled, b.num_scheduled) == (2, 4)  # a's rest, then b
    # blocks
    s = Scheduler(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64)
    for i, n in enumerate([8, 8, 4]):
        s.add(seq(i, n))
    assert [q.seq_id for q in s.schedule()[0]] == [0, 1]
    assert s.blocks.num_free == 0


def test_decode_grows_blocks_and_preempts_the_newest():
    s = Scheduler(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64)
    a, b = seq(0, 4), seq(1, 4)
    s.add(a), s.add(b)
    assert s.schedule()[1]  # prefill both: 1 block each
    for q in (a, b):
        q.num_cached = 4
        q.token_ids.append(7)  # each sampled a token: 5 tokens, the 5th not yet computed
    batch, prefill = s.schedule()
    assert not prefill and batch == [a, b] and len(a.block_table) == 2 and len(b.block_table) == 2
    for _ in range(4):  # a grows to 9 tokens: needs a third block, none free -> b (newer) is preempted
        a.num_cached = a.num_tokens
        a.token_ids.append(7)
    batch, _ = s.schedule()
    assert batch == [a] and b.status is Status.WAITING and b.block_table == [] and s.num_preemptions == 1
    assert s.waiting[0] is b and b.num_cached == 0  # recomputed from its tokens later
    s.finish(a, "stop")
    batch, prefill = s.schedule()
    assert prefill and batch == [b] and s.blocks.num_free == 4 - 2


def test_lookahead_reserves_room_for_drafts():
    s = Scheduler(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64,
                  lookahead=2)
    a = seq(0, 4)
    s.add(a)
    s.schedule()
    a.num_cached = 4
    a.token_ids.append(1)  # 5 tokens; a verify step feeds token 4 and a draft at positions 4, 5
    s.schedule()
    assert len(a.block_table) == 2


def test_requests_that_can_never_run_are_rejected():
    s = Scheduler(num_blocks=2, block_size=4, max_num_seqs=8, max_num_batched_tokens=100, max_model_len=64)
    with pytest.raises(ValueError, match="whole cache holds 8"):
        s.add(seq(0, 9))
    with pytest.raises(ValueError, match="context is 64"):
        Scheduler(100, 4, 8, 100, max_model_len=64).add(seq(0, 65))


def test_abort_frees_blocks_anywhere():
    s = Scheduler(num_blocks=4, block_size=4, max_num_seqs=1, max_num_batched_tokens=100, max_model_len=64)
    a, b = seq(0, 4), seq(1, 4)
    s.add(a), s.add(b)
    s.schedule()
    s.abort(b)  # waiting
    s.abort(a)  # running
    assert a.finish_reason == b.finish_reason == "abort" and s.blocks.num_free == 4 and not s.has_work()


def test_block_manager():
    bm = BlockManager(3, 4)
    q = seq(0, 1)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    bm.grow(q, 9)
    assert q.block_table == [0, 1, 2] and not bm.can_grow(q, 13) and bm.can_grow(q, 12)
    bm.release(q)
    assert bm.num_free == 3


def test_a_long_prompt_is_prefilled_in_chunks_alongside_the_decodes():
    s = Scheduler(num_blocks=100, block_size=4, max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64)
    running = seq(0, 3)
    s.add(running)
    s.schedule()
    running.num_cached = 3
    running.token_ids.append(7)
    long = seq(1, 21)
    s.add(long)
    chunks = []
    while True:
        batch, prefill = s.schedule()
        if not prefill:
            break
        assert batch == [running, long] and running.num_scheduled == 1  # the decode goes on, first
        chunks.append(long.num_scheduled)
        for q in batch:
            q.num_cached += q.num_scheduled
            if q.num_cached == q.num_tokens:  # fed through its last token: it samples
                q.token_ids.append(7)
    assert chunks == [7, 7, 7] and batch == [running, long] and long.num_scheduled == 1
