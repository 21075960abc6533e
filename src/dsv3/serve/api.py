"""The OpenAI-compatible server: a FastAPI app over one engine loop.

    llm = dsv3.LLM("path/to/model")
    app = create_app(llm, "my-model", api_key=None, max_queue=256, max_seqs_per_request=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)              # what `dsv3 serve --model DIR` does

Continuous batching. One thread, the engine loop, owns the LLM: the model runs only there. Between two engine
steps it takes the requests that arrived (`LLM.add_request`; the scheduler then prefills new arrivals together
and decodes everything running together, preempting when the cache is full) and the cancellations of clients
that went away (`LLM.abort`, which frees their cache blocks at once). After each step it hands every request's
new tokens to the HTTP handler waiting for them, through that handler's asyncio queue. A request leaves the
batch when it finishes. How many run at once is the engine's to decide (its cache budget, `kv_cache_tokens`,
and `max_num_seqs`); the others wait, and at most `max_queue` of them. Admission counts sequences, one per
prompt and choice (prompts x n), however they were packed into HTTP requests: a request whose sequences do not
fit beside those waiting gets a 429, and one that could never fit (more than `max_queue`, or than
`max_seqs_per_request`, the cap that keeps one client from taking the whole queue) a 400. Admission is fair to
large requests: the room of one refused for lack of it is held for it (`EngineLoop.admit`), so that no stream of
smaller requests keeps it out. A sequence is counted once, from admission to its end: waiting (not yet started),
running, or preempted (started, then put back for lack of cache; it resumes before any waiting one).

Before it serves, the app runs the model once (`warm_up`): a model that cannot run is refused at startup, and
/health reports 200 only for one that has generated.

The handlers run on the event loop: they validate, tokenize, submit, and turn engine outputs into OpenAI
responses or server-sent events. Everything a client can get wrong is answered with a 4xx in OpenAI's error
shape; the engine loop never sees a request that failed validation.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions; vLLM's POST
/tokenize (a text, or chat messages rendered by the chat template -> token ids), POST /detokenize and GET
/tokenizer_info; GET /health, GET /metrics (Prometheus text); POST /rebalance on a model-parallel server with
expert parallelism (the redundant experts re-placed by EPLB on the loads served so far, before the next step).
With an API key, /v1/*, the tokenizer endpoints and /rebalance need `Authorization: Bearer KEY`; /health and
/metrics stay open for load balancers and scrapers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections import Counter
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.engine import LLM, RequestOutput, StepOutput
from ..infer.sampling import SamplingParams
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TextOffsets,
                       TokenizeRequest, TokenText, chat_logprobs, completion_logprobs, error_body, json_plain, new_id,
                       now, sse, usage, validation_error)
from ..tokenizer import TOOL_CALL_END, describe_tools
from .tools import NAMED_CALL_END, ChoiceOutput, forced_prefix

log = logging.getLogger("dsv3.serve")
ENGINE_CHECKED_FIELDS = ("logit_bias", "stop_token_ids")  # token ids only the engine knows the range of
# what an API key guards (/health and /metrics stay open)
PROTECTED = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info", "/rebalance")


# ---- the engine loop -------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Output:
    """One engine step's news for one choice of a job."""
    index: int  # the choice
    step: StepOutput
    final: RequestOutput | None  # when the choice finished (the engine has forgotten it then)


_DISCONNECTED = object()  # put in a job's queue when its client goes away
RETRY_AFTER_S = 1  # what a 429 tells clients to wait (the openai client honours it), well inside HOLD_S
HOLD_S = 30.0  # how long the room of a refused request is held after its last refusal


@dataclass(eq=False)
class Job:
    """One HTTP request: its engine requests (one per prompt and choice) and the queue their outputs go to."""
    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # Output, APIError (the engine failed it) or _DISCONNECTED
    cache_salt: str | None = None  # the request's prefix-cache namespace
    live: dict[int, int] = field(default_factory=dict)  # engine request id -> choice, until it finishes
    held: int = 0  # its sequences in the engine loop's in-flight count: not yet finished, aborted or failed
    cancelled: bool = False

    def post(self, item) -> None:
        """From the engine thread: hand an item to the handler, on its event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting
            pass


class EngineLoop:
    """The thread that runs the LLM, admission, and the figures /metrics reports. `check_size`, `submit` and
    `cancel` are called from the event loop; everything else that touches the LLM runs on the engine thread.

    Admission counts sequences (engine requests: prompts x n), not HTTP requests, each once: `in_flight` is every
    sequence submitted and not yet finished, aborted or failed; `started` those the engine has started, running or
    preempted (a preempted sequence goes back to the front of the engine's queue and resumes before any that has
    not started, so at most max_num_seqs are started at once); the rest wait, and a request is admitted only if
    its sequences fit beside them in `max_queue` (`admit`). A request larger than `max_seqs_per_request` or than
    `max_queue` is a 400 (it could never be admitted); one that does not fit now is a 429. The counts change
    together, under `cond`, so the waiting figure never shows a sequence released but still running, and it
    grows only by admission: it never exceeds `max_queue`."""

    def __init__(self, llm: LLM, max_queue: int, max_seqs_per_request: int, hold_s: float = HOLD_S):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1 (sequences that may wait for a slot)")
        if max_seqs_per_request < 1:
            raise ValueError(f"max_seqs_per_request={max_seqs_per_request} must be >= 1")
        if not hold_s >= 0:
            raise ValueError(f"hold_s={hold_s} must be >= 0 (seconds the room of a refused request is held)")
        self.llm, self.max_queue, self.max_seqs_per_request = llm, max_queue, max_seqs_per_request
        self.hold_s, self.clock = hold_s, time.monotonic
        self.cond = threading.Condition()  # guards everything below that both threads touch
        self.inbox: list[Job] = []  # submitted, not yet added to the engine
        self.cancels: list[Job] = []
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.jobs: dict[int, Job] = {}  # engine request id -> its job (engine thread only)
        self.held: set[Job] = set()  # jobs with sequences in the in-flight count
        # admission and the figures for /metrics, written under cond
        self.in_flight = 0  # sequences submitted, not yet finished, aborted or failed
        self.num_started = 0  # of those, started by the engine (running or preempted) after its last step
        self.num_running = 0  # of those, in the engine's running batch
        self.reserved = 0  # queue places held for a refused request (sequences), until reserved_until
        self.reserved_until = 0.0
        self.cache_usage = 0.0
        self.engine_stats: dict = dict(llm.stats)
        self.counts: Counter = Counter()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot: in the inbox, or in the scheduler's queue, not yet started."""
        return self.in_flight - self.num_started

    @property
    def num_preempted(self) -> int:
        """Sequences the engine started and put back for lack of cache: they resume first."""
        return self.num_started - self.num_running

    # ---- called from the event loop ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stopping

    def check_size(self, num_prompts: int, n: int) -> None:
        """A 400 for a request that could never be admitted (before anything is tokenized)."""
        count = num_prompts * n
        if count <= min(self.max_seqs_per_request, self.max_queue):
            return
        what = f"{num_prompts} prompt{'s' if num_prompts > 1 else ''} x n={n}"
        limit = (f"more than this server takes in one request (max_seqs_per_request={self.max_seqs_per_request})"
                 if count > self.max_seqs_per_request else
                 f"more than may ever wait for a slot (max_queue={self.max_queue})")
        raise APIError(400, f"this request asks for {count} sequences ({what}), {limit}: send fewer prompts or a "
                            "smaller n", param="n" if n > 1 else "prompt", code="too_many_sequences")

    def admit(self, count: int) -> None:
        """Under cond: admit a request of count sequences, or refuse it with a 429.

        Fair to large requests: when one is refused because its sequences do not fit beside those waiting, its
        size is held (the largest refused size, if several): a smaller request is then admitted only if it
        leaves that much room free, so the queue drains until the large one fits and its next retry is
        admitted, however many small requests arrive meanwhile. The hold ends when a request at least that
        large is admitted, or hold_s after the last refusal of one (a client that gave up keeps nothing for
        long). So no request is kept out by a stream of smaller ones; equal ones take the room in turn."""
        now = self.clock()
        if self.reserved and now >= self.reserved_until:
            self.reserved = 0
        waiting = self.num_waiting
        kept = self.reserved if count < self.reserved else 0  # (one as large as the held one may take its room)
        if waiting + count + kept <= self.max_queue:
            if count >= self.reserved:
                self.reserved = 0
            return
        self.counts["rejected"] += 1
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if kept:
            raise APIError(429, f"the server is busy: {waiting} sequences are waiting for a slot and {kept} places "
                                f"are held for a larger request refused earlier, so this one's {count} do not fit "
                                f"(max_queue={self.max_queue}); retry later", type="rate_limit_exceeded",
                           code="queue_full", headers=retry)
        self.reserved, self.reserved_until = count, now + self.hold_s  # (count >= any hold: takes or renews it)
        raise APIError(429, f"the server is busy: {waiting} sequences are waiting for a slot and this request adds "
                            f"{count} (max_queue={self.max_queue}); its room is held for its retry; retry later",
                       type="rate_limit_exceeded", code="queue_full", headers=retry)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], cache_salt: str | None = None) -> Job:
        job = Job(prompts, params, asyncio.get_running_loop(), asyncio.Queue(), cache_salt=cache_salt)
        count = len(prompts)
        with self.cond:
            if not self.alive:
                raise APIError(503, "the engine is not running", type="server_error")
            self.admit(count)
            job.held = count
            self.in_flight += count
            self.held.add(job)
            self.inbox.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: abort the job's unfinished engine requests (on the engine thread)."""
        with self.cond:
            if job.cancelled:
                return
            job.cancelled = True
            self.cancels.append(job)
            self.counts["cancelled"] += 1
            self.cond.notify()

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        while True:
            with self.cond:
                while not (self.inbox or self.cancels or self.stopping or llm.has_unfinished()):
                    self.cond.wait()
                if self.stopping:
                    break
                inbox, self.inbox = self.inbox, []
                cancels, self.cancels = self.cancels, []
            try:
                for job in inbox:
                    self._admit(job)
                for job in cancels:
                    self._abort(job)
                if llm.has_unfinished():
                    self._deliver(llm.step())
            except Exception as e:  # a bug, or out of memory: fail what is in flight and keep serving
                log.exception("the engine loop failed")
                self._fail_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error"))
        self._fail_all(APIError(503, "the server is shutting down", type="server_error"), also_inbox=True)

    def _admit(self, job: Job) -> None:
        """Add the job's sequences to the engine. An error here is the job's alone: the engine's refusal (its
        ValueError) is a 400, anything else a 500, and the sequences already added are taken out again."""
        if job.cancelled:  # the client left before its turn
            self._abort(job)
            return
        for i, (prompt, params) in enumerate(zip(job.prompts, job.params)):
            try:
                rid = self.llm.add_request(prompt, params, cache_salt=job.cache_salt)
            except Exception as e:
                if isinstance(e, ValueError):  # the handler checked already; the engine's checks have the last word
                    field = str(e).split(":", 1)[0]  # the engine names a request field first where one is at fault
                    error = APIError(400, str(e), param=field if field in ENGINE_CHECKED_FIELDS else None)
                else:
                    log.exception("adding a request to the engine failed")
                    error = APIError(500, f"the engine failed to add the request: {type(e).__name__}: {e}",
                                     type="server_error")
                self._abort(job, count=False)
                job.post(error)
                return
            job.live[rid] = i
            self.jobs[rid] = job
        with self.cond:
            self.counts["requests"] += len(job.prompts)
            self.counts["prompt_tokens"] += sum(len(p) for p in job.prompts)

    def _abort(self, job: Job, count: bool = True) -> None:
        """Take the job's unfinished sequences out of the engine (freeing their cache blocks) and out of the
        in-flight count."""
        aborted = len(job.live)
        try:
            for rid in list(job.live):
                self.llm.abort(rid)
                self.llm.release(rid)
                del self.jobs[rid], job.live[rid]
        finally:  # even if the engine is in a state it should not be in: the count is released
            for rid in job.live:
                self.jobs.pop(rid, None)
            job.live.clear()
            with self.cond:
                if count:
                    self.counts["finished:abort"] += aborted
                self._release(job, job.held)
                self._update_figures()

    def _deliver(self, outputs: list[StepOutput]) -> None:
        news, reasons = [], []
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None or out.request_id not in job.live:  # a sequence whose request was cleared by a failed
                if out.finished:                                # abort: no one waits for it (not a KeyError for all)
                    with contextlib.suppress(KeyError):
                        self.llm.release(out.request_id)
                continue
            final = None
            if out.finished:
                final = self.llm.release(out.request_id)
                del self.jobs[out.request_id]
                reasons.append((job, out.finish_reason))
            news.append((job, Output(job.live[out.request_id], out, final)))
            if out.finished:
                del job.live[out.request_id]
        with self.cond:  # released and no longer running, in one go
            for job, reason in reasons:
                self.counts[f"finished:{reason}"] += 1
                self._release(job, 1)
            self.counts["generation_tokens"] += sum(len(out.new_token_ids) for out in outputs)
            self._update_figures()
        for job, o in news:  # after the figures: a client that has its answer sees them updated
            job.post(o)

    def _fail_all(self, error: APIError, also_inbox: bool = False) -> None:
        """Answer every job in flight with error (the inbox's too when shutting down); abort their sequences."""
        with self.cond:
            victims = [j for j in self.held if also_inbox or j not in self.inbox]
        for job in victims:
            job.post(error)
            try:
                self._abort(job, count=False)
            except Exception:  # the engine is broken: the next job is still answered
                log.exception("aborting a failed request")
        with self.cond:
            self._update_figures()

    def _release(self, job: Job, count: int) -> None:
        """Under cond: count of the job's sequences leave the in-flight count."""
        count = min(count, job.held)
        job.held -= count
        self.in_flight -= count
        if not job.held:
            self.held.discard(job)

    def _update_figures(self) -> None:
        """Under cond, right after the engine changed: what runs, the cache, the engine's counters."""
        sched = self.llm.scheduler
        self.num_running = len(sched.running)
        # a sequence the scheduler has admitted once has its prefix-hit count set; a preempted one keeps it
        self.num_started = self.num_running + sum(s.num_prefix_hit is not None for s in sched.waiting)
        self.cache_usage = 1 - sched.blocks.num_free / sched.blocks.num_blocks
        self.engine_stats = dict(self.llm.stats)


def warm_up(llm: LLM) -> None:
    """Run the model once, as a request would (a prefill and a decode step, greedy, with logprobs): a model
    that cannot run (a forward that raises, logits that are not finite: a config value out of range, broken
    weights) raises a RuntimeError here, before anything is served, instead of failing every request."""
    params = SamplingParams(temperature=0, max_new_tokens=max(1, min(2, llm.max_model_len - 1)), ignore_eos=True,
                            logprobs=0)
    try:
        out = llm.generate([[0]], params, use_tqdm=False)[0]
    except Exception as e:
        raise RuntimeError(f"the model failed its warm-up generate (one prompt token, greedy): {type(e).__name__}: "
                           f"{e}; refusing to serve it") from e
    lps = [x.logprob for x in out.logprobs or []]
    if not lps or not all(map(math.isfinite, lps)):
        raise RuntimeError(f"the model's logits are not finite (its warm-up tokens' log-probabilities: {lps}): a "
                           "config value out of range (rms_norm_eps, rope_theta ...) or broken weights; refusing to "
                           "serve it")


# ---- the app ----------------------------------------------------------------------------------------------------

class _APIKeyMiddleware:
    """401 for /v1/* without `Authorization: Bearer KEY`. Plain ASGI, so it runs before the body is read (a
    stranger learns nothing from our validation) and leaves streaming and disconnects alone."""

    def __init__(self, app, api_key: str, errors: Counter):
        self.app, self.key, self.errors = app, api_key.encode(), errors

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                self.errors[401] += 1
                msg = ("missing API key: send the header 'Authorization: Bearer KEY'" if not auth
                       else "incorrect API key")
                await JSONResponse(error_body(msg, code="invalid_api_key"), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "d", "parameters": {}}}


def shows_tools(tok) -> bool:
    """Whether the chat template describes `tools` to the model (the official V3 template does not)."""
    probe = [{"role": "user", "content": "x"}]
    try:
        return tok.apply_chat_template(probe, tools=[_PROBE_TOOL]) != tok.apply_chat_template(probe)
    except Exception:  # no template, or one that fails on this probe: requests will say so
        return False


def with_tools_described(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template that does not describe tools: their description (tokenizer.describe_tools, the built-in
    template's words) as a system message after the leading ones, so that the model knows what it may call."""
    k = 0
    while k < len(messages) and messages[k]["role"] == "system":
        k += 1
    return [*messages[:k], {"role": "system", "content": describe_tools(tools)}, *messages[k:]]


async def _watch_disconnect(request: Request, job: Job) -> None:
    """The body has been read, so the next ASGI message is the client going away (or the response ending)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.events.put_nowait(_DISCONNECTED)
            return


def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_seqs_per_request: int = 64, hold_s: float = HOLD_S) -> FastAPI:
    """An OpenAI-compatible app serving `llm` as `model_name`; runs the model once first (`warm_up`: a
    RuntimeError if it cannot run). The engine loop starts and stops with the app (its lifespan).
    api_key: required on /v1/* when given. max_queue: sequences (engine requests, one per prompt and choice)
    that may wait for a slot, not yet started; a request whose sequences do not fit beside those waiting gets a
    429, and its room is then held for its retry for up to hold_s seconds (`EngineLoop.admit`).
    max_seqs_per_request: the most sequences (prompts x n) one request may hold; more is a 400."""
    if llm.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer (tokenizer.json in the model directory)")
    tok = llm.tokenizer
    token_text = TokenText(tok)
    engine = EngineLoop(llm, max_queue, max_seqs_per_request, hold_s)
    warm_up(llm)
    blocks = llm.scheduler.blocks
    # the longest prompt + output a request may ask for: the context, and what the whole cache holds
    context_len = min(llm.max_model_len, blocks.num_blocks * blocks.block_size - llm.scheduler.lookahead)
    http_errors: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="dsv3", description="An OpenAI-compatible server for DeepSeek-V3 models", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key, errors=http_errors)

    # ---- errors: always OpenAI's shape, a 4xx for anything the client did -------------------------------------
    def error_response(e: APIError) -> JSONResponse:
        http_errors[e.status] += 1
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(APIError(e.status_code, messages.get(e.status_code, str(e.detail))))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    # ---- helpers shared by the endpoints ------------------------------------------------------------------------
    def check_model(body) -> None:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if body.model_extra:
            log.warning("ignoring unsupported request fields: %s", ", ".join(sorted(body.model_extra)))

    def render_chat(messages, add_generation_prompt: bool, no_template_hint: str = "",
                    tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and the tools the model may call) -> token ids through the chat template (in a worker
        thread: it can be slow)."""
        from jinja2.exceptions import TemplateError
        msgs = [m.as_template_input() for m in messages]
        if tools and not template_shows_tools:
            msgs = with_tools_described(msgs, tools)
        try:
            return tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                                           tokenize=True)
        except TemplateError as e:
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
        except ValueError as e:  # no chat template
            raise APIError(400, f"{e}{no_template_hint}", param="messages") from None

    def budget(n_prompt: int, max_tokens: int | None, what: str) -> int:
        """The new tokens a request may generate: max_tokens if prompt + max_tokens fit the context, else a
        400; without max_tokens, the rest of the context."""
        if max_tokens is None:
            if n_prompt >= context_len:
                raise APIError(400, f"This model's maximum context length is {context_len} tokens, and the {what} "
                                    f"has {n_prompt}: no room is left for the completion.", param=what,
                               code="context_length_exceeded")
            return context_len - n_prompt
        if n_prompt + max_tokens > context_len:
            raise APIError(400, f"This model's maximum context length is {context_len} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in "
                                f"the completion). Please reduce the length of the {what} or the completion.",
                           param=what, code="context_length_exceeded")
        return max_tokens

    async def events(job: Job, request: Request) -> AsyncIterator[Output]:
        """The job's outputs until every choice has finished. If the client disconnects first, the job is
        cancelled (its engine requests aborted, their cache blocks freed) and the iteration just ends."""
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        remaining = len(job.prompts)
        try:
            while remaining:
                item = await job.events.get()
                if item is _DISCONNECTED:
                    return
                if isinstance(item, APIError):
                    remaining = 0  # the engine has already dropped the job
                    raise item
                remaining -= item.final is not None
                yield item
        finally:
            watcher.cancel()
            if remaining:
                engine.cancel(job)

    async def finals(job: Job, request: Request) -> dict[int, RequestOutput] | None:
        """Each choice's final output, by index; None if the client went away first."""
        out: dict[int, RequestOutput] = {}
        async with aclosing(events(job, request)) as outs:
            async for o in outs:
                if o.final is not None:
                    out[o.index] = o.final
        return out if len(out) == len(job.prompts) else None

    def streaming(chunks: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
            except APIError as e:  # the status line is sent already: report the error as an event
                http_errors[e.status] += 1
                yield sse(e.body())
            yield sse("[DONE]")
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    template_shows_tools = shows_tools(tok)

    async def tool_grammar(body: ChatCompletionRequest):
        """tool_choice naming a function: a grammar processor factory for its arguments (JSON of its parameters'
        schema), or None without the structured-output library (the arguments are then only parsed)."""
        tool = next(t for t in body.tools if t.function.name == body.forced_tool)
        schema = tool.function.parameters
        rf = ({"type": "json_schema", "json_schema": {"name": tool.function.name, "schema": schema, "strict": True}}
              if schema else {"type": "json_object"})
        try:
            from ..infer.structured import compile_response_format
        except ImportError:
            return None
        try:
            return await run_in_threadpool(compile_response_format, rf, tok, eos_token_ids=llm.eos_token_ids)
        except ImportError:
            return None
        except ValueError as e:
            i = body.tools.index(tool)
            raise APIError(400, f"tools[{i}].function.parameters: {e}", param=f"tools.{i}.function.parameters") \
                from None

    # ---- endpoints ----------------------------------------------------------------------------------------------
    created = now()

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dsv3",
                "max_model_len": context_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    async def response_format(rf: dict | None):
        """OpenAI's response_format -> a factory of grammar processors (one per choice), None for text. Compiled
        off the event loop (tens of ms for a new schema; cached after)."""
        if rf is None or rf.get("type") == "text":
            return None
        from ..infer.structured import compile_response_format

        try:
            return await run_in_threadpool(compile_response_format, rf, tok, eos_token_ids=llm.eos_token_ids)
        except (ValueError, ImportError) as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body)
        n = body.n or 1
        engine.check_size(1, n)
        tools = body.tool_mode != "none"
        if tools and body.tool_mode != "auto" and (body.response_format or {}).get("type", "text") != "text":
            raise APIError(400, f"tool_choice {body.tool_choice!r} asks for a tool call, response_format for an "
                                "answer in a format: give one of them", param="tool_choice")
        prompt = await run_in_threadpool(render_chat, body.messages, True, "; use /v1/completions",
                                         [t.as_template_input() for t in body.tools] if tools else None)
        # tool_choice "required" or a named function: the call's opening is written into the prompt (tools.py)
        prefix = forced_prefix(body.tool_mode, body.forced_tool) if tools else ""
        prompt = prompt + (tok.encode(prefix, add_special_tokens=False) if prefix else [])
        max_new = budget(len(prompt), body.max_new_tokens, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        grammar = await (tool_grammar(body) if body.tool_mode == "named" else response_format(body.response_format))
        params = [body.sampling_params(max_new, j, logprobs=top, logits_processors=[grammar()] if grammar else None)
                  for j in range(n)]
        call_end = tok.token_to_id(TOOL_CALL_END)
        if tools and (body.tool_mode == "named" or body.parallel_tool_calls is False) and not grammar \
                and call_end is not None and call_end < llm.config.vocab_size:  # one call: end at its end
            params = [dataclasses.replace(p, stop_token_ids=[*p.stop_token_ids, call_end]) for p in params]
        job = engine.submit([prompt] * n, params, cache_salt=body.cache_salt)
        rid, t = new_id("chatcmpl"), now()
        # with tools, each choice's text is parsed for calls (its tokens decoded again, special tokens kept)
        outputs = [ChoiceOutput(tok, llm.eos_token_ids, [x.function.name for x in body.tools], prefix,
                                NAMED_CALL_END if body.tool_mode == "named" and grammar else "", body.stop)
                   for _ in range(n)] if tools else None

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": t, "model": model_name,
                    "choices": choices, **extra}

        if body.stream:
            extra = {"usage": None} if body.include_usage else {}

            def choice(j: int, delta: dict, lps=None, finish_reason=None) -> str:
                return sse(chunk([{"index": j, "delta": delta, "logprobs": lps, "finish_reason": finish_reason}],
                                 **extra))

            async def chunks():
                yield sse(chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for j in range(n)], **extra))
                completion = cached = 0
                async with aclosing(events(job, request)) as outs:
                    async for o in outs:
                        step, j = o.step, o.index
                        completion += len(step.new_token_ids)
                        if o.final is not None and j == 0:  # n choices share one prompt: it counts once
                            cached = o.final.num_cached_tokens
                        lps = {"content": chat_logprobs(token_text, step.logprobs)} if top is not None else None
                        if outputs is None:
                            yield choice(j, {"content": step.new_text}, lps, step.finish_reason)
                            continue
                        delta = outputs[j].add(step.new_token_ids, step.finish_reason)
                        if delta.content or lps:
                            yield choice(j, {"content": delta.content}, lps)
                        for call in delta.tool_calls:
                            yield choice(j, {"tool_calls": [call]})
                        if step.finished:
                            yield choice(j, {}, finish_reason=outputs[j].finish_reason(step.finish_reason))
                if body.include_usage:
                    yield sse(chunk([], usage=usage(len(prompt), completion, cached)))
            return streaming(chunks())

        done = await finals(job, request)
        if done is None:  # the client went away
            return Response(status_code=499)
        choices = []
        for j in range(n):
            message, reason = {"role": "assistant", "content": done[j].text}, done[j].finish_reason
            if outputs is not None:
                outputs[j].add(done[j].token_ids, reason)
                message, reason = outputs[j].message(), outputs[j].finish_reason(reason)
            choices.append({"index": j, "message": message, "finish_reason": reason,
                            "logprobs": {"content": chat_logprobs(token_text, done[j].logprobs)}
                            if top is not None else None})
        return {"id": rid, "object": "chat.completion", "created": t, "model": model_name, "choices": choices,
                "usage": usage(len(prompt), sum(len(f.token_ids) for f in done.values()), done[0].num_cached_tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        n, echo = body.n or 1, bool(body.echo)
        engine.check_size(len(body.prompt), n)

        def encode() -> list[list[int]]:
            """Strings through the tokenizer (BOS added as the model expects); token ids checked. The length is
            budget()'s to check, so that it answers in OpenAI's words."""
            out = []
            for p in body.prompt:
                ids = tok.encode(p) if isinstance(p, str) else p
                bad = [i for i in ids if not 0 <= i < llm.config.vocab_size]
                if bad:
                    raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                                        f"[0, {llm.config.vocab_size})", param="prompt")
                if not ids:
                    raise APIError(400, "prompt: the prompt is empty", param="prompt")
                out.append(ids)
            return out

        prompts = await run_in_threadpool(encode)
        score_only = body.max_tokens == 0  # echo the prompt with its logprobs, generate nothing
        # max_tokens null: the rest of the context, for each prompt (as vLLM)
        max_new = [budget(len(p), None if body.max_tokens is None else max(body.max_tokens, 1), "prompt")
                   for p in prompts]
        top = body.logprobs
        params = [body.sampling_params(max_new[i], j, logprobs=top, prompt_logprobs=top if echo else None)
                  for i in range(len(prompts)) for j in range(n)]
        # choice index = prompt * n + choice
        job = engine.submit([p for p in prompts for _ in range(n)], params, cache_salt=body.cache_salt)
        # the echoed text of a string prompt is the string itself; of token ids, their text
        prompt_texts = [p if isinstance(p, str) else tok.decode(ids) for p, ids in zip(body.prompt, prompts)]
        rid, t = new_id("cmpl"), now()

        offsets_of = {k: TextOffsets(tok) for k in range(len(params))}  # per choice, across its pieces

        def piece(index: int, x: StepOutput | RequestOutput, first: bool) -> tuple[str, dict | None]:
            """A choice's text and logprobs: the new tokens of a step, or all of a finished choice; after the
            echoed prompt when this is the choice's first piece."""
            if score_only:  # the one token generated is not part of the answer
                ids, text, lps = [], "", []
            elif isinstance(x, StepOutput):
                ids, text, lps = x.new_token_ids, x.new_text, x.logprobs
            else:
                ids, text, lps = x.token_ids, x.text, x.logprobs
            head_text, head_ids, head_lps = "", [], []
            if first and echo:  # the prompt's logprobs come with the prefill, the choice's first output
                head_text, head_ids, head_lps = prompt_texts[index // n], prompts[index // n], x.prompt_logprobs
            if top is None:
                return head_text + text, None
            offsets, head_offsets = offsets_of[index], []
            if head_ids:
                head_offsets = offsets.add(head_ids)
                offsets.offset = len(head_text)  # what follows starts after the echoed text
            lp = completion_logprobs(token_text, head_ids + list(ids), (head_lps or []) + list(lps or []),
                                     head_offsets + offsets.add(list(ids)))
            return head_text + text, lp

        def finish_reason(x) -> str | None:
            return "length" if score_only and x.finish_reason else x.finish_reason

        n_prompt = sum(len(p) for p in prompts)
        if body.stream:
            extra = {"usage": None} if body.include_usage else {}

            async def chunks():
                started, completion, cached = set(), 0, 0
                async with aclosing(events(job, request)) as outs:
                    async for o in outs:
                        if o.final is not None and o.index % n == 0:  # a prompt counts once, not per choice
                            cached += o.final.num_cached_tokens
                        text, lp = piece(o.index, o.step, o.index not in started)
                        started.add(o.index)
                        completion += 0 if score_only else len(o.step.new_token_ids)
                        yield sse({"id": rid, "object": "text_completion", "created": t, "model": model_name,
                                   "choices": [{"index": o.index, "text": text, "logprobs": lp,
                                                "finish_reason": finish_reason(o.step)}], **extra})
                if body.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": t, "model": model_name,
                               "choices": [], "usage": usage(n_prompt, completion, cached)})
            return streaming(chunks())

        done = await finals(job, request)
        if done is None:  # the client went away
            return Response(status_code=499)
        choices = []
        for k in range(len(params)):
            text, lp = piece(k, done[k], True)
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": finish_reason(done[k])})
        completion = 0 if score_only else sum(len(f.token_ids) for f in done.values())
        cached = sum(f.num_cached_tokens for k, f in done.items() if k % n == 0)  # once per prompt
        return {"id": rid, "object": "text_completion", "created": t, "model": model_name, "choices": choices,
                "usage": usage(n_prompt, completion, cached)}

    # ---- tokenizer endpoints (as vLLM's: clients count tokens and render chats the server's way) ------------
    def check_optional_model(body) -> None:
        if body.model is not None:
            check_model(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_optional_model(body)

        if body.prompt is not None:
            special = body.add_special_tokens is not False  # (a prompt gets BOS as the model expects by default)
            ids = await run_in_threadpool(tok.encode, body.prompt, add_special_tokens=special)
        else:
            ids = await run_in_threadpool(render_chat, body.messages, body.add_generation_prompt)
        return {"count": len(ids), "max_model_len": context_len, "tokens": ids,
                "token_strs": [token_text.text(i) for i in ids] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_optional_model(body)
        bad = [i for i in body.tokens if not 0 <= i < llm.config.vocab_size]
        if bad:
            raise APIError(400, f"tokens: {bad[:5]} outside the vocabulary [0, {llm.config.vocab_size})",
                           param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        """tokenizer_config.json as vLLM serves it (special tokens as their strings: lm-eval's remote tokenizer
        encodes `bos_token` and `eos_token` to find their ids), and the ids and lengths this server uses."""
        config = {k: v for k, v in tok.config.items() if k != "added_tokens_decoder"}
        return {**json_plain(config), **{k: v for k, v in tok.special.items() if v is not None},
                "tokenizer_class": config.get("tokenizer_class", "dsv3.Tokenizer"),
                "vocab_size": tok.vocab_size, "model_vocab_size": llm.config.vocab_size,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                "chat_template": tok.chat_template, "model_max_length": context_len}

    @app.post("/rebalance")
    async def rebalance():
        """Expert parallelism: re-place the redundant experts by the loads served so far (EPLB), before the
        engine's next step; greedy output is unchanged (replicas hold the same weights)."""
        runner = llm.runner
        if not hasattr(runner, "rebalance_requested") or runner.expert_balance() is None:
            raise APIError(400, "/rebalance re-places experts over the ranks of expert parallelism: serve under "
                                "torchrun with --ep N (and --num-redundant-experts R for replicas of hot experts)")
        runner.rebalance_requested = True
        return {"status": "scheduled", "before": runner.expert_balance()["max_over_mean"]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the engine loop is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        with engine.cond:
            counts, stats = Counter(engine.counts), dict(engine.engine_stats)
            waiting, running, cache_usage = engine.num_waiting, engine.num_running, engine.cache_usage
            preempted, reserved = engine.num_preempted, engine.reserved
        errors = dict(http_errors)
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples) -> None:
            lines.extend([f"# HELP dsv3_{name} {help}", f"# TYPE dsv3_{name} {kind}"])
            for labels, value in (samples if isinstance(samples, list) else [("", samples)]):
                lines.append(f"dsv3_{name}{labels} {value}")

        metric("requests_total", "counter", "Engine requests admitted (one per prompt and choice).",
               counts["requests"])
        metric("requests_finished_total", "counter", "Engine requests finished, by reason (abort: the client left).",
               [(f'{{reason="{r}"}}', counts[f"finished:{r}"]) for r in ("stop", "length", "abort")])
        metric("requests_cancelled_total", "counter", "HTTP requests whose client went away before the answer.",
               counts["cancelled"])
        metric("requests_rejected_total", "counter", "HTTP requests refused with 429: their sequences did not fit "
               "in the queue.",
               counts["rejected"])
        metric("http_errors_total", "counter", "Error responses, by status.",
               [(f'{{status="{s}"}}', c) for s, c in sorted(errors.items())] or [('{status="none"}', 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", counts["prompt_tokens"])
        metric("generation_tokens_total", "counter", "Tokens generated.", counts["generation_tokens"])
        metric("num_requests_waiting", "gauge", "Engine requests (sequences: prompts x n) waiting for a slot, not "
               "yet started (at most max_queue).", waiting)
        metric("num_requests_running", "gauge", "Engine requests in the running batch.", running)
        metric("num_requests_preempted", "gauge", "Engine requests started, then put back for lack of cache (they "
               "resume before any waiting one).", preempted)
        metric("max_queue", "gauge", "Waiting sequences beyond which new requests get 429.", max_queue)
        metric("queue_reserved", "gauge", "Queue places held for a request refused for lack of room, which "
               "smaller requests may not take.", reserved)
        metric("max_seqs_per_request", "gauge", "The most sequences (prompts x n) one request may hold.",
               max_seqs_per_request)
        metric("max_num_seqs", "gauge", "The most requests decoded together.", llm.scheduler.max_num_seqs)
        metric("kv_cache_usage_ratio", "gauge", "Fraction of the latent cache's blocks in use.", f"{cache_usage:.6f}")
        metric("kv_cache_tokens", "gauge", "Token positions the latent cache holds in all.",
               blocks.num_blocks * blocks.block_size)
        metric("engine_steps_total", "counter", "Engine steps (one prefill or one decode of the batch).",
               stats["steps"])
        metric("preemptions_total", "counter", "Requests preempted (and later recomputed) for lack of cache.",
               stats["preemptions"])
        metric("prefix_cache_queries_total", "counter", "Token positions looked up in the prefix cache at admission.",
               stats["prefix_cache_lookup_tokens"])
        metric("prefix_cache_hits_total", "counter", "Token positions found there (their prefill was skipped).",
               stats["prefix_cache_hit_tokens"])
        balance = llm.runner.expert_balance() if hasattr(llm.runner, "expert_balance") else None
        if balance is not None:  # expert parallelism (a model-parallel server)
            metric("expert_load_max_over_mean", "gauge", "Expert-parallel balance: per MoE layer, the most "
                   "(token, expert) pairs one rank computed over the mean per rank, averaged over the layers "
                   "(1.0: even; /rebalance or --eplb-interval re-place the redundant experts).",
                   f"{balance['max_over_mean']:.6f}")
            metric("expert_slots", "gauge", "Expert slots over all ranks (experts plus redundant replicas).",
                   balance["slots"])
            metric("expert_rebalances_total", "counter", "Re-placements of the experts done (EPLB).",
                   llm.runner.rebalances)
        if "drafted" in stats:
            metric("spec_drafts_total", "counter", "MTP drafted positions verified.", stats["drafted"])
            metric("spec_accepted_total", "counter", "MTP drafted positions whose token was kept.", stats["accepted"])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
