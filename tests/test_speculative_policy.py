"""The draft policy (speculative.py's DraftPolicy): on its own with made-up step costs, then in the engine with a
fake clock that charges each forward by its rows. Whatever it decides, greedy outputs equal plain greedy, and
the MTP module's cache rows, caught up after steps that did not draft, equal an always-drafting engine's."""

from __future__ import annotations

import itertools

import pytest
import torch

from dsv3.infer import LLM, SamplingParams
from dsv3.infer.speculative import MIN_WAIT, PLAIN_EVERY, PROBE_SHARE, PROBE_STEPS, START_MARGIN, DraftPolicy

from conftest import random_model, rel_err, tiny_config

GREEDY = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)


class FakeClock:
    """Time that passes only when the test says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(policy: DraftPolicy, steps: int, plain: float, verify: float, draft: float, tokens: float,
             batch: int = 1, drafting: bool = True) -> list[bool]:
    """Decode steps as the engine reports them to the policy, with these costs (seconds) and yield (tokens per
    sequence per drafting step); drafting: whether the step before drafted. -> the policy's decisions."""
    clock, decisions = policy.clock, []
    for _ in range(steps):
        start = clock()
        clock.t += verify if drafting else plain
        if drafting:
            for _ in range(batch):
                policy.observe_tokens(tokens)
        nxt = policy.draft_next(batch)
        mtp = draft if nxt else 0.0  # (the MTP forward after a plain step catches up; counted the same here)
        clock.t += mtp
        policy.observe_step(batch, drafting, clock() - start, mtp, steady=drafting and nxt)
        decisions.append(nxt)
        drafting = nxt
    return decisions


def test_the_policy_drafts_while_it_pays_and_probes_while_it_does_not():
    policy = DraftPolicy(clock=FakeClock())
    # drafting costs 2 per step for 1.8 tokens against 1 per token plain: it loses (0.9x)
    d = simulate(policy, 9, plain=1.0, verify=1.5, draft=0.5, tokens=1.8)
    assert d == [True] * 4 + [False] * 5  # measures drafting (its first step left out), then plain
    assert policy.gain(policy.costs(1)) == pytest.approx(0.9)
    d = simulate(policy, 600, plain=1.0, verify=1.5, draft=0.5, tokens=1.8, drafting=False)
    # plain, with probes of PROBE_STEPS drafting steps: the first after MIN_WAIT plain steps, then less and less
    # often (a quarter of the steps so far) until what they cost is PROBE_SHARE of the time: their expected loss
    # (a tenth of a step each) and the module's catching up before each (here half a step)
    runs = [(k, len(list(g))) for k, g in itertools.groupby(d)]
    probes = [n for k, n in runs if k]
    waits = [n for k, n in runs if not k][:-1]
    assert set(probes) == {PROBE_STEPS} and waits[0] == MIN_WAIT and len(waits) >= 5
    assert waits == sorted(waits) and waits[1] < waits[-1] == round((PROBE_STEPS * 0.1 + 0.5) / PROBE_SHARE)
    assert sum(d[300:]) / 300 < 0.06
    # the module gets better (3 tokens per step: 1.5x): the next probes notice and drafting stays on
    d = simulate(policy, 300, plain=1.0, verify=1.5, draft=0.5, tokens=3.0, drafting=d[-1])
    first_on = "".join("D" if x else "." for x in d).index("D" * (PLAIN_EVERY - 1))
    assert first_on <= waits[-1] and all(d[first_on: first_on + PLAIN_EVERY - 1])
    assert policy.gain(policy.costs(1)) > 1.2
    # while on, one step in PLAIN_EVERY is plain (keeping that estimate current), and no more
    assert 1 <= d[first_on:].count(False) <= len(d[first_on:]) // PLAIN_EVERY


def test_a_marginal_gain_starts_no_drafting_but_does_not_stop_it():
    """Drafting starts only at an expected gain above 1 + START_MARGIN (an estimate a few percent above 1 may be
    noise), and once on it goes on while the gain stays above 1."""
    policy = DraftPolicy(clock=FakeClock())
    d = simulate(policy, 300, plain=1.0, verify=1.5, draft=0.25, tokens=1.8)  # 1.8 / 1.75: 1.03x
    assert 1 < policy.gain(policy.costs(1)) < 1 + START_MARGIN
    runs = [len(list(g)) for k, g in itertools.groupby(d[100:]) if k]
    assert runs and max(runs) == PROBE_STEPS  # plain, but for probes
    policy = DraftPolicy(clock=FakeClock())
    d = simulate(policy, 100, plain=1.0, verify=1.5, draft=0.25, tokens=2.7)  # 1.54x: on
    d = simulate(policy, 300, plain=1.0, verify=1.5, draft=0.25, tokens=1.8, drafting=d[-1])  # then 1.03x
    assert 1 < policy.gain(policy.costs(1)) < 1 + START_MARGIN
    assert sum(d[150:]) >= 0.9 * len(d[150:])


def test_buckets_decide_apart_and_always_always_drafts():
    policy = DraftPolicy(clock=FakeClock())
    assert [DraftPolicy.bucket(b) for b in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    # at batch 1 the verify rows are nearly free; at batch 8 they cost as much as the tokens they bring
    d1 = simulate(policy, 100, plain=1.0, verify=1.1, draft=0.3, tokens=1.8, batch=1)
    d8 = simulate(policy, 100, plain=1.0, verify=1.8, draft=0.3, tokens=1.8, batch=8)
    assert policy.gain(policy.costs(1)) > 1 > policy.gain(policy.costs(8))
    assert sum(d1[50:]) >= 48 and sum(d8[50:]) <= 15 and policy.draft_next(1)
    st = policy.stats()
    assert set(st["buckets"]) == {1, 8} and st["buckets"][1]["plain_ms"] == pytest.approx(1000)
    assert 0 < st["drafting_fraction"] < 1 and st["decode_steps"] == 200
    always = DraftPolicy(always=True, clock=FakeClock())
    assert all(simulate(always, 50, plain=1.0, verify=5.0, draft=5.0, tokens=1.0))
    assert always.stats()["drafting_fraction"] == 1.0


# ---- in the engine --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(vocab_size=4), std=0.2, seed=5)  # vocab 4: the MTP module is often right


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4, (n,), generator=g).tolist() for n in lengths]


class Prices:
    """Charges a fake clock for the engine's forwards: `main` and `mtp` give a forward's seconds from its rows."""

    def __init__(self, llm: LLM, clock: FakeClock):
        self.main = self.mtp = lambda rows: 0.0
        runner = llm.runner
        forward, forward_mtp = runner.forward, runner.forward_mtp

        def main(batch):
            clock.t += self.main(batch.input_ids.numel())
            return forward(batch)

        def mtp(batch, h_prev, **kw):
            clock.t += self.mtp(batch.input_ids.numel())
            return forward_mtp(batch, h_prev, **kw)

        runner.forward, runner.forward_mtp = main, mtp


def priced_engine(model, **kw) -> tuple[LLM, Prices, list[tuple[int, bool]]]:
    """A speculative engine on a fake clock, its prices, and the log of the policy's decisions (batch size,
    drafting)."""
    clock = FakeClock()
    llm = LLM(model, speculative="mtp", speculative_policy=DraftPolicy(clock=clock), block_size=4, **kw)
    decisions = []
    decide = llm.speculator.policy.draft_next

    def logged(batch_size):
        decisions.append((batch_size, decide(batch_size)))
        return decisions[-1][1]

    llm.speculator.policy.draft_next = logged
    return llm, Prices(llm, clock), decisions


@pytest.mark.parametrize("k", [1, 2])
def test_drafting_turns_off_when_it_costs_more_than_it_yields_and_back_on(model, k):
    ps = prompts([5, 9], seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True)
    plain = [o.token_ids for o in LLM(model, block_size=4).generate(ps, params)]
    llm, prices, decisions = priced_engine(model, num_speculative_tokens=k)
    # every row costs the same: a verify step of 1 + k rows per sequence costs 1 + k plain steps
    prices.main = lambda rows: 1.0 * rows
    prices.mtp = lambda rows: 0.2 * rows
    assert [o.token_ids for o in llm.generate(ps, params)] == plain
    policy = llm.speculator.policy
    pairs = [d for b, d in decisions if b == 2][10:]  # (after learning both kinds of step)
    assert policy.gain(policy.costs(2)) < 1 and sum(pairs) / len(pairs) < 0.25
    assert 0 < llm.stats["drafting_fraction"] < 0.5 and llm.stats["draft_policy"]["buckets"][2]["gain"] < 1
    if k > 1:
        return  # (this random module's chains are rarely kept: they would not pay even on free rows)
    # the machine changes: extra rows are free (a GPU), the module cheap; a probe turns drafting back on
    prices.main = lambda rows: 1.0
    prices.mtp = lambda rows: 0.05
    del decisions[:]
    params = SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)  # (past the wait for a probe)
    plain = [o.token_ids for o in LLM(model, block_size=4).generate(ps, params)]
    assert [o.token_ids for o in llm.generate(ps, params)] == plain
    pairs = [d for b, d in decisions if b == 2]
    # drafting again, but for the one plain step in PLAIN_EVERY that keeps the plain estimate current
    assert policy.gain(policy.costs(2)) > 1 and sum(pairs[-PLAIN_EVERY:]) >= PLAIN_EVERY - 2 and not all(pairs)
    assert llm.stats["accepted"] > 0


def rows_of(llm: LLM, seq, layer: int, n: int) -> torch.Tensor:
    """The cache rows of a sequence's first n positions in one layer."""
    bs = llm.cache.block_size
    slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(n)])
    return llm.cache.data[layer, slots]


class Scripted(DraftPolicy):
    """Decides by a script: True/False per step, repeating."""

    def __init__(self, script):
        super().__init__(clock=FakeClock())
        self.script = itertools.cycle(script)

    def draft_next(self, batch_size: int) -> bool:
        return next(self.script)


@pytest.mark.parametrize("k, script", [(1, [True, False, False, False, True, True, False]),
                                       (2, [False] * 6 + [True] * 3), (1, [False] * 5 + [True])])
def test_mtp_rows_caught_up_after_plain_steps_equal_an_always_drafting_engines(model, k, script):
    """Steps that do not draft leave the MTP module behind; it catches up over all it missed in one forward.
    Its cache rows then equal those of an engine that drafted every step (float32 rounding: the catch-up
    computes them in a different batch), and the tokens are plain greedy's."""
    ps = prompts([6, 3, 11], seed=2)
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    engines = [LLM(model, speculative="mtp", num_speculative_tokens=k, speculative_policy=p, block_size=4)
               for p in (Scripted(script), "always")]
    ids = [[llm.add_request(p, params) for p in ps] for llm in engines]
    for _ in range(12):
        for llm in engines:
            llm.step()
    layer = model.config.num_hidden_layers  # the MTP module's cache
    behind = 0
    for a, b in zip(*ids):
        sa, sb = engines[0].requests[a].seq, engines[1].requests[b].seq
        n = min(sa.num_mtp_cached, sb.num_mtp_cached)
        assert n >= 8
        behind += sa.num_cached - sa.num_mtp_cached
        assert rel_err(rows_of(engines[0], sa, layer, n), rows_of(engines[1], sb, layer, n)) <= 1e-5
        assert rel_err(rows_of(engines[0], sa, 0, n), rows_of(engines[1], sb, 0, n)) <= 1e-5
    for llm in engines:
        while llm.has_unfinished():
            llm.step()
    want = [o.token_ids for o in LLM(model, block_size=4).generate(ps, params)]
    for llm, rids in zip(engines, ids):
        assert [llm.release(r).token_ids for r in rids] == want
    assert not engines[0].speculator.backlogs  # forgotten with their requests
    assert 0 < engines[0].stats["drafting_fraction"] < 1 and engines[0].stats["accepted"] > 0


def test_plain_steps_keep_the_prefix_cache_working(model):
    """Without drafting, the MTP module still catches up on a prompt's full blocks (a block's registered rows
    include the module's): a chat's next turn finds the last turn's prompt cached, though not its reply (an
    engine that drafts has the module's rows of both), and the same tokens; under cache pressure (preemptions
    drop what a sequence had kept for the module) too."""
    turn = prompts([9], seed=3)[0]
    never, always = (LLM(model, speculative="mtp", speculative_policy=p, block_size=4)
                     for p in (Scripted([False]), "always"))
    params = SamplingParams(temperature=0, max_new_tokens=13, ignore_eos=True)
    last = 0
    for _ in range(3):
        a, b = never.generate(turn, params)[0], always.generate(turn, params)[0]
        assert a.token_ids == b.token_ids and 4 * (last // 4) <= a.num_cached_tokens <= b.num_cached_tokens
        last, turn = len(turn), turn + a.token_ids + [1, 2, 3]
    assert a.num_cached_tokens > 20 and never.stats["drafted"] == 0
    # without prefix caching nothing needs the module's rows of a sequence that never drafts: none are computed
    uncached = LLM(model, speculative="mtp", speculative_policy=Scripted([False]), block_size=4,
                   enable_prefix_caching=False)
    uncached.runner.forward_mtp = None  # (would fail if called)
    assert uncached.generate(turn, params)[0].token_ids == always.generate(turn, params)[0].token_ids
    ps = prompts([3, 8, 5, 11], seed=4)
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in LLM(model, block_size=4).generate(ps, params)]
    tight = LLM(model, speculative="mtp", speculative_policy=Scripted([False, False, True]), block_size=4,
                kv_cache_tokens=64)
    assert [o.token_ids for o in tight.generate(ps, params)] == want and tight.stats["preemptions"] > 0


def test_seeded_sampling_is_reproducible_whatever_the_policy(model):
    """Under the adaptive policy a request with a seed and a temperature never drafts: its tokens are plain
    sampling's with that seed, however the policy decides for the others; unseeded sampled requests draft."""
    ps = prompts([4, 6, 5], seed=5)
    seeded = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=30, ignore_eos=True, seed=7)
    params = [seeded, SamplingParams(temperature=0.8, max_new_tokens=30, ignore_eos=True), GREEDY]
    want = LLM(model, block_size=4).generate(ps, params)
    for policy in (Scripted([True]), Scripted([False, True, True]), DraftPolicy()):
        outs = LLM(model, speculative="mtp", speculative_policy=policy, block_size=4).generate(ps, params)
        assert outs[0].token_ids == want[0].token_ids and outs[2].token_ids == want[2].token_ids
        assert len(outs[1].token_ids) == 30
    assert policy.drafting_steps > 0
    # drafting every step, a seeded request drafts too: reproducible run to run (not plain's tokens)
    runs = [LLM(model, speculative="mtp", speculative_policy="always", block_size=4).generate(ps[:1], seeded)
            for _ in range(2)]
    assert runs[0][0].token_ids == runs[1][0].token_ids


def test_policy_errors(model):
    with pytest.raises(ValueError, match="speculative_policy"):
        LLM(model, speculative="mtp", speculative_policy="sometimes")
    assert LLM(model, speculative="mtp").speculator.policy.always is False
    assert LLM(model, speculative="mtp", speculative_policy="always").stats["draft_policy"]["policy"] == "always"
