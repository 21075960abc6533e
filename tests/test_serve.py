"""`dsv3 serve`: the OpenAI-compatible server, run for real (uvicorn on a free port of 127.0.0.1) over a tiny
random model with a trained tokenizer. The official openai client for what clients do, httpx (and a raw
socket) for what no client should send; every answer is checked against the engine or the model itself.

Some tests hold the engine loop still with a gate before each step (GatedLLM), so that requests stay queued
for exactly as long as the test needs: nothing here depends on timing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import dsv3
from dsv3.infer import LLM, SamplingParams
from dsv3.serve import create_app
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny-v3"
CONTEXT = 256


class GatedLLM(LLM):
    """The real engine with a gate before each step: after hold(), the engine loop stands still before its next
    step; allow(k) lets k more steps run (None: all)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Condition()
        self.steps_allowed: int | None = None

    def hold(self) -> None:
        self.allow(0)

    def allow(self, k: int | None = None) -> None:
        with self.gate:
            self.steps_allowed = k
            self.gate.notify_all()

    def step(self):
        with self.gate:
            self.gate.wait_for(lambda: self.steps_allowed is None or self.steps_allowed > 0)
            if self.steps_allowed is not None:
                self.steps_allowed -= 1
        if getattr(self, "fail_next_step", False):  # a bug or an out-of-memory, on demand
            self.fail_next_step = False
            raise RuntimeError("injected failure")
        return super().step()

    def add_request(self, *args, **kwargs):
        """refuse_after = k: the engine's own validation refuses the request added after k more (a ValueError);
        crash_after = k: the same with an unexpected error (a bug)."""
        for name, error in (("refuse_after", ValueError("refused by the engine (injected)")),
                            ("crash_after", RuntimeError("injected crash in add_request"))):
            k = getattr(self, name, None)
            if k is not None:
                setattr(self, name, None if k == 0 else k - 1)
                if k == 0:
                    raise error
        return super().add_request(*args, **kwargs)


def wait_for(predicate, what: str, limit: float = 60.0):
    """Poll until predicate() holds (a deadline only so that a broken server fails instead of hanging)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


class Server:
    """create_app(...) under uvicorn in a background thread, on a port the OS picked."""

    def __init__(self, model_dir, api_key=None, max_queue=64, max_seqs_per_request=None, **llm_kwargs):
        llm_kwargs.setdefault("max_model_len", CONTEXT)
        self.llm = GatedLLM(model_dir, **llm_kwargs)
        limits = {} if max_seqs_per_request is None else {"max_seqs_per_request": max_seqs_per_request}
        app = create_app(self.llm, MODEL, api_key=api_key, max_queue=max_queue, **limits)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def client(self, api_key="none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self):
        self.llm.allow()
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_bpe(["the cat sat on the mat. the dog ate the bone! hello world " * 20], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size), std=0.2)
    d = tmp_path_factory.mktemp("serve") / MODEL
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)  # fp32: logprobs comparable to 1e-4
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def ref(model_dir):
    """The engine on its own, for the answers the server must give."""
    return LLM(model_dir, max_model_len=CONTEXT, kv_cache_tokens=1024)


@pytest.fixture(scope="module")
def model(model_dir):
    return dsv3.load_pretrained(model_dir)


def chat_ids(llm, messages):
    return llm.tokenizer.apply_chat_template(messages, tokenize=True)


def greedy(llm, prompt, n, ignore_eos=False):
    return llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=ignore_eos))[0]


@torch.no_grad()
def log_softmax(model, ids):
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, the cat"}]


# ---- the openai client ------------------------------------------------------------------------------------------

def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_equals_engine_and_streaming_equals_non_streaming(client, ref):
    want = greedy(ref, chat_ids(ref, MESSAGES), 10)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                                 max_completion_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage  # usage in the last chunk, when asked
    assert all(ch.usage is None for ch in chunks[:-1])


def test_a_repeated_long_prefix_is_served_from_the_prefix_cache(server, client, ref):
    """A conversation longer than a cache block, asked twice: the second answer is the same, its usage says how
    many prompt tokens came from the prefix cache (OpenAI's prompt_tokens_details.cached_tokens), and /metrics
    counts them."""
    block = server.llm.cache.block_size
    messages = [{"role": "system", "content": "the cat sat on the mat and the dog ate the bone " * 8},
                {"role": "user", "content": "hello world"}]
    n_prompt = len(chat_ids(ref, messages))
    assert n_prompt > block
    before = server.metrics()
    kw = dict(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    first, second = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == block * ((n_prompt - 1) // block)
    after = server.metrics()
    hits = after["dsv3_prefix_cache_hits_total"] - before["dsv3_prefix_cache_hits_total"]
    assert hits == second.usage.prompt_tokens_details.cached_tokens
    assert after["dsv3_prefix_cache_queries_total"] - before["dsv3_prefix_cache_queries_total"] == 2 * n_prompt
    # another tenant's salt: the blocks are out of its reach, until it has computed its own
    salted = [client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-b"}) for _ in range(2)]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in salted] == [0, block * ((n_prompt - 1) // block)]
    assert salted[0].choices[0].message.content == first.choices[0].message.content


def test_completions_string_token_ids_and_n(client, ref):
    want = greedy(ref, "the cat", 8, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt="the cat", temperature=0, max_tokens=8,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 8)
    ids = [5, 17, 42, 99, 3]
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6)
    assert r.choices[0].text == greedy(ref, ids, 6).text
    # several prompts, n choices each: index = prompt * n + choice; seeded, so the whole answer repeats
    prompts = ["the dog", [7, 8, 9]]
    kw = dict(model=MODEL, prompt=prompts, n=3, temperature=1.0, seed=11, max_tokens=5,
              extra_body={"ignore_eos": True, "top_k": 50})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.prompt_tokens == len(ref.encode_prompt("the dog")) + 3 and a.usage.completion_tokens == 30
    # choice j of a seeded request has seed + j: the engine alone gives the same tokens
    alone = ref.generate(["the dog"], SamplingParams(temperature=1.0, top_k=50, max_new_tokens=5, seed=12,
                                                     ignore_eos=True))[0]
    assert a.choices[1].text == alone.text


def test_echo_logprobs_are_the_models_own(client, model, ref):
    prompt = "the cat sat on the mat"
    ids = ref.encode_prompt(prompt)
    lp = log_softmax(model, ids)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    got = c.logprobs
    assert len(got.tokens) == len(ids) and got.token_logprobs[0] is None and got.top_logprobs[0] is None
    for k in range(1, len(ids)):
        assert got.token_logprobs[k] == pytest.approx(lp[k - 1, ids[k]].item(), abs=1e-4)
        top = got.top_logprobs[k]
        assert 3 <= len(top) <= 4  # the 3 most likely and the prompt's own token
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(lp[k - 1].topk(3).values.tolist(), abs=1e-4)
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)

    # echo with generation: the generated tokens' logprobs continue the prompt's
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    out = greedy(ref, prompt, 3, ignore_eos=True)
    assert c.text == prompt + out.text and len(c.logprobs.tokens) == len(ids) + 3
    full = log_softmax(model, ids + out.token_ids)
    want = [full[k - 1, t].item() for k, t in enumerate(ids + out.token_ids) if k]
    assert c.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    # streamed, the echo comes first and the pieces add up to the same
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-6)


def test_chat_logprobs(client, model, ref):
    prompt = chat_ids(ref, MESSAGES)
    out = greedy(ref, prompt, 6, ignore_eos=True)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    full = log_softmax(model, prompt + out.token_ids)
    for k, (entry, t) in enumerate(zip(content, out.token_ids)):
        assert entry.logprob == pytest.approx(full[len(prompt) - 1 + k, t].item(), abs=1e-4)
        tops = [x.logprob for x in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy took the most likely token
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace") == \
        ref.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=3)
    assert r.choices[0].logprobs is None


def test_stop_strings(client, ref):
    full = greedy(ref, "the cat", 16, ignore_eos=True).text
    assert len(full) >= 6, full
    stop = full[3:5]
    want = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt="the cat", temperature=0, max_tokens=16, stop=[stop, "zzzz"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="the cat", temperature=0, max_tokens=16, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client, ref):
    """vLLM's stop_token_ids: the output ends at the first of them, which it keeps (as vLLM does for a token that
    is not special)."""
    full = greedy(ref, "the cat", 8, ignore_eos=True)
    stop = full.token_ids[3]
    want = full.token_ids[:full.token_ids.index(stop) + 1]
    r = client.completions.create(model=MODEL, prompt="the cat", temperature=0, max_tokens=8,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(want)
    assert r.choices[0].text == ref.tokenizer.decode(want)


def test_seed_reproducibility(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=8,
                                              seed=seed, extra_body={"ignore_eos": True}).choices[0].message.content

    assert sample(123) == sample(123)
    assert len({sample(s) for s in range(4)}) > 1


def test_concurrent_requests_are_batched_and_equal_their_sequential_answers(server, client):
    def ask(i):
        if i % 2:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"cat {i}"}],
                                               temperature=0, max_tokens=6 + i % 3, extra_body={"ignore_eos": True})
            return r.choices[0].message.content, r.usage.completion_tokens
        r = client.completions.create(model=MODEL, prompt="the dog " * (i + 1), temperature=0, max_tokens=6 + i % 3,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    N = 8
    sequential = [ask(i) for i in range(N)]
    before = server.metrics()
    server.llm.hold()  # hold the engine, so that all N are queued before the first step
    results = [None] * N
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i))) for i in range(N)]
    for t in threads:
        t.start()
    wait_for(lambda: server.metrics()["dsv3_num_requests_waiting"] == N, "all requests to queue")
    server.llm.allow()
    for t in threads:
        t.join()
    assert results == sequential
    after = server.metrics()
    tokens = sum(n for _, n in sequential)
    steps = after["dsv3_engine_steps_total"] - before["dsv3_engine_steps_total"]
    assert steps <= 1 + max(n for _, n in sequential)  # one prefill for all, then one decode step per token
    assert steps < tokens  # one at a time would have taken a step per token
    assert after["dsv3_generation_tokens_total"] - before["dsv3_generation_tokens_total"] == tokens
    assert after["dsv3_requests_total"] - before["dsv3_requests_total"] == N
    assert after["dsv3_num_requests_running"] == 0 and after["dsv3_kv_cache_usage_ratio"] == 0


# ---- bad input: httpx --------------------------------------------------------------------------------------------

GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "the cat sat on the mat " * 60  # over CONTEXT tokens


def _chat(**kw):
    return {"path": "/v1/chat/completions", "json": {**GOOD_CHAT, **kw}}


def _cmpl(**kw):
    return {"path": "/v1/completions", "json": {"model": MODEL, "prompt": "the cat", "max_tokens": 2, **kw}}


def _raw(message: str) -> dict:
    """A chat request with one message written as raw JSON (httpx cannot encode a lone surrogate itself)."""
    return {"path": "/v1/chat/completions",
            "content": f'{{"model": "{MODEL}", "max_tokens": 2, "messages": [{message}]}}'.encode()}


def _raw_cmpl(fields: str) -> dict:
    """A completion request with fields written as raw JSON (later keys replace the defaults')."""
    body = json.loads(f'{{"model": "{MODEL}", "prompt": "the cat", "max_tokens": 2, {fields}}}')
    return {"path": "/v1/completions", "content": json.dumps(body).encode()}  # ASCII, surrogates as escapes


def _without(key):
    body = dict(GOOD_CHAT)
    del body[key]
    return {"path": "/v1/chat/completions", "json": body}


BAD = {  # case -> (request, status, param named or None, a phrase of the message)
    "malformed json": ({"path": "/v1/chat/completions", "content": b'{"model": "tiny-v3", "messages": [}'},
                       400, None, "not valid JSON"),
    "body not an object": ({"path": "/v1/chat/completions", "content": b"[1, 2]"}, 400, None, "JSON object"),
    "empty body": ({"path": "/v1/completions", "content": b""}, 400, None, "no body"),
    "missing messages": (_without("messages"), 400, "messages", "required"),
    "missing model": (_without("model"), 400, "model", "required"),
    "messages not a list": (_chat(messages="hi"), 400, "messages", "list"),
    "temperature a string": (_chat(temperature="hot"), 400, "temperature", "number"),
    "max_tokens a string": (_cmpl(max_tokens="2"), 400, "max_tokens", "integer"),
    "stream not a bool": (_chat(stream=1), 400, "stream", "boolean"),
    "temperature too high": (_chat(temperature=2.5), 400, "temperature", "less than or equal to 2"),
    "top_p zero": (_chat(top_p=0), 400, "top_p", "greater than 0"),
    "n zero": (_chat(n=0), 400, "n", "greater than or equal to 1"),
    "max_tokens negative": (_chat(max_tokens=-1), 400, "max_tokens", "greater than or equal to 1"),
    "top_logprobs too many": (_chat(logprobs=True, top_logprobs=30), 400, "top_logprobs", "less than or equal"),
    "top_logprobs without logprobs": (_chat(top_logprobs=2), 400, None, "logprobs: true"),
    "completion logprobs too many": (_cmpl(logprobs=50), 400, "logprobs", "less than or equal to 20"),
    "max_tokens 0 without echo": (_cmpl(max_tokens=0), 400, None, "echo"),
    "stop empty string": (_chat(stop=[""]), 400, "stop", "non-empty"),
    "too many stops": (_chat(stop=[chr(97 + i) for i in range(17)]), 400, "stop", "1 to 16"),
    "stream_options without stream": (_chat(stream_options={"include_usage": True}), 400, None, "stream"),
    "penalty out of range": (_chat(presence_penalty=2.5), 400, "presence_penalty", "less than or equal to 2"),
    "unknown model": (_chat(model="gpt-4o"), 404, "model", "does not exist"),
    "empty messages": (_chat(messages=[]), 400, "messages", "at least 1"),
    "bad role": (_chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role", "'user'"),
    "tool message answering no call": (_chat(messages=[{"role": "tool", "content": "42"}]), 400, "messages",
                                       "must follow an assistant message with tool_calls"),
    "content not text": (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                         400, "messages.0.content", "only text parts"),
    "user without content": (_chat(messages=[{"role": "user"}]), 400, "messages.0", "needs content"),
    "prompt + max_tokens beyond the context": (_chat(max_tokens=CONTEXT), 400, "messages", "maximum context length"),
    "prompt alone beyond the context": (_cmpl(prompt=LONG, max_tokens=1), 400, "prompt", "maximum context length"),
    "chat prompt fills the context": (_chat(messages=[{"role": "user", "content": LONG}], max_tokens=None), 400,
                                      "messages", "no room"),
    "token id outside the vocabulary": (_cmpl(prompt=[1, 2, 100000]), 400, "prompt", "outside the vocabulary"),
    "logit_bias outside the vocabulary": (_chat(logit_bias={"100000": 5}), 400, "logit_bias", "outside the vocabulary"),
    "stop token outside the vocabulary": (_cmpl(prompt="hi", stop_token_ids=[100000]), 400, "stop_token_ids",
                                          "outside the vocabulary"),
    "empty token list": (_cmpl(prompt=[]), 400, "prompt", "non-empty"),
    "prompt wrong type": (_cmpl(prompt=3), 400, "prompt", "must be a string"),
    # strings JSON can spell but UTF-8 cannot encode (a lone surrogate): the tokenizer cannot take them
    "lone surrogate in a message": (_raw('{"role": "user", "content": "hi \\ud800"}'), 400, "messages.0.content",
                                    "lone surrogate"),
    "lone surrogate in a text part": (_raw('{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}'),
                                      400, "messages.0.content", "lone surrogate"),
    "lone surrogate in a name": (_raw('{"role": "user", "content": "hi", "name": "\\ud800"}'), 400,
                                 "messages.0.name", "lone surrogate"),
    "lone surrogate in a prompt": (_raw_cmpl('"prompt": "the \\ud800 cat"'), 400, "prompt", "lone surrogate"),
    "lone surrogate in a prompt list": (_raw_cmpl('"prompt": ["the cat", "\\udc00"]'), 400, "prompt", "item 1"),
    "lone surrogate in a stop": (_raw_cmpl('"stop": ["\\ud800"]'), 400, "stop", "lone surrogate"),
    "lone surrogate in user": (_raw_cmpl('"user": "\\ud800"'), 400, "user", "lone surrogate"),
    "lone surrogate in cache_salt": (_raw_cmpl('"cache_salt": "\\ud800"'), 400, "cache_salt", "lone surrogate"),
    "max_tokens null with n 0": (_cmpl(max_tokens=None, n=0), 400, "n", "greater than or equal to 1"),
    "completion max_tokens negative": (_cmpl(max_tokens=-5), 400, "max_tokens", "greater than or equal to 0"),
    "max_completion_tokens 0": (_chat(max_completion_tokens=0), 400, "max_completion_tokens", "greater than"),
    "top_logprobs negative": (_chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs", "greater than"),
    "completion logprobs a bool": (_cmpl(logprobs=True), 400, "logprobs", "integer"),
    "stop a number": (_cmpl(stop=5), 400, "stop", "string"),
    "stop a list of numbers": (_chat(stop=[1, 2]), 400, "stop", "string"),
    "top_k below -1": (_cmpl(top_k=-2), 400, "top_k", "greater than or equal to -1"),
    "seed beyond 64 bits": (_cmpl(seed=2**64), 400, "seed", "less than"),
    "messages null": (_chat(messages=None), 400, "messages", "list"),
    "message not an object": (_chat(messages=["hi"]), 400, "messages.0", "dictionary"),
    "unknown endpoint": ({"path": "/v1/embeddings", "json": {}}, 404, None, "no such endpoint"),
    "wrong method": ({"path": "/v1/models", "method": "DELETE"}, 405, None, "not allowed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_in_openai_shape_and_the_server_goes_on(server, case):
    req, status, param, phrase = BAD[case]
    req = dict(req)
    r = server.http.request(req.pop("method", "POST"), req.pop("path"),
                            headers={"Content-Type": "application/json"}, **req)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert phrase in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    good = server.http.post("/v1/chat/completions", json=GOOD_CHAT)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key(model_dir):
    srv = Server(model_dir, api_key="sekret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = srv.http.post("/v1/chat/completions", json=GOOD_CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = srv.http.post("/v1/chat/completions", content=b"{bad json")  # refused before the body is read
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert srv.client("sekret").chat.completions.create(**GOOD_CHAT).choices[0].finish_reason
        assert srv.http.get("/health").json() == {"status": "ok"}  # health and metrics stay open
        assert srv.metrics()['dsv3_http_errors_total{status="401"}'] == 5
        assert srv.http.post("/tokenize", json={"prompt": "the cat"}).status_code == 401  # the tokenizer: guarded
        assert srv.http.get("/tokenizer_info", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert srv.http.post("/rebalance").status_code == 401  # an operator's action: guarded
    finally:
        srv.stop()


def test_full_queue_gets_429_and_the_server_recovers(model_dir):
    srv = Server(model_dir, max_queue=1, max_num_seqs=1)
    try:
        srv.llm.hold()
        first: list = []
        t = threading.Thread(target=lambda: first.append(srv.http.post("/v1/chat/completions", json=GOOD_CHAT)))
        t.start()
        wait_for(lambda: srv.metrics()["dsv3_num_requests_waiting"] == 1, "the first request to queue")
        r = srv.http.post("/v1/completions", json={"model": MODEL, "prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "queue_full" and "max_queue=1" in err["message"] and set(err) >= {"type", "param"}
        with pytest.raises(openai.RateLimitError):
            srv.client().chat.completions.create(**GOOD_CHAT)
        srv.llm.allow()
        t.join()
        assert first[0].status_code == 200
        assert srv.http.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200
        assert srv.metrics()["dsv3_requests_rejected_total"] == 2
    finally:
        srv.stop()


def test_a_client_that_disconnects_is_aborted(model_dir):
    """A client that hangs up, streaming or not, has its request aborted and its cache blocks freed."""
    srv = Server(model_dir)
    m = srv.metrics
    try:
        def run_one_step_then(hang_up, n):
            """Queue a request (held), let the engine run its prefill, have the client hang up, and check that
            the engine aborts it rather than going on to its 100 tokens."""
            wait_for(lambda: m()["dsv3_num_requests_waiting"] == 1, "the request to queue")
            srv.llm.allow(1)  # its prefill: it is running, with one token
            wait_for(lambda: m()["dsv3_num_requests_running"] == 1, "the request to run")
            hang_up()
            wait_for(lambda: m()["dsv3_requests_cancelled_total"] == n, "the server to see the disconnect")
            srv.llm.allow()
            wait_for(lambda: m()['dsv3_requests_finished_total{reason="abort"}'] == n, "the abort")
            after = m()
            assert after["dsv3_num_requests_running"] == 0 and after["dsv3_num_requests_waiting"] == 0
            assert after["dsv3_kv_cache_usage_ratio"] == 0  # its cache blocks are free again
            assert after["dsv3_generation_tokens_total"] <= 2 * n  # nowhere near 100 tokens each
            srv.llm.hold()

        srv.llm.hold()
        # streaming: read the role chunk and the first token's, then hang up
        body = {**GOOD_CHAT, "max_tokens": 100, "stream": True, "ignore_eos": True}
        with srv.http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert json.loads(next(lines)[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
            run_one_step_then(r.close, 1)
        # not streaming: a raw socket that sends a request and closes before the answer
        raw = json.dumps({**GOOD_CHAT, "max_tokens": 100, "ignore_eos": True}).encode()
        host, port = srv.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        run_one_step_then(sock.close, 2)
        srv.llm.allow()
        assert srv.http.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200
    finally:
        srv.stop()


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(server):
    """Not a client's mistake: a 500 in OpenAI's shape (or an error event mid-stream), and then business as usual."""
    server.llm.fail_next_step = True
    r = server.http.post("/v1/chat/completions", json=GOOD_CHAT)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "injected failure" in r.json()["error"]["message"]
    server.llm.fail_next_step = True
    lines = [line for line in server.http.post("/v1/chat/completions", json={**GOOD_CHAT, "stream": True}
                                               ).text.splitlines() if line]
    assert "injected failure" in json.loads(lines[-2][len("data: "):])["error"]["message"]
    assert lines[-1] == "data: [DONE]"
    assert server.http.get("/health").json() == {"status": "ok"}
    assert server.http.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200
    assert server.metrics()["dsv3_num_requests_running"] == 0


def test_dsv3_serve_command(model_dir, ref):
    """The CLI end to end, with MTP speculation and a key: the greedy answer is the plain engine's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DSV3_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(model_dir), "--port", str(port),
                             "--speculative", "mtp", "--num-speculative-tokens", "2", "--max-batch-size", "4",
                             "--max-model-len", str(CONTEXT),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "dsv3 serve to start", limit=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list().data] == [model_dir.name]  # the directory's name
        r = client.chat.completions.create(model=model_dir.name, messages=MESSAGES, temperature=0, max_tokens=10)
        assert r.choices[0].message.content == greedy(ref, chat_ids(ref, MESSAGES), 10).text
    finally:
        proc.terminate()
        proc.wait(30)



def test_tokenizer_endpoints_as_vllm(server, ref):
    """POST /tokenize (a text, or chat messages through the chat template), POST /detokenize, GET /tokenizer_info:
    the server's own tokens, as vLLM serves them."""
    tok = ref.tokenizer
    r = server.http.post("/tokenize", json={"model": MODEL, "prompt": "the cat sat", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("the cat sat") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0 and len(body["token_strs"]) == body["count"]
    plain = server.http.post("/tokenize", json={"prompt": "the cat sat", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("the cat sat", add_special_tokens=False) and plain["token_strs"] is None
    messages = [{"role": "user", "content": "the cat"}]
    r = server.http.post("/tokenize", json={"messages": messages})
    if tok.chat_template is not None:
        assert r.json()["tokens"] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        assert r.status_code == 400
    r = server.http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == tok.decode(body["tokens"], skip_special_tokens=False)
    info = server.http.get("/tokenizer_info").json()
    assert info["vocab_size"] == tok.vocab_size and info["bos_token_id"] == tok.bos_token_id
    assert info["model_max_length"] == body["max_model_len"]
    for path, bad, status in [("/tokenize", {"prompt": "x", "messages": messages}, 400), ("/tokenize", {}, 400),
                              ("/tokenize", {"prompt": "\ud800"}, 400), ("/tokenize", {"prompt": 5}, 400),
                              ("/tokenize", {"model": "other", "prompt": "x"}, 404),
                              ("/detokenize", {"tokens": [10 ** 9]}, 400), ("/detokenize", {"tokens": "x"}, 400),
                              ("/detokenize", {}, 400)]:
        r = server.http.post(path, content=json.dumps(bad), headers={"Content-Type": "application/json"})
        assert r.status_code == status and "error" in r.json(), (path, bad, r.status_code, r.text)


def test_rebalance_needs_expert_parallelism(server):
    """/rebalance re-places experts over the ranks of --ep: a one-process server says so (a 400 naming --ep), and
    its /metrics carry no expert-balance gauges (tests/test_model_parallel.py covers a model-parallel server)."""
    r = server.http.post("/rebalance")
    assert r.status_code == 400 and "--ep N" in r.json()["error"]["message"], r.text
    assert "dsv3_expert_load_max_over_mean" not in server.http.get("/metrics").text
