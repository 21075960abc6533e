"""Bad input is refused before it touches anything: a request (its SamplingParams and prompt) before the engine
schedules it, a config that no model could run with when a ModelConfig is built or read. After a refused
request the engine is exactly as it was: the next generate gives what a fresh engine gives."""

from __future__ import annotations

import pytest

from dsv3.infer import LLM, SamplingParams
from dsv3.tokenizer import train_bpe

from conftest import TINY, random_model, tiny_config

# ---- requests ----------------------------------------------------------------------------------------------

def engine(model, **kw) -> LLM:
    return LLM(model, cpu_kernels=False, block_size=4, kv_cache_tokens=256, max_model_len=64, seed=0, **kw)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), std=0.2)


# greedy, seeded sampling and unseeded sampling (the engine's shared stream): a refused request must consume
# nothing of any of them
GOOD_PROMPTS = [[5, 9, 2, 7], [11, 3, 4], [8, 1, 6, 2, 9]]
GOOD_PARAMS = [SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True),
               SamplingParams(temperature=1.0, seed=3, max_new_tokens=6, ignore_eos=True),
               SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)]


@pytest.fixture(scope="module")
def fresh(model):
    """What a fresh engine answers: (request id, tokens) per good request."""
    return [(o.request_id, o.token_ids) for o in engine(model).generate(GOOD_PROMPTS, GOOD_PARAMS)]


def assert_as_fresh(llm: LLM, fresh) -> None:
    assert llm.requests == {} and not llm.has_unfinished()
    assert not llm.scheduler.waiting and not llm.scheduler.running
    assert [(o.request_id, o.token_ids) for o in llm.generate(GOOD_PROMPTS, GOOD_PARAMS)] == fresh


@pytest.mark.parametrize("kw", [
    dict(seed=2 ** 64), dict(seed=-2 ** 63 - 1), dict(seed=1.5), dict(seed=True), dict(seed="7"),
    dict(temperature=float("inf")), dict(temperature=True), dict(top_k=True), dict(max_new_tokens=True),
    dict(max_new_tokens=2.0), dict(stop=5), dict(stop=[1]), dict(stop_token_ids=[-1]), dict(stop_token_ids=[True]),
    dict(stop_token_ids=5), dict(stop_token_ids=["1"]), dict(ignore_eos="no"),
])
def test_sampling_params_refuse_bad_fields(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_seeds_torch_accepts_are_accepted():
    for seed in (0, 2 ** 64 - 1, -2 ** 63, -1):
        SamplingParams(seed=seed)


def mutated(**kw) -> SamplingParams:
    """Params made valid and changed afterwards (a dataclass is mutable): the engine checks them again."""
    p = SamplingParams(temperature=1.0, max_new_tokens=6)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


BAD_REQUESTS = [  # (prompt, params, what the error names)
    ([5, 9, 2], mutated(seed=2 ** 64), "seed"),  # the case: scheduled, then the generator failed
    ([5, 9, 2], mutated(seed=-2 ** 63 - 1), "seed"),
    ([5, 9, 2], mutated(seed=0.5), "seed"),
    ([5, 9, 2], mutated(temperature=-1.0), "temperature"),
    ([5, 9, 2], mutated(temperature=float("nan")), "temperature"),
    ([5, 9, 2], mutated(top_p=0.0), "top_p"),
    ([5, 9, 2], mutated(top_k=-2), "top_k"),
    ([5, 9, 2], mutated(max_new_tokens=0), "max_new_tokens"),
    ([5, 9, 2], mutated(stop=[""]), "stop"),
    ([5, 9, 2], mutated(logprobs=21), "logprobs"),
    ([5, 9, 2], mutated(prompt_logprobs=-1), "prompt_logprobs"),
    ([5, 9, 2], mutated(stop_token_ids=[TINY["vocab_size"]]), "stop_token_ids"),
    ([5, 9, 2], "not params", "SamplingParams"),
    ([], None, "empty"),
    ([5, TINY["vocab_size"]], None, "vocabulary"),
    ([5, -1], None, "vocabulary"),
    ([5, 2.0], None, "token ids"),
    (None, None, "prompt"),
    (7, None, "prompt"),
    ("no tokenizer", None, "tokenizer"),
    ([1] * 64, None, "context"),
]


@pytest.mark.parametrize("prompt, params, names", BAD_REQUESTS)
def test_refused_request_leaves_the_engine_as_it_was(model, fresh, prompt, params, names):
    llm = engine(model)
    with pytest.raises(ValueError, match=names):
        llm.add_request(prompt, params)
    assert_as_fresh(llm, fresh)


def test_bad_cache_salt_is_refused(model, fresh):
    llm = engine(model)
    with pytest.raises(ValueError, match="cache_salt"):
        llm.add_request([5, 9, 2], SamplingParams(max_new_tokens=2), cache_salt=5)
    assert_as_fresh(llm, fresh)


@pytest.mark.parametrize("prompt, params, names", [
    ([5, 9, 2], mutated(seed=2 ** 64), "seed"), ([5, 9, 2], mutated(stop_token_ids=[10 ** 6]), "stop_token_ids"),
    ([5, TINY["vocab_size"]], None, "vocabulary")])
def test_bad_request_in_a_batch_adds_none_of_them(model, fresh, prompt, params, names):
    llm = engine(model)
    with pytest.raises(ValueError, match=names):
        llm.generate(GOOD_PROMPTS[:2] + [prompt] + GOOD_PROMPTS[2:], GOOD_PARAMS[:2] + [params] + GOOD_PARAMS[2:])
    assert_as_fresh(llm, fresh)


def test_interrupted_generate_leaves_nothing_behind(model, fresh):
    llm = engine(model)
    step, calls = llm.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    llm.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate(GOOD_PROMPTS, GOOD_PARAMS)
    llm.step = step
    assert llm.requests == {} and not llm.has_unfinished()
    assert [o.token_ids for o in llm.generate(GOOD_PROMPTS[:1], GOOD_PARAMS[:1])] == [fresh[0][1]]


def test_prompt_the_tokenizer_encodes_beyond_the_model_vocabulary():
    """A tokenizer with more tokens than the model's embedding: refused, not an IndexError in every later step."""
    text = "the cat sat on the mat. the dog ate the bone! "
    tok = train_bpe([text * 20], vocab_size=400)
    top = max(tok.encode(text))
    assert top > max(tok.encode("the")) and top > 8
    llm = engine(random_model(tiny_config(vocab_size=top)), tokenizer=tok)  # one row short
    with pytest.raises(ValueError, match="vocabulary"):
        llm.add_request(text, SamplingParams(max_new_tokens=2))
    assert llm.requests == {} and not llm.has_unfinished()
    out = llm.generate("the", SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
