"""Chunked prefill: prompts longer than the step's token budget (`max_num_batched_tokens`) are computed over
several steps. The engine with a budget of a few tokens must give what it gives with a budget that takes every
prompt at once: the same tokens, log-probabilities equal to float32 rounding, in every speculative mode, with
and without the prefix cache."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer import LLM, SamplingParams

from conftest import random_model, tiny_config

MODES = {"plain": {}, "mtp": {"speculative": "mtp"}, "mtp-chain": {"speculative": "mtp", "num_speculative_tokens": 2}}


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), std=0.2)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_chunked_equals_whole(model, mode, caching):
    ps = prompts([37, 5, 23, 2, 50])
    greedy = SamplingParams(temperature=0, max_new_tokens=9, ignore_eos=True, logprobs=0)
    # (both draft every step, so that their drafting stats compare)
    kw = dict(block_size=4, kv_cache_tokens=1024, enable_prefix_caching=caching, max_num_seqs=2, **MODES[mode],
              speculative_policy="always")
    whole = LLM(model, max_num_batched_tokens=4096, **kw)
    chunked = LLM(model, max_num_batched_tokens=9, **kw)  # 2 decodes of up to 4 positions (a chain of 2) and 1
    a, b = chunked.generate(ps, greedy), whole.generate(ps, greedy)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-4
    # every step stayed within the budget: 117 prompt tokens in more steps
    assert chunked.stats["prefill_tokens"] == whole.stats["prefill_tokens"] == sum(map(len, ps))
    assert chunked.stats["steps"] >= whole.stats["steps"] + 5
    if mode != "plain":  # the MTP module's rows were computed chunk by chunk too: it drafted the same
        assert chunked.stats["accepted_by_depth"] == whole.stats["accepted_by_depth"]


def test_chunked_sampling_is_the_same_draw(model):
    ps = prompts([41, 3], seed=1)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=5, ignore_eos=True)
    outs = [LLM(model, block_size=4, max_num_seqs=2, max_num_batched_tokens=n).generate(ps, sampled)
            for n in (5, 4096)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_chunk_reports_nothing_and_prompt_logprobs_come_with_the_last(model, mode):
    llm = LLM(model, block_size=4, max_num_seqs=2, max_num_batched_tokens=8, **MODES[mode])
    p = prompts([30], seed=2)[0]
    want = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, prompt_logprobs=2)
    rid = llm.add_request(p, want)
    reported = [llm.step() for _ in range(4)]  # 8 + 8 + 8 + 6 prompt tokens: the first token with the last chunk
    assert reported[:3] == [[], [], []] and [o.request_id for o in reported[3]] == [rid]
    assert len(reported[3][0].prompt_logprobs) == len(p)
    while llm.has_unfinished():
        llm.step()
    a = llm.release(rid)
    b = LLM(model, block_size=4, **MODES[mode]).generate(p, want)[0]  # the prompt in one step
    assert a.token_ids == b.token_ids and len(a.prompt_logprobs) == len(p) and a.prompt_logprobs[0] is None
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) <= 1e-4
        assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("mode", list(MODES))
def test_decoding_goes_on_while_a_long_prompt_is_prefilled(model, mode):
    """A request already decoding gets tokens in every step while a later long prompt is computed in chunks
    beside it; both end as they would alone."""
    greedy = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)  # outlasts the chunks at 3 a step
    short, long = prompts([6, 60], seed=3)
    llm = LLM(model, block_size=4, max_num_seqs=2, max_num_batched_tokens=10, **MODES[mode])
    first = llm.add_request(short, greedy)
    llm.step()  # its prefill
    second = llm.add_request(long, greedy)
    steps = 0
    while llm.requests[second].seq.num_cached < len(long) - 1:
        outs = llm.step()
        steps += 1
        assert first in [o.request_id for o in outs]  # the decode did not wait for the prompt
    assert steps >= 6  # 60 prompt tokens, at most 10 (less the decode's) a step
    while llm.has_unfinished():
        llm.step()
    alone = LLM(model, block_size=4, **MODES[mode])
    assert llm.release(first).token_ids == alone.generate(short, greedy)[0].token_ids
    assert llm.release(second).token_ids == alone.generate(long, greedy)[0].token_ids


def test_a_budget_decodes_alone_could_fill_is_refused(model):
    with pytest.raises(ValueError, match="max_num_batched_tokens=20 must be at least"):
        LLM(model, max_num_seqs=8, max_num_batched_tokens=20, speculative="mtp", num_speculative_tokens=2)
    LLM(model, max_num_seqs=8, max_num_batched_tokens=32, speculative="mtp", num_speculative_tokens=2)
    # the default grows with max_num_seqs x lookahead when that is larger
    assert LLM(model, max_num_seqs=1024).scheduler.max_num_batched_tokens == 2048
    assert LLM(model, max_num_seqs=1024, speculative="mtp", num_speculative_tokens=2,
               kv_cache_tokens=8192).scheduler.max_num_batched_tokens == 4096
