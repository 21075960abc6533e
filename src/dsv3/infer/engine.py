"""The engine: the public API (`LLM`) and the step loop, schedule -> run -> postprocess.

    llm = dsv3.LLM("path/to/model", speculative="mtp")
    outs = llm.generate(["def fib(n):", "Hello"], dsv3.SamplingParams(temperature=0, max_new_tokens=64))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

Requests can also be added and stepped one at a time (`add_request`, `step`, `abort`): the server's
continuous batching drives the engine that way.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..ckpt.pretrained import load_pretrained
from ..model.layers import RMSNorm
from ..model.model import DeepSeekV3
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from . import cpu_kernels as cpu_kernels_lib
from .cuda_graphs import DecodeGraphs, capture_blocker
from .kv_cache import LatentCache
from .model_runner import DEFAULT_ATTENTION_WORKSPACE, ModelRunner, build_batch
from .sampling import Sampler, SamplingParams, TokenLogprob, history, token_logprobs
from .scheduler import Scheduler, Sequence, Status
from .speculative import DraftPolicy, MTPSpeculator


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop or end-of-sequence token that ended the output included)
    text: str  # their text (special tokens and a matched stop string left out)
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when params.logprobs asks
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None for the first), when asked
    num_cached_tokens: int = 0  # prompt positions taken from the prefix cache instead of computed


@dataclass
class StepOutput:
    """What one engine step added to a request (for streaming)."""
    request_id: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when params.logprobs asks
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the step that computed them (the prefill)


@dataclass(eq=False)
class _Request:
    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    text: str = ""
    released: int = 0  # with stop strings: text[:released] has been handed out (the rest may begin one)
    stop_ids: set[int] = field(default_factory=set)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    partial_prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # while prefilled in chunks


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that some stop string starts with (and is not whole)."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class LLM:
    """A DeepSeek-V3/V2 model served from its latent cache, optionally with MTP speculative decoding.

    model: a model directory (or an already built DeepSeekV3). dtype/device: as `load_pretrained`.
    speculative: None or "mtp". num_speculative_tokens: with "mtp", positions drafted per step (default 1);
    more than one and the MTP module drafts a chain, run once per position (speculative.py).
    speculative_topk: with one drafted position, how many of the MTP module's most likely tokens a greedy
    request verifies for it at once (default None: 1 or 2, whichever pays on the module's recent record;
    sampled requests verify one draft). speculative_policy: when to draft: "adaptive" (default) times plain
    and drafting steps as it runs and drafts only while that is faster at the batch size (speculative.py;
    requests with a seed and a temperature then decode plainly, so that the seed fixes their tokens),
    "always" drafts every step, or a DraftPolicy. max_model_len: the longest sequence (prompt + output;
    default the config's max_position_embeddings, or what the cache holds if less). max_num_seqs: sequences decoded
    together. max_num_batched_tokens: tokens one step feeds at most, decodes (and their drafts) first; a longer
    prompt is prefilled in chunks over several steps, so that activations and attention masks stay bounded
    (default 2048 on CPU, where smaller chunks are as fast; 8192 on a GPU, where larger GEMMs pay; at least
    max_num_seqs x the positions a decode may feed). kv_cache_tokens: cache positions over all sequences
    (default: 90% of free GPU memory; on CPU enough for max_num_seqs full sequences, capped at 4 GiB).
    cuda_graphs: replay plain decode steps from captured CUDA graphs (default: on a CUDA device whenever the
    model can be captured, see cuda_graphs.py; False is vLLM's enforce_eager). enable_prefix_caching: keep
    full blocks of the cache after their request ends and start later requests whose tokens begin the same
    way from them (a chat's next turn, a shared system prompt), computing only the rest (default on, as
    vLLM's; scheduler.py). cpu_kernels: on a CPU, take each decode-sized matrix product in the layout timed
    fastest on this machine (cpu_kernels.py; timed once per machine and cached; default on for CPU models);
    False runs the plain PyTorch reference. live_weights: the model is also being trained, in place (GRPO's
    rollouts, evaluations during SFT): every parameter is left contiguous (the routed experts' w1 | w3 are not
    stacked; torch's fused AdamW updates non-contiguous parameters wrongly on CPU), and `refresh_weights()`
    takes up each update. attention_workspace: bytes one layer's attention may take beyond the cache (default
    256 MiB): a context whose gathered latents, expanded keys and values and float32 scores would take more is
    attended in pieces of keys merged by log-sum-exp (flash-decoding's split), so memory at a 128K context
    grows with the piece and the prefill chunk, not with the context (model_runner.py).
    """

    def __init__(self, model: str | os.PathLike | DeepSeekV3, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, speculative: str | None = None, *,
                 tokenizer: Tokenizer | None = None, max_model_len: int | None = None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int | None = None, block_size: int = 64, kv_cache_tokens: int | None = None,
                 seed: int | None = None, speculative_topk: int | None = None, num_speculative_tokens: int = 1,
                 speculative_policy: str | DraftPolicy = "adaptive",
                 cuda_graphs: bool | None = None, enable_prefix_caching: bool = True,
                 cpu_kernels: bool | None = None, live_weights: bool = False,
                 attention_workspace: int | None = None):
        path = None
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative={speculative!r} is not supported; expected None or 'mtp'")
        if isinstance(model, DeepSeekV3):
            self.model = model.eval()
            if device is not None or dtype is not None:
                self.model.to(device=device, dtype=dtype)
        else:
            path = os.fspath(model)
            # the tokenizer first: a bad one is reported at once, not after minutes of loading weights
            if tokenizer is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
                tokenizer = Tokenizer.from_dir(path)
            self.model = load_pretrained(path, dtype=dtype, device=device)
        config = self.config = self.model.config
        if speculative == "mtp" and not self.model.mtp:
            raise ValueError("speculative='mtp' needs a model with an MTP module; this one has "
                             f"num_nextn_predict_layers={config.num_nextn_predict_layers}")
        self.tokenizer = tokenizer
        self.eos_token_ids = self._eos_ids(path)

        self.max_model_len = max_model_len or config.max_position_embeddings
        if not 1 <= self.max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} must be in [1, max_position_embeddings="
                             f"{config.max_position_embeddings}]")
        self.live_weights = live_weights
        # before the cache is sized: packing briefly holds two copies of a layer
        self.model.pack_projections(contiguous_only=live_weights)
        n_mtp = 1 if speculative else 0
        dev, dtype = self.model.device, self.model.dtype
        per_token = LatentCache.bytes_per_token(config, dtype, config.num_hidden_layers + n_mtp)
        if kv_cache_tokens is None:
            if dev.type == "cuda":
                kv_cache_tokens = int(0.9 * torch.cuda.mem_get_info(dev)[0]) // per_token
            else:
                kv_cache_tokens = min(max_num_seqs * self.max_model_len, (4 << 30) // per_token)
        num_blocks = max(1, -(-kv_cache_tokens // block_size))
        self.cache = LatentCache(config, num_blocks, block_size, dtype, dev, num_mtp_layers=n_mtp)
        if self.max_model_len > self.cache.capacity:  # no sequence can outgrow the cache
            if max_model_len is not None:
                raise ValueError(f"max_model_len={max_model_len} is longer than the latent cache holds "
                                 f"({self.cache.capacity} positions): raise kv_cache_tokens or lower max_model_len")
            self.max_model_len = self.cache.capacity
        self.runner = ModelRunner(self.model, self.cache, attention_workspace=attention_workspace
                                  or DEFAULT_ATTENTION_WORKSPACE)
        self.sampler = Sampler(dev, seed, eos_token_ids=self.eos_token_ids)
        self.speculator = None
        if speculative_policy not in ("adaptive", "always") and not isinstance(speculative_policy, DraftPolicy):
            raise ValueError(f"speculative_policy={speculative_policy!r}: expected 'adaptive', 'always' or a "
                             "DraftPolicy")
        if speculative:
            policy = (speculative_policy if isinstance(speculative_policy, DraftPolicy)
                      else DraftPolicy(always=speculative_policy == "always"))
            self.speculator = MTPSpeculator(self.runner, self.sampler, speculative_topk, num_speculative_tokens,
                                            policy, prefix_caching=enable_prefix_caching)
        lookahead = self.speculator.lookahead if self.speculator else 1
        self.kernels: cpu_kernels_lib.Calibration | None = None
        if cpu_kernels is None:
            cpu_kernels = dev.type == "cpu"
        if cpu_kernels:
            if dev.type != "cpu":
                raise ValueError(f"cpu_kernels=True needs a model on the CPU, not on {dev.type}")
            self.kernels = cpu_kernels_lib.install(self.model, max_num_seqs * lookahead,
                                                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        else:
            cpu_kernels_lib.uninstall(self.model)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(8192 if dev.type == "cuda" else 2048, max_num_seqs * lookahead)
        # with the MTP module's rows in the cache, a block's rows also depend on the token after it (tail)
        self.scheduler = Scheduler(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, self.max_model_len,
                                   lookahead=lookahead, prefix_caching=enable_prefix_caching, tail=n_mtp)
        self.graphs: DecodeGraphs | None = None
        if num_speculative_tokens != 1 and not speculative:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} needs speculative='mtp'")
        if cuda_graphs and speculative:
            raise ValueError("cuda_graphs=True: CUDA graphs replay plain decode steps; speculative steps run "
                             "eagerly, so leave cuda_graphs unset with speculative='mtp'")
        if (cuda_graphs or cuda_graphs is None) and speculative is None:
            blocker = capture_blocker(self.runner)
            if blocker is None:
                self.graphs = DecodeGraphs(self.runner, max_num_seqs, self.max_model_len)
            elif cuda_graphs:
                raise ValueError(f"cuda_graphs=True, but {blocker}")
        self.requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self.num_steps = self.num_prefill_tokens = self.num_decode_tokens = 0

    def _eos_ids(self, path: str | None) -> set[int]:
        ids: set[int] = set()

        def add(x):
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, list):
                ids.update(i for i in x if isinstance(i, int))

        gen = getattr(self.model, "generation_config", None)
        if gen is None and path is not None and os.path.isfile(os.path.join(path, "generation_config.json")):
            with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as f:
                gen = json.load(f)
        add((gen or {}).get("eos_token_id"))
        add(self.config.eos_token_id)
        if self.tokenizer is not None:
            add(self.tokenizer.eos_token_id)
        return ids

    def refresh_weights(self) -> None:
        """The model's weights changed in place (an optimizer step on the live policy, as GRPO's rollouts take
        them: no copy of the model): recompute what the engine derived from them, the absorbed W_UK / W_UV and
        the norms' cached factors, re-pack any projection whose parameters were replaced, and forget the prefix
        cache, whose rows the old weights computed. Between generate() calls only."""
        if self.has_unfinished():
            raise RuntimeError("refresh_weights() with requests still running; call it between generate() calls")
        self.model.eval()
        self.model.pack_projections(contiguous_only=self.live_weights)  # a no-op for packs still intact
        for module in self.model.modules():
            if isinstance(module, RMSNorm):
                module.forget_cached()
        self.runner.absorb_weights()
        self.scheduler.blocks.forget_prefixes()

    # ---- facts -----------------------------------------------------------------------------------------
    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Bytes one token of context costs in the main model's cache, measured from the allocation:
        layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes."""
        return self.cache.main_bytes_per_token

    @property
    def stats(self) -> dict:
        s = {"steps": self.num_steps, "prefill_tokens": self.num_prefill_tokens,
             "decode_tokens": self.num_decode_tokens, "preemptions": self.scheduler.num_preemptions,
             "cuda_graphs": 0 if self.graphs is None else self.graphs.num_graphs,
             "prefix_cache_lookup_tokens": self.scheduler.num_lookup_tokens,
             "prefix_cache_hit_tokens": self.scheduler.num_hit_tokens,
             "prefix_cache_hit_rate": self.scheduler.num_hit_tokens / max(self.scheduler.num_lookup_tokens, 1)}
        if self.speculator is not None:
            sp = self.speculator.stats
            policy = self.speculator.policy.stats()
            s.update(drafted=sp.drafted, accepted=sp.accepted, acceptance_rate=sp.acceptance_rate,
                     verify_forwards=sp.decode_forwards,
                     tokens_per_forward=sp.tokens_per_forward, accepted_by_rank=list(sp.accepted_by_rank),
                     accepted_by_depth=list(sp.accepted_by_depth),
                     drafting_fraction=policy["drafting_fraction"], draft_policy=policy)
        return s

    # ---- requests --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, checked: not empty, each in the model's vocabulary, room for a new token."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer.json: pass prompts as lists of token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: no text, and the tokenizer raises a TypeError
                raise ValueError(f"the prompt is not valid text: {e.reason} at character {e.start}") from None
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError("a prompt must be a string or a list of integer token ids")
        else:
            raise ValueError(f"a prompt must be a string or a list of integer token ids, not {type(prompt).__name__}")
        # (a string's too: a tokenizer may know more tokens than the model's embedding has rows)
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context is {self.max_model_len}: "
                             "it needs room for at least one new token")
        self.scheduler.check_fits(len(ids))
        return ids

    def _prepare(self, prompt: str | list[int], params: SamplingParams | None, cache_salt: str | None) -> _Request:
        """Check a request and build everything it needs that could fail, touching no shared state: a request
        that is refused leaves the engine as it was (no id taken, nothing queued, no random number drawn)."""
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, not {type(params).__name__}")
        else:  # the engine's own copy, checked again (a dataclass can be changed after it was built)
            params = dataclasses.replace(params)
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            bad = [t for t in ids if t >= self.config.vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt={cache_salt!r} must be a string or None")
        ids = self.encode_prompt(prompt)
        # prompt logprobs need every prompt position's logits: no cached prefix (chunks are fine)
        seq = Sequence(seq_id=-1, token_ids=list(ids), num_prompt_tokens=len(ids), params=params,
                       reuse_prefix=params.prompt_logprobs is None, cache_salt=cache_salt or None)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        return _Request(seq, params, Sampler.generator_for(params.seed), detok, stop_ids=stop_ids)

    def _admit(self, req: _Request) -> int:
        """Queue a prepared request (nothing here can fail for a request _prepare accepted); -> its id."""
        rid = req.seq.seq_id = next(self._ids)
        self.scheduler.add(req.seq)
        self.requests[rid] = req
        return rid

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    cache_salt: str | None = None) -> int:
        """Queue a request; -> its id. Every field of params and the prompt are checked first (ValueError naming
        the one at fault; the engine is then as it was). cache_salt: requests share prefix-cache blocks only with
        requests of the same salt (none by default: all share). A server with several tenants gives each its own,
        so that none can tell from the timing or from `cached_tokens` what another's prompts began with (vLLM's
        cache_salt)."""
        return self._admit(self._prepare(prompt, params, cache_salt))

    def abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.seq.status is not Status.FINISHED:
            self.scheduler.abort(req.seq)
            if self.speculator is not None:
                self.speculator.forget(req.seq)

    def output(self, request_id: int) -> RequestOutput:
        req = self.requests[request_id]
        return RequestOutput(request_id, req.seq.token_ids[:req.seq.num_prompt_tokens], req.seq.output_ids,
                             req.text, req.seq.finish_reason,
                             logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
                             prompt_logprobs=req.prompt_logprobs, num_cached_tokens=req.seq.num_prefix_hit or 0)

    def release(self, request_id: int) -> RequestOutput:
        """Forget a finished request (the server calls this once it has answered)."""
        out = self.output(request_id)
        del self.requests[request_id]
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        if self.speculator is not None:  # the draft policy weighs whole steps
            self.speculator.begin_step()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        reqs = [self.requests[s.seq_id] for s in seqs]
        # decoding: fed its last token after earlier samples (the others compute prompt or recomputed tokens)
        decoding = [s.num_tokens - s.num_cached == 1 and bool(s.output_ids) for s in seqs]
        prefill_fed = sum(s.num_scheduled for s, d in zip(seqs, decoding) if not d)
        starts = [s.num_cached for s in seqs]
        graph_logits = None  # a captured graph's logits of every row (plain decode steps on a GPU)
        if self.speculator is not None:
            new_tokens, token_rows, h, batch = self.speculator.step(seqs, [r.generator for r in reqs],
                                                                    self.cache.block_size)
        else:
            feeds = [s.token_ids[s.num_cached: s.num_cached + s.num_scheduled] for s in seqs]
            # a sequence samples once it is fed through its last token (not after a chunk of a longer prompt)
            sampling = [i for i, (s, f) in enumerate(zip(seqs, feeds)) if s.num_cached + len(f) == s.num_tokens]
            graphed = (self.graphs is not None and not is_prefill and all(len(f) == 1 for f in feeds)
                       and self.graphs.fits(len(seqs), max(starts) + 1))
            batch = build_batch(feeds, starts, [s.block_table for s in seqs], self.cache.block_size,
                                "cpu" if graphed else self.runner.device)
            if graphed:  # the step replays a captured graph, which computes the logits of every row
                h, graph_logits = None, self.graphs.decode(batch)
                if self.graphs.broken:
                    self.graphs = None
                last_logits = graph_logits
            else:
                h = self.runner.forward(batch)
                last_logits = None
                if sampling:
                    last = batch.last_rows(h)
                    if len(sampling) < len(seqs):
                        last = last.index_select(0, torch.tensor(sampling, dtype=torch.long, device=last.device))
                    last_logits = self.runner.logits(last)
            params = [reqs[i].params for i in sampling]
            if sampling:
                last_logits = self.sampler.adjust(last_logits, params, lambda: [history(seqs[i]) for i in sampling])
            tokens = iter(self.sampler.sample(last_logits, params, [reqs[i].generator for i in sampling]).tolist()
                          if sampling else [])
            ends = list(itertools.accumulate(batch.feed_lens))
            new_tokens, token_rows = [[] for _ in seqs], [[] for _ in seqs]
            for i in sampling:
                new_tokens[i], token_rows[i] = [next(tokens)], [ends[i] - 1]
            for s, f, t in zip(seqs, feeds, new_tokens):
                s.num_cached += len(f)
                s.token_ids += t
        self.scheduler.commit(seqs)  # blocks this step filled become reusable prefixes

        def row_logits(rows):  # the head again on the rows asked for (only when logprobs are wanted)
            return graph_logits[rows] if h is None else self.runner.logits(h[rows])
        lps, prompt_lps = self._logprobs(reqs, new_tokens, token_rows, starts, batch.feed_lens, row_logits)
        outs = []
        self.num_steps += 1
        self.num_prefill_tokens += prefill_fed
        for r, toks, lp, plp, d in zip(reqs, new_tokens, lps, prompt_lps, decoding):
            if toks:  # (a sequence that only computed a chunk of its prompt has nothing to report yet)
                outs.append(self._postprocess(r, toks, lp, plp))
                if d:  # the tokens kept (a stop or the length limit may cut a step's several tokens short)
                    self.num_decode_tokens += len(outs[-1].new_token_ids)
        if self.speculator is not None:
            self.speculator.end_step()
        return outs

    def _logprobs(self, reqs: list[_Request], new_tokens: list[list[int]], token_rows: list[list[int]],
                  starts: list[int], feed_lens: list[int], row_logits
                  ) -> tuple[list[list[TokenLogprob] | None], list[list[TokenLogprob | None] | None]]:
        """Log-probabilities of the new tokens (and, at a request's first prefill, of its prompt's tokens) for
        the requests that ask. row_logits(rows) gives the main model's logits at those fed rows (the N tokens
        of the step, sequence after sequence); new token j of sequence i came from fed row token_rows[i][j]."""
        lps: list = [None] * len(reqs)
        prompt_lps: list = [None] * len(reqs)
        end = 0
        for i, (req, toks) in enumerate(zip(reqs, new_tokens)):
            begin, end = end, end + feed_lens[i]
            p = req.params
            if p.logprobs is not None and toks:
                lps[i] = token_logprobs(row_logits(token_rows[i]), toks, p.logprobs)
            if p.prompt_logprobs is not None and req.prompt_logprobs is None:
                # the prefill feeds the prompt from position 0, in one step or in chunks: the row fed at position
                # q predicts prompt token q + 1; the list is handed out with the step that completes it
                n_prompt, start = req.seq.num_prompt_tokens, starts[i]
                if start == 0:  # (again, if a preemption sent it back before the prompt was done)
                    req.partial_prompt_logprobs = [None]
                assert len(req.partial_prompt_logprobs) == start + 1, "prompt logprobs need every prompt position"
                prompt = req.seq.token_ids[:n_prompt]
                last = min(start + feed_lens[i] + 1, n_prompt)  # this step's rows predict prompt tokens start+1..last-1
                for lo in range(start + 1, last, 1024):  # in slices: (rows, vocab) logits of a long prompt are big
                    hi = min(lo + 1024, last)
                    rows = list(range(begin + lo - 1 - start, begin + hi - 1 - start))
                    req.partial_prompt_logprobs += token_logprobs(row_logits(rows), prompt[lo:hi], p.prompt_logprobs)
                if last == n_prompt:
                    req.prompt_logprobs = prompt_lps[i] = req.partial_prompt_logprobs
                    req.seq.reuse_prefix = True  # done: if preempted, it may come back from cached blocks
        return lps, prompt_lps

    def _postprocess(self, req: _Request, toks: list[int], lps: list[TokenLogprob] | None = None,
                     prompt_lps: list[TokenLogprob | None] | None = None) -> StepOutput:
        """Apply the stop rules to the new tokens, in order; drop what follows a stop."""
        seq, p = req.seq, req.params
        before = len(seq.output_ids) - len(toks)
        reason = None
        for j, t in enumerate(toks):
            n_out = before + j + 1
            if t in req.stop_ids and n_out >= p.min_tokens:  # as vLLM (before min_tokens they are masked anyway)
                reason = "stop"
            elif n_out >= p.max_new_tokens or seq.num_prompt_tokens + n_out >= self.max_model_len:
                reason = "length"
            if reason:
                del seq.token_ids[seq.num_prompt_tokens + n_out:]
                toks = toks[: j + 1]
                lps = lps[: j + 1] if lps is not None else None
                break
        delta = ""
        if req.detok is not None and not p.stop:
            delta = req.detok.add(toks) + (req.detok.flush() if reason else "")
            req.text += delta
        elif req.detok is not None:  # token by token: a stop string may end inside a step's several tokens
            for j, t in enumerate(toks):
                piece = req.detok.add([t]) + (req.detok.flush() if reason and j == len(toks) - 1 else "")
                hit = False
                if before + j + 1 >= p.min_tokens:  # as vLLM: no stop string ends an output shorter than min_tokens
                    piece, hit = self._cut_at_stop(req, piece)
                req.text += piece
                if hit:  # what follows the token that completed the stop string was never generated
                    reason = "stop"
                    del seq.token_ids[seq.num_prompt_tokens + before + j + 1:]
                    toks = toks[: j + 1]
                    lps = lps[: j + 1] if lps is not None else None
                    break
            # text that may begin a stop string is held back until it is known not to (as vLLM's stop buffer):
            # a stream never hands out text that a stop string later takes back
            end = len(req.text) if reason else len(req.text) - _stop_prefix_length(req.text, p.stop)
            delta = req.text[req.released:max(end, req.released)]
            req.released = max(end, req.released)
        if lps is not None:
            req.logprobs.extend(lps)
        if reason:
            self.scheduler.finish(seq, reason)
            if self.speculator is not None:
                self.speculator.forget(seq)
        return StepOutput(seq.seq_id, toks, delta, reason is not None, reason, logprobs=lps,
                          prompt_logprobs=prompt_lps)

    @staticmethod
    def _cut_at_stop(req: _Request, delta: str) -> tuple[str, bool]:
        """Look for a stop string in the text so far plus delta; -> (the part of delta before it, hit)."""
        longest = max(len(s) for s in req.params.stop)
        window_start = max(0, len(req.text) - longest + 1)
        window = req.text[window_start:] + delta
        hits = [i for i in (window.find(s) for s in req.params.stop) if i >= 0]
        if not hits:
            return delta, False
        cut = window_start + min(hits)  # index in text + delta where the stop string begins
        if cut < len(req.text):  # the stop string began in earlier text (held back, never handed out): cut it
            req.text = req.text[:cut]
            return "", True
        return delta[: cut - len(req.text)], True

    # ---- batch generation --------------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for every prompt (strings, or lists of token ids); one RequestOutput per prompt, in order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of either, not "
                             f"{type(prompts).__name__}")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        reqs = [self._prepare(p, sp, None) for p, sp in zip(prompts, params)]  # all checked before any is queued
        ids: list[int] = []
        try:
            for r in reqs:
                ids.append(self._admit(r))
            disable = (not use_tqdm) if use_tqdm is not None else (len(ids) < 4 or None)
            with tqdm(total=len(ids), desc="generating", disable=disable) as bar:
                while any(self.requests[i].seq.status is not Status.FINISHED for i in ids):
                    for out in self.step():
                        bar.update(int(out.finished))
        except BaseException:  # an error or Ctrl-C: leave none of this call's requests behind in the engine
            for i in ids:
                self.abort(i)
                self.requests.pop(i, None)
            raise
        return [self.release(i) for i in ids]
