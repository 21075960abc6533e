"""Sampling: SamplingParams, the adjusted logits (logit_bias -> min_tokens -> repetition, frequency and
presence penalties -> the request's logits processors), the processed distribution (temperature -> top-k ->
top-p) and an exact categorical draw by inverting the CDF with one uniform per token, taken from the request's
own generator when it has a seed (so a seeded request gives the same tokens whatever else is in the batch).

The adjustments are vLLM's (and OpenAI's, for the parameters OpenAI has): every place the engine samples,
drafts or verifies a token first passes its logits through `Sampler.adjust` with the token history of the row,
so that speculative decoding verifies against the distribution plain decoding samples from. Reported logprobs
stay those of the raw model distribution (the engine computes them from the logits before any of this).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

# the seeds torch.Generator.manual_seed takes (a negative one is read as its two's complement)
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_BIAS = 100.0  # a logit bias lies in [-100, 100] (OpenAI's range)

# fn(prompt_ids, output_ids, logits (V,)) -> logits (V,): vLLM's processor signature with the prompt
LogitsProcessor = Callable[[list[int], list[int], torch.Tensor], torch.Tensor]
History = tuple[list[int], list[int]]  # a row's (prompt ids, output ids so far, drafts included)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: no limit
    max_new_tokens: int = 256
    stop: str | list[str] | None = None  # strings that end the output (not included in it)
    seed: int | None = None  # a per-request seed makes the request reproducible
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    stop_token_ids: list[int] = field(default_factory=list)  # more tokens that end the output (kept in it)
    logprobs: int | None = None  # also return the log-probability of each token (and this many top ones)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (scoring a text's likelihood)
    presence_penalty: float = 0.0  # subtracted from the logit of every token the output holds, in [-2, 2]
    frequency_penalty: float = 0.0  # subtracted once per time the output holds the token, in [-2, 2]
    repetition_penalty: float = 1.0  # > 0, 1: off; divides positive (multiplies negative) logits of the tokens
    # in the prompt or the output (CTRL's penalty, as transformers and vLLM apply it)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # end-of-sequence and stop tokens are masked, and stop strings not looked for, until
    # this many tokens are generated
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # each fn(prompt_ids, output_ids,
    # logits (V,)) -> logits (V,), applied in order after the adjustments above; it is called for draft rows of
    # speculative decoding too (histories that may be rejected), so it must depend on its arguments only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field at fault. The engine calls this again when a request is added
        (a dataclass can be changed after it was built): nothing a request carries can fail later, mid-step."""
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not (number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not (integer(self.top_k) and 0 <= self.top_k < 2**63):  # (an int64 in the sampling step)
            raise ValueError(f"top_k={self.top_k!r} must be an integer in [0, 2^63) (0: no limit)")
        if not (integer(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop is not None and not (isinstance(self.stop, list) and all(isinstance(s, str) and s
                                                                               for s in self.stop)):
            raise ValueError(f"stop={self.stop!r} must be a non-empty string or a list of them")
        if self.seed is not None and not (integer(self.seed) and SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed={self.seed!r} must be an integer in [{SEED_MIN}, {SEED_MAX}] (or None)")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be a bool")
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if not (isinstance(self.stop_token_ids, list) and all(integer(t) and t >= 0 for t in self.stop_token_ids)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids (integers >= 0)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (integer(v) and 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name}={v!r} must be an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (number(v) and -MAX_PENALTY <= v <= MAX_PENALTY):
                raise ValueError(f"{name}={v!r} must be a number in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if not (number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be a finite number > 0 (1: off)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias={self.logit_bias!r} must be a dict of token id -> bias (or None)")
            for t, b in self.logit_bias.items():
                if not (integer(t) and t >= 0):
                    raise ValueError(f"logit_bias: key {t!r} must be a token id (an integer >= 0)")
                if not (number(b) and -MAX_BIAS <= b <= MAX_BIAS):
                    raise ValueError(f"logit_bias: the bias of token {t} is {b!r}; it must be a number in "
                                     f"[{-MAX_BIAS:g}, {MAX_BIAS:g}]")
        if not (integer(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens):
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer in [0, max_new_tokens="
                             f"{self.max_new_tokens}]")
        if isinstance(self.logits_processors, tuple):
            self.logits_processors = list(self.logits_processors)
        if not (isinstance(self.logits_processors, list) and all(callable(f) for f in self.logits_processors)):
            raise ValueError(f"logits_processors={self.logits_processors!r} must be a list of callables "
                             "fn(prompt_ids, output_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether its logits are changed before sampling (so that sampling needs the row's token history)."""
        return bool(self.penalized or self.logit_bias or self.min_tokens or self.logits_processors)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's own distribution (log_softmax of the raw logits, before
    penalties, logit_bias, logits processors, temperature, top-k and top-p, as vLLM reports it by default), and
    the `num_top` most likely tokens there."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprob]:
    """logits (R, V), the token each row chose or was followed by (R,) -> one TokenLogprob per row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(token_ids, device=lp.device)[:, None]).squeeze(-1).tolist()
    if num_top > 0:
        top_lp, top_id = lp.topk(min(num_top, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_id.tolist(), top_lp.tolist())]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprob(t, c, top) for t, c, top in zip(token_ids, chosen, tops)]


def history(seq, drafts: list[int] | tuple[()] = ()) -> History:
    """A scheduler Sequence's (prompt ids, output ids), followed by the drafts before the row being sampled."""
    out = seq.token_ids[seq.num_prompt_tokens:]
    return seq.token_ids[:seq.num_prompt_tokens], (out + list(drafts) if drafts else out)


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History],
                  eos_token_ids: Collection[int] = ()) -> torch.Tensor:
    """logits (R, V), each row's params and (prompt ids, output ids) -> the logits to sample from, float32, a new
    tensor (R, V). In vLLM's order: logit_bias added; while a row's output is shorter than min_tokens, its stop
    tokens (stop_token_ids, and eos_token_ids unless ignore_eos) set to -inf; the repetition penalty on the
    tokens of prompt and output (a logit > 0 divided by it, else multiplied), then the output's counts times the
    frequency penalty and its presence times the presence penalty subtracted; then the logits processors, row by
    row. The built-ins are a few batched ops over the rows that use them (counts by one bincount), whatever the
    vocabulary; rows that use none are copied unchanged."""
    logits = logits.to(torch.float32, copy=True)
    V, dev = logits.shape[-1], logits.device
    bias_rows, bias_ids, bias_vals, masked_rows, masked_ids = [], [], [], [], []
    for r, (p, (_, out)) in enumerate(zip(params, histories)):
        if p.logit_bias:
            bias_rows += [r] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            bias_vals += p.logit_bias.values()
        if len(out) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            masked_rows += [r] * len(stops)
            masked_ids += stops
    if bias_rows:
        index = (torch.tensor(bias_rows, device=dev), torch.tensor(bias_ids, device=dev))
        logits.index_put_(index, torch.tensor(bias_vals, dtype=torch.float32, device=dev), accumulate=True)
    if masked_rows:
        logits[torch.tensor(masked_rows, device=dev), torch.tensor(masked_ids, device=dev)] = float("-inf")
    pen = [r for r, p in enumerate(params) if p.penalized]
    if pen:
        logits[pen] = _penalize(logits[pen], [params[r] for r in pen], [histories[r] for r in pen])
    for r, p in enumerate(params):
        for fn in p.logits_processors:
            row = fn(*histories[r], logits[r])
            if not (isinstance(row, torch.Tensor) and row.shape == (V,)):
                raise ValueError(f"the logits processor {fn!r} returned {type(row).__name__} "
                                 f"{tuple(getattr(row, 'shape', ()))}, not a tensor of shape ({V},)")
            logits[r] = row
    return logits


def _bincount(token_lists: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list -> (len(token_lists), V) int64."""
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor([len(t) for t in token_lists]))
    counts = torch.bincount((rows * V + flat).to(device), minlength=len(token_lists) * V)
    return counts.view(len(token_lists), V)


def _penalize(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> torch.Tensor:
    """The repetition, frequency and presence penalties of rows that have some: logits (n, V) float32 -> (n, V)."""
    V, dev = logits.shape[-1], logits.device
    counts = _bincount([out for _, out in histories], V, dev)
    rep = [p.repetition_penalty for p in params]
    if any(r != 1 for r in rep):
        seen = counts > 0
        seen |= _bincount([prompt for prompt, _ in histories], V, dev) > 0
        rep_t = torch.tensor(rep, dtype=torch.float32, device=dev)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep_t, logits * rep_t), logits)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev)[:, None]
    return logits - freq * counts - presence * (counts > 0)


def processed_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V), per-row temperature (> 0), top_k (0: off) and top_p (1: off) -> probabilities (B, V),
    float32. Rows are independent; the same row gives the same distribution in any batch."""
    logits = logits.float() / temperature[:, None]
    V = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=logits.device)
        k = torch.where(top_k > 0, top_k, V).clamp(max=V)
        drop = rank[None, :] >= k[:, None]  # top-k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop |= before >= top_p[:, None]  # top-p keeps tokens until the mass reaches top_p (always the first)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Exact categorical draw: the token whose CDF interval holds u (B,) in [0, 1). -> (B,) int64."""
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


class Sampler:
    """Draws tokens for a batch of requests, each with its own parameters and random stream."""

    def __init__(self, device: torch.device, seed: int | None = None, eos_token_ids: Collection[int] = ()):
        """eos_token_ids: the model's end-of-sequence tokens, which min_tokens masks (with a request's own
        stop_token_ids) unless the request ignores them."""
        self.device = torch.device(device)
        self.eos_token_ids = set(eos_token_ids)
        self.default = torch.Generator(device="cpu")
        self.default.manual_seed(seed if seed is not None else torch.initial_seed())

    @staticmethod
    def generator_for(seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(seed)
        return g

    def uniforms(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One U[0,1) per row, from the row's generator (or the shared one): drawn on the CPU so that a seed
        means the same thing on every device."""
        u = [torch.rand(1, generator=g or self.default) for g in generators]
        u = u[0] if len(u) == 1 else torch.cat(u)
        return u if self.device.type == "cpu" else u.to(self.device)

    def adjust(self, logits: torch.Tensor, params: list[SamplingParams],
               histories: Callable[[], list[History]]) -> torch.Tensor:
        """The logits every row samples, drafts or verifies from (adjust_logits), the same tensor when no row's
        params adjust them. histories() gives each row's (prompt ids, output ids) and is only called when one
        does: the token history of that row, a speculative row's drafts before it included."""
        if not any(p.adjusts_logits for p in params):
            return logits
        return adjust_logits(logits, params, histories(), self.eos_token_ids)

    def params_tensors(self, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        temp = torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev)
        top_k = torch.tensor([p.top_k for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        return temp, top_k, top_p

    def probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from (one-hot at the argmax for greedy rows), from logits that
        `adjust` has already passed."""
        greedy = [p.greedy for p in params]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            probs = processed_probs(logits, *self.params_tensors(params))
        else:  # temperature alone (the common case): the same numbers as processed_probs in 2 or 3 ops, not 10
            temps = {max(p.temperature, 1e-5) for p, g in zip(params, greedy) if not g} or {1.0}
            logits32 = logits if logits.dtype == torch.float32 else logits.float()
            if len(temps) == 1:
                probs = (logits32 / temps.pop()).softmax(dim=-1)
            else:
                probs = processed_probs(logits32, *self.params_tensors(params))
        if any(greedy):
            onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
            probs = torch.where(torch.tensor(greedy, device=logits.device)[:, None], onehot, probs)
        return probs

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """logits (B, V), already through `adjust` -> tokens (B,). Greedy rows take the argmax and consume no
        randomness."""
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)
        probs = self.probs(logits, params)
        u = self.uniforms([None if gr else g for gr, g in zip(greedy, generators)])
        tokens = draw(probs, u)
        if not any(greedy):
            return tokens
        return torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(dim=-1), tokens)
