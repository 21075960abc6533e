"""`dsv3 serve` under hostile load and with broken models: admission counts sequences (prompts x n), one request
cannot take the whole queue, nothing a request sends is a 500, and a model that cannot run is never served.

The same harness as test_serve.py: a real uvicorn server on 127.0.0.1 over a tiny random model, the engine held
still with a gate where a test needs requests to stay queued (nothing depends on timing)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
import torch

import dsv3
from dsv3.infer import LLM
from dsv3.serve import create_app

from conftest import random_model, tiny_config
from test_serve import CONTEXT, GOOD_CHAT, MODEL, GatedLLM, Server, model_dir, wait_for  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def cmpl(**kw) -> dict:
    return {"model": MODEL, "prompt": "the cat", "max_tokens": 2, **kw}


def in_thread(fn) -> tuple[threading.Thread, list]:
    """Run fn() in a thread; its result lands in the returned list."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


# ---- admission counts sequences ---------------------------------------------------------------------------------

def test_a_request_larger_than_the_queue_is_refused_whole(model_dir):
    """400 prompts x n=100 once queued 39,546 sequences on a queue of 4: a request that alone holds more sequences
    than may ever wait is a 400 naming the limit and its count, and nothing of it reaches the engine."""
    srv = Server(model_dir, max_queue=4, max_num_seqs=1)
    try:
        before = srv.metrics()
        for body, count in ((cmpl(prompt=["the cat", "the dog", "hello"], n=2), 6),
                            (cmpl(prompt=["the cat"] * 5), 5)):
            r = srv.http.post("/v1/completions", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "too_many_sequences"
            assert "max_queue=4" in err["message"] and f"{count} sequences" in err["message"], err["message"]
        r = srv.http.post("/v1/chat/completions", json={**GOOD_CHAT, "n": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        after = srv.metrics()
        assert after["dsv3_requests_total"] == before["dsv3_requests_total"]  # the engine saw none of them
        # a request of exactly max_queue sequences is served
        r = srv.http.post("/v1/completions", json=cmpl(prompt=["the cat", "the dog"], n=2))
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
    finally:
        srv.stop()


def test_the_queue_counts_sequences_not_http_requests(model_dir):
    srv = Server(model_dir, max_queue=4, max_num_seqs=1)
    m = srv.metrics
    try:
        srv.llm.hold()
        t1, first = in_thread(lambda: srv.http.post("/v1/completions", json=cmpl(prompt=["a", "b", "c"])))
        wait_for(lambda: m()["dsv3_num_requests_waiting"] == 3, "three sequences to queue")
        # 3 waiting + 2 would be 5 > 4: a 429 (formerly admitted, since only 3 < 4 were waiting)
        t2, second = in_thread(lambda: srv.http.post("/v1/chat/completions", json={**GOOD_CHAT, "n": 2}))
        wait_for(lambda: second or m()["dsv3_num_requests_waiting"] > 3, "the second request's fate")
        assert second and second[0].status_code == 429, second
        err = second[0].json()["error"]
        assert err["code"] == "queue_full" and "max_queue=4" in err["message"], err["message"]
        # 3 + 1 = 4 fits
        t3, third = in_thread(lambda: srv.http.post("/v1/chat/completions", json=GOOD_CHAT))
        wait_for(lambda: m()["dsv3_num_requests_waiting"] == 4, "the fourth sequence to queue")
        assert srv.http.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 429
        srv.llm.allow()
        for t in (t1, t3):
            t.join()
        assert first[0].status_code == 200 and len(first[0].json()["choices"]) == 3
        assert third[0].status_code == 200
        after = m()
        assert after["dsv3_num_requests_waiting"] == 0 and after["dsv3_num_requests_running"] == 0
        assert after["dsv3_requests_rejected_total"] == 2
    finally:
        srv.stop()


def test_a_per_request_cap_on_prompts_times_n(model_dir):
    """One client cannot starve the others: a request may hold at most max_seqs_per_request sequences, however
    large the queue."""
    llm = GatedLLM(model_dir, max_model_len=CONTEXT)
    with pytest.raises(ValueError, match="max_seqs_per_request"):
        create_app(llm, MODEL, max_seqs_per_request=0)
    srv = Server(model_dir, max_queue=64, max_seqs_per_request=4)
    try:
        for path, body, count in (("/v1/chat/completions", {**GOOD_CHAT, "n": 5}, 5),
                                  ("/v1/completions", cmpl(prompt=["a", "b"], n=3), 6),
                                  ("/v1/completions", cmpl(prompt=[[5, 6]] * 7), 7)):
            r = srv.http.post(path, json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "too_many_sequences", err
            assert "max_seqs_per_request=4" in err["message"] and f"{count} sequences" in err["message"], err
        assert srv.http.post("/v1/completions", json=cmpl(prompt=["a", "b"], n=2)).status_code == 200
        assert srv.metrics()["dsv3_max_seqs_per_request"] == 4
    finally:
        srv.stop()


def test_the_count_is_released_on_finish_disconnect_engine_error_and_refusal(model_dir):
    """After every way a request can end, the queue is back to empty: a request of max_queue sequences is
    admitted again."""
    srv = Server(model_dir, max_queue=2, max_num_seqs=1)
    m = srv.metrics

    def full_request_is_admitted():
        r = srv.http.post("/v1/completions", json=cmpl(prompt=["the cat", "the dog"]))
        assert r.status_code == 200, r.text
        after = m()
        assert after["dsv3_num_requests_waiting"] == 0 and after["dsv3_num_requests_running"] == 0
        assert after["dsv3_kv_cache_usage_ratio"] == 0

    try:
        full_request_is_admitted()  # finished
        # a streaming client that hangs up while both of its sequences are queued or running
        srv.llm.hold()
        body = cmpl(prompt=["the cat", "the dog"], max_tokens=50, stream=True, ignore_eos=True)
        with srv.http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            wait_for(lambda: m()["dsv3_num_requests_waiting"] == 2, "the request to queue")
            srv.llm.allow(1)
            next(r.iter_lines())
        wait_for(lambda: m()["dsv3_requests_cancelled_total"] == 1, "the server to see the disconnect")
        srv.llm.allow()
        wait_for(lambda: m()["dsv3_num_requests_waiting"] + m()["dsv3_num_requests_running"] == 0, "the abort")
        full_request_is_admitted()
        # the engine fails a step
        srv.llm.fail_next_step = True
        assert srv.http.post("/v1/completions", json=cmpl(prompt=["the cat", "the dog"])).status_code == 500
        full_request_is_admitted()
        # the engine refuses the second sequence of a request (its own validation): a 400, the first one aborted
        srv.llm.refuse_after = 1
        r = srv.http.post("/v1/completions", json=cmpl(prompt=["the cat", "the dog"]))
        assert r.status_code == 400 and "refused by the engine" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        full_request_is_admitted()
    finally:
        srv.stop()


def test_a_request_the_engine_chokes_on_fails_alone(model_dir):
    """An unexpected error while one request is added to the engine answers that request (a 500) and leaves the
    others in flight alone."""
    srv = Server(model_dir, max_queue=8)
    m = srv.metrics
    try:
        srv.llm.hold()
        innocent = {**GOOD_CHAT, "max_tokens": 20, "ignore_eos": True}
        t1, other = in_thread(lambda: srv.http.post("/v1/chat/completions", json=innocent))
        wait_for(lambda: m()["dsv3_num_requests_waiting"] == 1, "the innocent request to queue")
        srv.llm.allow(1)  # its prefill: it is running
        wait_for(lambda: m()["dsv3_num_requests_running"] == 1, "the innocent request to run")
        srv.llm.crash_after = 0
        t2, bad = in_thread(lambda: srv.http.post("/v1/completions", json=cmpl()))
        wait_for(lambda: m()["dsv3_num_requests_waiting"] == 1, "the bad request to queue")
        srv.llm.allow()
        for t in (t1, t2):
            t.join()
        assert bad[0].status_code == 500 and bad[0].json()["error"]["type"] == "server_error"
        assert other[0].status_code == 200, other[0].text
        assert other[0].json()["usage"]["completion_tokens"] == 20
        assert m()["dsv3_num_requests_waiting"] == 0
    finally:
        srv.stop()


# ---- no request-caused 500s -------------------------------------------------------------------------------------

def test_max_tokens_null_means_the_rest_of_the_context(model_dir):
    srv = Server(model_dir)
    try:
        for path, body in (("/v1/completions", cmpl(max_tokens=None, ignore_eos=True)),
                           ("/v1/completions", cmpl(prompt=["the cat", [5, 6, 7, 8]], max_tokens=None,
                                                    ignore_eos=True)),
                           ("/v1/chat/completions", {**GOOD_CHAT, "max_tokens": None, "ignore_eos": True})):
            r = srv.http.post(path, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert all(c["finish_reason"] == "length" for c in out["choices"])
            assert out["usage"]["total_tokens"] == CONTEXT * len(out["choices"])  # each prompt + its rest
        # streamed: the same
        with srv.http.stream("POST", "/v1/completions", json=cmpl(max_tokens=None, ignore_eos=True, stream=True,
                                                                  stream_options={"include_usage": True})) as r:
            events = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert events[-1]["usage"]["total_tokens"] == CONTEXT
    finally:
        srv.stop()


def test_top_k_beyond_any_vocabulary_keeps_every_token(server_for_top_k):
    srv = server_for_top_k
    base = cmpl(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    want = srv.http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    for k in (10**6, 2**63, 10**30):
        r = srv.http.post("/v1/completions", json={**base, "top_k": k})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    assert srv.http.post("/v1/chat/completions", json=GOOD_CHAT).status_code == 200


@pytest.fixture
def server_for_top_k(model_dir):
    srv = Server(model_dir)
    yield srv
    srv.stop()


# ---- a model that cannot run is not served ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, model_dir):
    """The served model with a NaN in its final norm: it loads, and every logit is NaN."""
    model = dsv3.load_pretrained(model_dir)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    d = tmp_path_factory.mktemp("nan") / "nan-v3"
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=LLM(model_dir).tokenizer)
    return d


def test_create_app_runs_the_model_once_and_refuses_one_that_fails(model_dir, nan_model_dir):
    llm = GatedLLM(model_dir, max_model_len=CONTEXT)
    steps = llm.stats["steps"]
    create_app(llm, MODEL)
    assert llm.stats["steps"] > steps  # a warm-up generate ran
    llm.fail_next_step = True
    with pytest.raises(RuntimeError, match="warm-up.*injected failure"):
        create_app(llm, MODEL)
    assert not llm.has_unfinished()  # and left nothing behind
    with pytest.raises(RuntimeError, match="not finite"):
        create_app(LLM(nan_model_dir, max_model_len=CONTEXT), MODEL)


def test_dsv3_serve_refuses_to_start_a_model_that_cannot_run(nan_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(nan_model_dir), "--port",
                             str(port), "--max-model-len", str(CONTEXT), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(lambda: proc.poll() is not None or healthy(), "dsv3 serve to exit or start", limit=120)
        assert proc.poll() is not None, "a model whose logits are NaN was served"
        out = proc.stdout.read()
        assert proc.returncode != 0 and "not finite" in out, out
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
