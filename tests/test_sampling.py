"""Sampling: the processed distribution, the exact draw, seeds, and the speculative accept/reject rule."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer.sampling import Sampler, SamplingParams, draw, processed_probs
from dsv3.infer.speculative import verify_chain, verify_draft


def test_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0),
                dict(stop=[""]), dict(logprobs=50), dict(presence_penalty=3), dict(frequency_penalty="1"),
                dict(repetition_penalty=-1), dict(logit_bias={1: 200}), dict(min_tokens=-1),
                dict(logits_processors=["f"])):
        with pytest.raises(ValueError, match=list(bad)[0]):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ["###"]


def test_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    one = torch.ones(1)
    p = processed_probs(logits, one, torch.tensor([2]), one)
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    p = processed_probs(logits, one, torch.tensor([0]), torch.tensor([0.8]))  # 0.5 + 0.2 < 0.8: keep 3
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    p = processed_probs(logits, one, torch.tensor([0]), torch.tensor([0.3]))  # the best token always stays
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0, 0]]))
    p = processed_probs(logits, torch.tensor([0.5]), torch.tensor([0]), one)  # temperature sharpens
    assert torch.allclose(p, torch.tensor([[0.25, 0.04, 0.0225, 0.01, 0.0025]]) / 0.325)


def test_sampler_probs_shortcut_matches_the_full_processing():
    """Rows with temperature alone take a 2-op path: the same numbers as processed_probs, greedy rows one-hot."""
    s = Sampler("cpu")
    logits = torch.randn(4, 64, dtype=torch.float64).float()
    hot, cold, greedy = SamplingParams(temperature=0.7), SamplingParams(temperature=1.3), SamplingParams(temperature=0)
    for params in ([hot] * 4, [hot, greedy, hot, greedy], [hot, cold, hot, cold], [SamplingParams(top_k=5)] * 4):
        want = processed_probs(logits, *s.params_tensors(params))
        onehot = torch.zeros_like(want).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        want = torch.where(torch.tensor([p.greedy for p in params])[:, None], onehot, want)
        assert torch.equal(s.probs(logits, params), want)


def test_adjustments_come_before_temperature_top_k_and_top_p():
    """vLLM's order: the penalties change the logits that temperature, top-k and top-p then process, so a
    penalised favourite can lose its place in the top-k."""
    s = Sampler("cpu")
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    p = SamplingParams(top_k=1, presence_penalty=2.0)  # token 0 (in the output): 3 - 2 = 1 < 2
    adjusted = s.adjust(logits, [p], lambda: [([2], [0])])
    assert torch.equal(adjusted, torch.tensor([[1.0, 2.0, 1.0, 0.0]]))
    assert torch.equal(s.probs(adjusted, [p]), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert int(s.sample(adjusted, [p], [None])) == 1
    hot = SamplingParams(temperature=0.5, logit_bias={3: 1.0})  # bias, then temperature: (0 + 1) / 0.5
    want = torch.softmax(torch.tensor([[3.0, 2.0, 1.0, 1.0]]) / 0.5, -1)
    assert torch.allclose(s.probs(s.adjust(logits, [hot], lambda: [([0], [])]), [hot]), want)


def test_draw_is_exact():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    # the CDF intervals: [0, .1) -> 0, [.1, .7) -> 2, [.7, 1) -> 3; a zero-probability token is never drawn
    for u, want in [(0.0, 0), (0.0999, 0), (0.1001, 2), (0.69, 2), (0.7001, 3), (0.9999, 3)]:
        assert int(draw(probs, torch.tensor([u]))) == want


def test_seeded_requests_reproduce_whatever_the_batch():
    s = Sampler(torch.device("cpu"))
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    a = s.sample(logits, [p, p, p], [Sampler.generator_for(7), None, Sampler.generator_for(8)])
    b = s.sample(logits[:1], [p], [Sampler.generator_for(7)])
    assert a[0] == b[0]
    greedy = SamplingParams(temperature=0)
    assert torch.equal(s.sample(logits, [greedy] * 3, [None] * 3), logits.argmax(-1))


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_speculative_rule_keeps_the_target_distribution(greedy_draft):
    """Whatever q the draft comes from, the first token verify_draft returns is distributed as p; a kept
    draft's bonus token is distributed as p_next."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    p_next = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    q = torch.tensor([0.05, 0.15, 0.30, 0.30, 0.20]) if not greedy_draft else torch.tensor([0.0, 0, 0, 1.0, 0])
    n = 12000
    first = torch.zeros(5)
    bonus = torch.zeros(5)
    kept = 0
    for _ in range(n):
        d = int(draw(q[None], torch.rand(1, generator=g))[0])
        toks = verify_draft(p, p_next, q, d, greedy=False, generator=g)
        first[toks[0]] += 1
        if len(toks) == 2:
            kept += 1
            bonus[toks[1]] += 1
    tol = 4 * (p * (1 - p) / n).sqrt().max()  # four standard errors
    assert (first / n - p).abs().max() < tol, first / n
    assert (bonus / kept - p_next).abs().max() < 0.03
    # acceptance probability is sum_x min(p(x), q(x))
    assert abs(kept / n - torch.minimum(p, q).sum().item()) < 0.015


def test_greedy_verification():
    p = torch.tensor([0.1, 0.7, 0.2])
    p_next = torch.tensor([0.5, 0.2, 0.3])
    g = torch.Generator()
    assert verify_draft(p, p_next, torch.eye(3)[1], 1, greedy=True, generator=g) == [1, 0]
    assert verify_draft(p, p_next, torch.eye(3)[2], 2, greedy=True, generator=g) == [1]


def test_chain_rule_keeps_the_target_distribution():
    """Two drafts drawn in a chain (the second from a q that depends on the first), verified by verify_chain:
    the first token is distributed as p_0, the second, given the first, as p_1, the bonus as p_2; a draft is
    kept with probability sum_x min(p(x), q(x))."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.05],
                      [0.10, 0.20, 0.30, 0.40, 0.00],
                      [0.30, 0.30, 0.10, 0.20, 0.10]])
    q0 = torch.tensor([0.05, 0.15, 0.30, 0.30, 0.20])
    q1 = {d: torch.roll(torch.tensor([0.50, 0.20, 0.10, 0.10, 0.10]), d) for d in range(5)}
    n = 12000
    first, second, third = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    n_second = n_third = kept_first = 0
    for _ in range(n):
        d0 = int(draw(q0[None], torch.rand(1, generator=g))[0])
        d1 = int(draw(q1[d0][None], torch.rand(1, generator=g))[0])
        toks = verify_chain(p, [q0, q1[d0]], [d0, d1], g)
        assert 1 <= len(toks) <= 3 and toks[:len(toks) - 1] == [d0, d1][:len(toks) - 1]
        first[toks[0]] += 1
        kept_first += len(toks) >= 2
        if len(toks) >= 2:
            second[toks[1]] += 1
            n_second += 1
        if len(toks) == 3:
            third[toks[2]] += 1
            n_third += 1
    tol = 4 * (p[0] * (1 - p[0]) / n).sqrt().max()
    assert (first / n - p[0]).abs().max() < tol, first / n
    assert (second / n_second - p[1]).abs().max() < 0.03, second / n_second
    assert (third / n_third - p[2]).abs().max() < 0.04, third / n_third
    assert abs(kept_first / n - torch.minimum(p[0], q0).sum().item()) < 0.015


def test_batched_rule_keeps_the_target_distribution():
    """verify_drafts, the rule for many sequences' single drafts at once: each first token distributed as p, a
    kept draft's bonus as p_next, a draft kept with probability sum_x min(p(x), q(x)); rows independent."""
    from dsv3.infer.speculative import verify_drafts
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05])
    p_next = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    q = torch.tensor([0.05, 0.15, 0.30, 0.30, 0.20])
    n = 12000
    drafts = draw(q.expand(n, 5), torch.rand(n, generator=g)).tolist()
    out = verify_drafts(torch.stack([p, p_next]).expand(n, 2, 5), q.expand(n, 5), drafts, [g] * n)
    first = torch.bincount(torch.tensor([t[0] for t in out]), minlength=5) / n
    kept = [t for t in out if len(t) == 2]
    bonus = torch.bincount(torch.tensor([t[1] for t in kept]), minlength=5) / len(kept)
    assert all(t[0] == d for t, d in zip(out, drafts) if len(t) == 2)
    tol = 4 * (p * (1 - p) / n).sqrt().max()
    assert (first - p).abs().max() < tol, first
    assert (bonus - p_next).abs().max() < 0.03
    assert abs(len(kept) / n - torch.minimum(p, q).sum().item()) < 0.015
    # a row's outcome depends on its own generator only
    one = verify_drafts(torch.stack([p, p_next])[None], q[None], drafts[:1], [torch.Generator().manual_seed(5)])
    two = verify_drafts(torch.stack([p, p_next]).expand(2, 2, 5), q.expand(2, 5), drafts[:1] * 2,
                        [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    assert one[0] == two[0]
