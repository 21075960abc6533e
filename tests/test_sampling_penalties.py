"""Penalties, logit_bias, min_tokens and logits processors: the batched adjustment against a plain per-row
reference (and hand-computed cases), the engine against a full-recompute reference, speculative decoding
against plain decoding (greedy: the same tokens; sampled: the same distribution), and the OpenAI server with
the openai client (each parameter changes the output as the engine does; bad values are a 400 naming them;
include_usage's final chunk)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import dsv3
from dsv3.infer import LLM, SamplingParams
from dsv3.infer.sampling import Sampler, adjust_logits
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config

ALWAYS = dict(speculative="mtp", speculative_policy="always")
EOS = 1  # tiny_config's eos_token_id


def reference_adjust(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int],
                     eos: set[int]) -> torch.Tensor:
    """One row, token by token, as the definitions read (vLLM's order)."""
    row = logits.float().clone()
    for t, b in (p.logit_bias or {}).items():
        row[t] += b
    if len(out) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            row[t] = float("-inf")
    if p.repetition_penalty != 1:
        for t in set(prompt) | set(out):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(out):
        row[t] -= p.frequency_penalty * out.count(t)
        row[t] -= p.presence_penalty
    for fn in p.logits_processors:
        row = fn(prompt, out, row)
    return row


def history_processor(vocab: int, weight: float = 1.5):
    """A logits processor that depends on the whole history: a wrong history changes the tokens."""
    def fn(prompt, out, logits):
        logits = logits.clone()
        logits[(sum(prompt) + 3 * len(out) + (out[-1] if out else 0)) % vocab] += weight
        return logits
    return fn


# ---- the adjustment itself ----------------------------------------------------------------------------------

def test_params_validation_names_the_field():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-2.01), dict(presence_penalty=math.nan),
                dict(repetition_penalty=0), dict(repetition_penalty=math.inf), dict(logit_bias={"5": 1.0}),
                dict(logit_bias={-1: 1.0}), dict(logit_bias={3: 101}), dict(logit_bias={3: True}),
                dict(logit_bias=[(3, 1.0)]), dict(min_tokens=-1), dict(min_tokens=20, max_new_tokens=10),
                dict(min_tokens=1.5), dict(logits_processors=[3]), dict(logits_processors=len)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            SamplingParams(**bad)
    p = SamplingParams(logit_bias={3: -100, 4: 100.0}, min_tokens=256, presence_penalty=-2, frequency_penalty=2,
                       repetition_penalty=1e-3, logits_processors=[len])
    assert p.adjusts_logits and p.penalized
    assert not SamplingParams().adjusts_logits and not SamplingParams(logit_bias={}).adjusts_logits


def test_hand_computed_case():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0]])
    prompt, out = [0], [2, 2, 3]
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # token 0 (prompt): 1 / 2; token 2 (twice in the output): 2 / 2 - 0.5 * 2 - 0.25; token 3: 0.5 / 2 - 0.5 - 0.25
    want = torch.tensor([[0.5, -1.0, -0.25, -0.5, -0.5, 0.0]])
    assert torch.equal(adjust_logits(logits, [p], [(prompt, out)]), want)
    neg = SamplingParams(repetition_penalty=2.0)  # a negative logit is multiplied: pushed further down
    assert torch.equal(adjust_logits(-logits, [neg], [([0, 1], [])]), torch.tensor([[-2.0, 0.5, -2, -0.5, 0.5, 0]]))
    p = SamplingParams(logit_bias={1: 3.0, 4: -100}, min_tokens=4, stop_token_ids=[3])
    want = torch.tensor([[1.0, 2.0, 2.0, -math.inf, -100.5, -math.inf]])  # stop token 3 and EOS 5 masked
    assert torch.equal(adjust_logits(logits, [p], [(prompt, out)], eos_token_ids={5}), want)
    # the fourth token may end the output: nothing masked once 4 are generated; ignore_eos leaves EOS alone
    assert adjust_logits(logits, [p], [(prompt, out + [0])], {5})[0, 3] == 0.5
    p = SamplingParams(min_tokens=4, stop_token_ids=[3], ignore_eos=True)
    assert adjust_logits(logits, [p], [(prompt, out)], {5}).tolist() == [[1, -1, 2, -math.inf, -0.5, 0]]


def _random_case(seed: int, R: int = 8, V: int = 50):
    g = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(R, V, generator=g)
    logits[0, :5] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, float("-inf")])  # signs at 0, and -inf, handled
    choices = [SamplingParams(), SamplingParams(temperature=0.5, top_k=3),
               SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=-0.7),
               SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.6),
               SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=2.5),
               SamplingParams(logit_bias={3: 7.5, 17: -100, 49: 100}), SamplingParams(min_tokens=6, stop_token_ids=[2]),
               SamplingParams(min_tokens=6, ignore_eos=True),
               SamplingParams(logits_processors=[history_processor(V)], presence_penalty=0.5, logit_bias={0: 1}),
               SamplingParams(logits_processors=[history_processor(V), history_processor(V, -3.0)])]
    params, hists = [], []
    for r in range(R):
        params.append(choices[int(torch.randint(len(choices), (1,), generator=g))])
        prompt = torch.randint(V, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        out = torch.randint(V // 3, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        hists.append((prompt, out))
    return logits, params, hists


@pytest.mark.parametrize("seed", range(6))
def test_batched_adjustment_equals_the_per_row_reference(seed):
    """Random mixes of every adjustment: each row as the reference computes it alone (to the float32 rounding of
    the few operations on each logit), rows that adjust nothing unchanged to the bit, and each row the same
    whatever else is in the batch."""
    logits, params, hists = _random_case(seed)
    got = adjust_logits(logits, params, hists, {EOS})
    for r, (p, (prompt, out)) in enumerate(zip(params, hists)):
        want = reference_adjust(logits[r], p, prompt, out, {EOS})
        # at most 5 float32 roundings per logit (bias, repetition, frequency product and difference, presence),
        # each within 2^-24 of a magnitude below |logit| + 100 + 2 * count + 2 + a processor's 3; either side
        bound = logits[r].abs().masked_fill(logits[r].isinf(), 0).max() + 110 + 2 * len(out)
        torch.testing.assert_close(got[r], want, rtol=0, atol=float(2 * 5 * 2**-24 * bound))
        if not p.adjusts_logits:
            assert torch.equal(got[r], logits[r])
        assert torch.equal(adjust_logits(logits[r:r + 1], [p], [(prompt, out)], {EOS})[0], got[r])
    assert not torch.equal(got, logits)


def test_sampler_adjust_is_free_without_adjustments():
    """No row adjusts: the very same tensor, and the histories are never built."""
    s = Sampler("cpu", eos_token_ids={EOS})
    logits = torch.randn(3, 20)

    def histories():
        raise AssertionError("built")
    assert s.adjust(logits, [SamplingParams(), SamplingParams(temperature=0)] * 2, histories) is logits
    got = s.adjust(logits, [SamplingParams(), SamplingParams(min_tokens=1)], lambda: [([0], []), ([0], [])])
    assert got[1, EOS] == -math.inf and torch.equal(got[0], logits[0]) and got is not logits


def test_a_bad_processor_is_named():
    p = SamplingParams(logits_processors=[lambda prompt, out, logits: logits[:3]])
    with pytest.raises(ValueError, match="logits processor .* not a tensor of shape"):
        adjust_logits(torch.zeros(1, 8), [p], [([1], [])])


# ---- the engine -------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_greedy(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Full recompute each token, the reference adjustment, argmax; the engine's stop rules for EOS."""
    ids, out = list(prompt), []
    for _ in range(params.max_new_tokens):
        row = reference_adjust(model(torch.tensor([ids]))[0, -1], params, prompt, out, {EOS})
        out.append(int(row.argmax()))
        ids.append(out[-1])
        if not params.ignore_eos and out[-1] == EOS and len(out) >= params.min_tokens:
            break
    return out


PENALIZED = [dict(presence_penalty=2.0), dict(frequency_penalty=1.2), dict(repetition_penalty=1.8),
             dict(presence_penalty=-1.0, frequency_penalty=0.6, repetition_penalty=0.7),
             dict(logit_bias={5: 1.5, 7: -2.0}), dict(logits_processors=[None])]  # None: history_processor


def _params(kw: dict, vocab: int, **more) -> SamplingParams:
    if kw.get("logits_processors") == [None]:
        kw = dict(kw, logits_processors=[history_processor(vocab)])
    return SamplingParams(**{"temperature": 0, "max_new_tokens": 16, "ignore_eos": True, **more, **kw})


@pytest.mark.parametrize("kw", PENALIZED)
def test_engine_greedy_equals_the_reference_and_batch_rows_are_independent(kw):
    c = tiny_config(vocab_size=16)
    model = random_model(c, std=0.2, seed=3)
    prompts = [[3, 5, 7, 9, 2], [4, 4, 4], [11, 0, 6, 13, 8, 1, 12]]
    params = _params(kw, 16)
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    # mixed with plain requests in one batch: each as alone, each as the reference computes it
    outs = llm.generate(prompts + prompts, [params] * 3 + [SamplingParams(temperature=0, max_new_tokens=16,
                                                                           ignore_eos=True)] * 3)
    assert [o.token_ids for o in outs[3:]] == [o.token_ids for o in plain]
    assert [o.token_ids for o in outs[:3]] == [reference_greedy(model, p, params) for p in prompts]
    assert [o.token_ids for o in outs[:3]] != [o.token_ids for o in plain]  # it changed something
    # logprobs stay the raw model's: the same as without the adjustment, at the same tokens
    with_lp = llm.generate(prompts[:1], dataclasses.replace(params, logprobs=0))[0]
    with torch.no_grad():
        raw = torch.log_softmax(model(torch.tensor([prompts[0] + with_lp.token_ids]))[0].float(), -1)
    n0 = len(prompts[0])
    want = [float(raw[n0 - 1 + j, t]) for j, t in enumerate(with_lp.token_ids)]
    assert [x.logprob for x in with_lp.logprobs] == pytest.approx(want, abs=1e-4)


def test_logit_bias_forces_a_token_and_min_tokens_delays_eos():
    c = tiny_config(vocab_size=16)
    model = random_model(c, std=0.2, seed=3)
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    for temperature in (0, 1.0):  # +100 outweighs any logit of this model, greedy or sampled
        out = llm.generate([[3, 5, 7]], SamplingParams(temperature=temperature, max_new_tokens=6, ignore_eos=True,
                                                      logit_bias={9: 100}))[0]
        assert out.token_ids == [9] * 6
        out = llm.generate([[3, 5, 7]], SamplingParams(temperature=temperature, max_new_tokens=6, ignore_eos=True,
                                                      logit_bias={9: -100, 10: -100}))[0]
        assert not {9, 10} & set(out.token_ids)
    forced_eos = dict(temperature=0, max_new_tokens=10, logit_bias={EOS: 100})
    out = llm.generate([[3, 5, 7]], SamplingParams(**forced_eos))[0]
    assert out.token_ids == [EOS] and out.finish_reason == "stop"
    for n in (1, 4, 9):  # EOS masked until n tokens are out: then it comes at once
        out = llm.generate([[3, 5, 7]], SamplingParams(**forced_eos, min_tokens=n))[0]
        assert len(out.token_ids) == n + 1 and EOS not in out.token_ids[:-1] and out.token_ids[-1] == EOS
        assert out.finish_reason == "stop"
    out = llm.generate([[3, 5, 7]], SamplingParams(**dict(forced_eos, logit_bias={EOS: 100, 4: 100}),
                                                   stop_token_ids=[4], min_tokens=3))[0]
    assert not {4, EOS} & set(out.token_ids[:3]) and out.token_ids[-1] in (4, EOS) and len(out.token_ids) == 4
    out = llm.generate([[3, 5, 7]], SamplingParams(**forced_eos, min_tokens=10))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_min_tokens_holds_back_stop_strings():
    class OneLetterTokenizer:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return "".join("abcd"[i] for i in ids)

    model = random_model(tiny_config(vocab_size=4), std=0.2, seed=5)
    llm = LLM(model, tokenizer=OneLetterTokenizer(), block_size=4, kv_cache_tokens=256)
    p = dict(temperature=0, max_new_tokens=8, ignore_eos=True, stop=["a"], logit_bias={0: 100})
    out = llm.generate([[3, 2]], SamplingParams(**p))[0]
    assert out.token_ids == [0] and out.text == "" and out.finish_reason == "stop"
    out = llm.generate([[3, 2]], SamplingParams(**p, min_tokens=3))[0]  # "a", "aa" are not looked at; "aaa" is
    assert out.token_ids == [0, 0, 0] and out.text == "aa" and out.finish_reason == "stop"


# ---- speculative decoding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("topk, k", [(1, 1), (3, 1), (None, 1), (None, 2), (None, 3)])
@pytest.mark.parametrize("kw", PENALIZED + [dict(min_tokens=12, logit_bias={EOS: 3.0}, ignore_eos=False)])
def test_speculative_greedy_equals_plain_with_adjustments(kw, topk, k):
    """Every verified row is adjusted with its own history (the drafts before it): the tokens are plain
    decoding's, while drafts are kept and rejected (a small vocabulary makes the random MTP module often right)."""
    c = tiny_config(vocab_size=8)
    model = random_model(c, std=0.2, seed=5)
    prompts = [[1, 2, 3, 4, 5], [6, 6, 2], [7, 3, 1, 0, 2, 4, 6, 5, 3]]
    params = _params(kw, 8, max_new_tokens=20)
    plain = LLM(model, block_size=4, kv_cache_tokens=512).generate(prompts, params)
    spec = LLM(model, **ALWAYS, speculative_topk=topk, num_speculative_tokens=k, block_size=4, kv_cache_tokens=512)
    outs = spec.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert 0 < spec.stats["accepted"] < spec.stats["drafted"]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_drafts_follow_the_adjustments(k, temperature):
    """The MTP module's drafts are adjusted as the main model's rows are: a token forced by logit_bias (or by a
    processor) is drafted, so every draft is kept."""
    model = random_model(tiny_config(vocab_size=8), std=0.2, seed=5)
    force = lambda prompt, out, logits: logits.index_fill(0, torch.tensor([2]), 50.0)  # noqa: E731
    for kw in (dict(logit_bias={6: 100}), dict(logits_processors=[force])):
        llm = LLM(model, **ALWAYS, num_speculative_tokens=k, block_size=4, kv_cache_tokens=512)
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=temperature, max_new_tokens=13, ignore_eos=True,
                                                      **kw))[0]
        assert set(out.token_ids) == ({6} if "logit_bias" in kw else {2})
        assert llm.stats["drafted"] > 0 and llm.stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("topk, k", [(2, 1), (None, 3)])
def test_a_processor_sees_each_rows_history_in_a_speculative_verify(topk, k):
    """The processor is called with the request's prompt and, for every position of the output, exactly the
    output before it; rows of drafts add the histories of the drafts (rejected ones too)."""
    calls = []
    inner = history_processor(8)

    def recording(prompt, out, logits):
        calls.append((tuple(prompt), tuple(out)))
        return inner(prompt, out, logits)

    model = random_model(tiny_config(vocab_size=8), std=0.2, seed=5)
    prompt = [7, 3, 1, 0, 2, 4]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, logits_processors=[recording])
    spec = LLM(model, **ALWAYS, speculative_topk=topk, num_speculative_tokens=k, block_size=4, kv_cache_tokens=512)
    out = spec.generate([prompt], params)[0].token_ids
    plain = LLM(model, block_size=4, kv_cache_tokens=512).generate([prompt], params)[0].token_ids
    assert out == plain
    spec_calls = calls[: len(calls) - len(plain)]  # (the plain run's calls come last: one per token)
    assert {p for p, _ in calls} == {tuple(prompt)}
    seen = {o for _, o in spec_calls}
    assert all(tuple(out[:j]) in seen for j in range(len(out)))  # every position, with its exact history
    off = [o for o in seen if tuple(out[:len(o)]) != o]  # a rejected draft's (or alternative's) history
    assert off and all(tuple(out[:len(o) - 1]) == o[:-1] or k > 1 for o in off)
    assert calls[len(spec_calls):] == [(tuple(prompt), tuple(out[:j])) for j in range(len(out))]


def _joint(model, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple, float]:
    """The exact distribution of the first n tokens under params (the adjusted, tempered softmax)."""
    dist = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            nxt = {}
            for seq, pr in dist.items():
                row = reference_adjust(model(torch.tensor([prompt + list(seq)]))[0, -1], params, prompt, list(seq),
                                       {EOS})
                probs = torch.softmax(row.double() / params.temperature, -1)
                for t, q in enumerate(probs.tolist()):
                    if q > 0:
                        nxt[seq + (t,)] = pr * q
            dist = nxt
    return dist


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_keeps_the_adjusted_distribution(k):
    """Sampled speculative decoding with penalties and a processor: the first three tokens of 3000 seeded
    requests follow the exact joint distribution (a G-test: merged cells of >= 5 expected, the statistic under
    its degrees of freedom + 6 standard deviations, about a 1e-6 chance of a false alarm). Verifying against the
    unadjusted target, or adjusting the rows with the wrong histories, gives G in the thousands (df 12)."""
    V, N = 5, 3000
    model = random_model(tiny_config(vocab_size=V), std=0.2, seed=5)
    prompt = [1, 2, 3, 4]
    base = dict(temperature=1.0, max_new_tokens=3, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5,
                repetition_penalty=1.4, logit_bias={0: 0.8}, logits_processors=[history_processor(V, 2.0)])
    exact = _joint(model, prompt, SamplingParams(**base), 3)
    llm = LLM(model, **ALWAYS, num_speculative_tokens=k, block_size=4, kv_cache_tokens=8192, max_num_seqs=64)
    outs = llm.generate([prompt] * N, [SamplingParams(**base, seed=s) for s in range(N)])
    assert llm.stats["accepted"] > 0 and llm.stats["accepted"] < llm.stats["drafted"]
    counts: dict[tuple, int] = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    assert set(counts) <= set(exact)
    cells, rest_obs, rest_exp = [], 0, 0.0
    for seq, pr in sorted(exact.items(), key=lambda x: -x[1]):
        if N * pr >= 5:
            cells.append((counts.get(seq, 0), N * pr))
        else:
            rest_obs, rest_exp = rest_obs + counts.get(seq, 0), rest_exp + N * pr
    if rest_exp > 0:
        cells.append((rest_obs, rest_exp))
    g = 2 * sum(o * math.log(o / e) for o, e in cells if o > 0)
    df = len(cells) - 1
    assert g < df + 6 * math.sqrt(2 * df), (g, df)


# ---- dsv3 generate -----------------------------------------------------------------------------------------------

def test_generate_cli_takes_the_penalties(tmp_path, capsys):
    from dsv3.cli import main

    tok = train_bpe(["the cat sat on the mat. the dog ate the bone! hello world " * 20], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size), std=0.2)
    d = tmp_path / "m"
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)
    out_file = tmp_path / "out.jsonl"
    flags = ["--presence-penalty", "1.5", "--frequency-penalty", "0.5", "--repetition-penalty", "1.3",
             "--min-tokens", "5"]
    assert main(["generate", "--model", str(d), "--prompt", "the cat", "--raw", "--temperature", "0",
                 "--max-new-tokens", "8", "--output-file", str(out_file), "--enforce-eager", *flags]) == 0
    row = json.loads(out_file.read_text())
    want = LLM(d, kv_cache_tokens=512).generate("the cat", SamplingParams(
        temperature=0, max_new_tokens=8, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3,
        min_tokens=5))[0]
    assert row["token_ids"] == want.token_ids and len(want.token_ids) >= 5
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", "x", "--presence-penalty", "3", "--enforce-eager"]) == 2
    assert "presence_penalty=3.0 must be a number in [-2, 2]" in capsys.readouterr().err


# ---- the server, with the openai client ---------------------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_serve import CONTEXT, Server

    tok = train_bpe(["the cat sat on the mat. the dog ate the bone! hello world " * 20], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size), std=0.2)
    d = tmp_path_factory.mktemp("penalties") / "tiny-v3"
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)
    srv = Server(d)
    yield srv, LLM(d, max_model_len=CONTEXT, kv_cache_tokens=1024)
    srv.stop()


PROMPT = "the cat sat on the"
SERVER_CASES = {  # request fields -> SamplingParams fields
    "presence_penalty": (dict(presence_penalty=2.0), dict(presence_penalty=2.0)),
    "frequency_penalty": (dict(frequency_penalty=1.5), dict(frequency_penalty=1.5)),
    "repetition_penalty": (dict(extra_body={"repetition_penalty": 2.0}), dict(repetition_penalty=2.0)),
    "logit_bias": (dict(logit_bias={"7": 6.0, "9": -100}), dict(logit_bias={7: 6.0, 9: -100.0})),
    "min_tokens": (dict(extra_body={"min_tokens": 12}, logit_bias={"1": 5}),
                   dict(min_tokens=12, logit_bias={1: 5.0})),
}


@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_server_parameters_change_the_output_as_the_engine_does(served, case):
    srv, ref = served
    client = srv.client()
    req, sp = SERVER_CASES[case]
    model = "tiny-v3"
    # 40 tokens: the greedy output of this model repeats a token (which the penalties change)
    plain = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=40)
    r = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=40, **req)
    want = ref.generate(PROMPT, SamplingParams(temperature=0, max_new_tokens=40, **sp))[0]
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.choices[0].text != plain.choices[0].text
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                          temperature=0, max_tokens=14, **req)
    ids = ref.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    assert chat.choices[0].message.content == ref.generate([ids], SamplingParams(temperature=0, max_new_tokens=14,
                                                                                 **sp))[0].text


def test_server_logit_bias_forces_and_min_tokens_delays_eos(served):
    srv, ref = served
    client = srv.client()
    eos = ref.tokenizer.eos_token_id
    forced = client.completions.create(model="tiny-v3", prompt=PROMPT, temperature=1.0, max_tokens=6,
                                       logit_bias={"42": 100})
    assert forced.choices[0].text == ref.tokenizer.decode([42] * 6)
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=20, logit_bias={str(eos): 100})
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=20, logit_bias={str(eos): 100},
                                       extra_body={"min_tokens": 7})
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "stop" and r.choices[0].message.content


BAD = {  # request fields -> (param named, a phrase of the message)
    "presence too high": (dict(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
    "frequency too low": (dict(frequency_penalty=-3), "frequency_penalty", "greater than or equal to -2"),
    "presence a string": (dict(presence_penalty="1"), "presence_penalty", "number"),
    "repetition zero": (dict(repetition_penalty=0), "repetition_penalty", "greater than 0"),
    "logit_bias key not an id": (dict(logit_bias={"cat": 1}), "logit_bias", "not a token id"),
    "logit_bias out of range": (dict(logit_bias={"5": 101}), "logit_bias", "[-100, 100]"),
    "logit_bias not a number": (dict(logit_bias={"5": "1"}), "logit_bias", "[-100, 100]"),
    "logit_bias a list": (dict(logit_bias=[5]), "logit_bias", "dictionary"),
    "logit_bias outside the vocabulary": (dict(logit_bias={"100000": 1}), None, "logit_bias: token id 100000"),
    "min_tokens negative": (dict(min_tokens=-1), "min_tokens", "greater than or equal to 0"),
    "min_tokens above max_tokens": (dict(min_tokens=11, max_tokens=10), "min_tokens", "more than the 10 tokens"),
}


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("case", list(BAD))
def test_server_bad_values_get_a_400_naming_the_param(served, case, endpoint):
    srv, _ = served
    fields, param, phrase = BAD[case]
    body = {"model": "tiny-v3", "max_tokens": 4, **fields}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in endpoint else {"prompt": "hi"})
    r = srv.http.post(endpoint, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert phrase in err["message"] and err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_include_usage_streams_a_final_usage_chunk(served, kind):
    """stream_options.include_usage: every chunk has usage null but the last, which has no choices and the
    usage of the whole request (the same counts as without streaming, over n choices)."""
    srv, _ = served
    client = srv.client()
    if kind == "chat":
        create, req = client.chat.completions.create, dict(messages=[{"role": "user", "content": "the dog"}])
    else:
        create, req = client.completions.create, dict(prompt=["the dog", "hello"])
    req.update(model="tiny-v3", max_tokens=7, n=2, seed=3, presence_penalty=0.5)
    whole = create(**req)
    chunks = list(create(**req, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and all(c.usage is None for c in chunks[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    plain = list(create(**req, stream=True))
    assert all(getattr(c, "usage", None) is None for c in plain) and plain[-1].choices
