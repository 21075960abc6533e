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
    srv.server.config.app.state.engine.hold_s = 0  # no room held for a refused request (the fair-admission tests)
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


# ---- fair admission: no stream of small requests keeps a larger one out; preempted sequences counted once ---

def one_step(srv) -> None:
    """Let the held engine run exactly one step, and wait for its figures."""
    steps = srv.metrics()["dsv3_engine_steps_total"]
    srv.llm.allow(1)
    wait_for(lambda: srv.metrics()["dsv3_engine_steps_total"] > steps, "an engine step")


def in_flight(srv) -> float:
    f = srv.metrics()
    return f["dsv3_num_requests_waiting"] + f["dsv3_num_requests_running"] + f.get("dsv3_num_requests_preempted", 0)


def post_and_see(srv, body) -> tuple[threading.Thread, list, bool]:
    """POST body while the engine is held: -> (thread, its response list, whether it was admitted). A refused
    request answers at once; an admitted one shows in the sequences in flight (its answer comes later)."""
    before = in_flight(srv)
    t, out = in_thread(lambda: srv.http.post("/v1/completions", json=body))
    wait_for(lambda: out or in_flight(srv) > before, "the request's fate")
    return t, out, not out


def test_a_stream_of_small_requests_cannot_keep_a_large_one_out(model_dir):
    """A queue of 4, full of one-sequence requests; a request of 3 gets a 429. Each time the engine frees a place,
    a small request arrives before the large one retries. It used to take the place, every time: the large one
    got 429 for as long as small ones kept coming. Now the room of the refused large request is held: small
    ones get 429 until the queue has drained enough for it, and its next retry is admitted."""
    srv = Server(model_dir, max_queue=4, max_num_seqs=1)
    m = srv.metrics
    small, large = cmpl(ignore_eos=True), cmpl(prompt=["a", "b", "c"], ignore_eos=True)
    admitted: list[tuple[threading.Thread, list]] = []
    try:
        srv.llm.hold()
        for k in range(4):
            t, out, ok = post_and_see(srv, small)
            assert ok
            admitted.append((t, out))
        got_in = False
        refused_small = []
        for _ in range(8):
            t, out, got_in = post_and_see(srv, large)
            if got_in:
                admitted.append((t, out))
                break
            assert out[0].status_code == 429 and out[0].json()["error"]["code"] == "queue_full", out[0].text
            assert out[0].headers.get("retry-after") == "1"  # (the openai client waits that long, then retries)
            assert m()["dsv3_queue_reserved"] == 3
            waiting = m()["dsv3_num_requests_waiting"]
            while m()["dsv3_num_requests_waiting"] >= waiting:  # the engine frees a place
                one_step(srv)
            t, out, ok = post_and_see(srv, small)  # and a small client comes first
            if ok:
                admitted.append((t, out))
            else:
                refused_small.append(out[0])
        assert got_in, "the request of 3 sequences was kept out by the stream of small ones"
        assert refused_small and all(r.status_code == 429 for r in refused_small)
        err = refused_small[0].json()["error"]
        assert err["code"] == "queue_full" and "held" in err["message"] and "max_queue=4" in err["message"], err
        assert m()["dsv3_queue_reserved"] == 0  # the room was taken by the request it was held for
        srv.llm.allow()
        for t, out in admitted:
            t.join()
            assert out[0].status_code == 200, out[0].text
        assert len(admitted[-1][1][0].json()["choices"]) == 3
        # with the room free again, small requests are admitted as before
        assert srv.http.post("/v1/completions", json=small).status_code == 200
    finally:
        srv.stop()


def test_the_held_room_is_released_if_its_request_does_not_come_back(model_dir):
    """The hold lasts hold_s (30 s) after the large request was last refused: a client that gave up does not
    keep the room from others beyond that."""
    srv = Server(model_dir, max_queue=4, max_num_seqs=1)
    engine = srv.server.config.app.state.engine
    clock = [1000.0]
    engine.clock = lambda: clock[0]
    small, large = cmpl(ignore_eos=True), cmpl(prompt=["a", "b", "c"], ignore_eos=True)
    threads = []
    try:
        srv.llm.hold()
        for _ in range(3):
            t, out, ok = post_and_see(srv, small)
            threads.append((t, out))
        t, out, ok = post_and_see(srv, large)  # 3 waiting + 3 > 4
        assert not ok and out[0].status_code == 429
        assert srv.metrics()["dsv3_queue_reserved"] == 3
        clock[0] += engine.hold_s - 1  # within the window: 3 waiting + 1 would leave no room for the 3
        t, out, ok = post_and_see(srv, small)
        assert not ok and "held" in out[0].json()["error"]["message"]
        clock[0] += 2  # past it: released
        t, out, ok = post_and_see(srv, small)
        assert ok
        threads.append((t, out))
        assert srv.metrics()["dsv3_queue_reserved"] == 0
        srv.llm.allow()
        for t, out in threads:
            t.join()
            assert out[0].status_code == 200
    finally:
        srv.stop()


def test_a_preempted_sequence_is_counted_once(model_dir):
    """Two sequences run, a third waits (max_queue=1), and the cache cannot hold both running ones as they grow:
    one is preempted. It used to count as waiting again, so 2 sequences 'waited' on a queue of 1. A sequence
    the engine has started counts as started until it ends, whether running or preempted (it resumes before
    any waiting one): waiting + running + preempted is always the sequences in flight, and waiting never
    exceeds max_queue."""
    srv = Server(model_dir, max_queue=1, max_num_seqs=2, block_size=4, kv_cache_tokens=16, max_model_len=16,
                 enable_prefix_caching=False)
    m = srv.metrics
    threads = []
    try:
        srv.llm.hold()
        for k, prompt in enumerate(([5, 6, 7], [8, 9, 10], [11, 12, 13])):
            t, out, ok = post_and_see(srv, cmpl(prompt=[prompt], max_tokens=12, ignore_eos=True))
            assert ok, out[0].text
            threads.append((t, out))
            while k < 2 and m()["dsv3_num_requests_waiting"]:
                one_step(srv)  # it starts: the next one fits in the queue
        seen_preempted = 0
        for _ in range(40):
            f = m()
            waiting, running, preempted = (f["dsv3_num_requests_waiting"], f["dsv3_num_requests_running"],
                                           f.get("dsv3_num_requests_preempted", 0))
            finished = sum(f[f'dsv3_requests_finished_total{{reason="{r}"}}'] for r in ("stop", "length", "abort"))
            assert waiting <= 1, f
            assert waiting + running + preempted == 3 - finished, f
            seen_preempted = max(seen_preempted, preempted)
            if finished == 3:
                break
            one_step(srv)
        assert seen_preempted >= 1 and m()["dsv3_preemptions_total"] >= 1  # (the premise: a preemption happened)
        srv.llm.allow()
        for t, out in threads:
            t.join()
            assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] == 12, out[0].text
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
