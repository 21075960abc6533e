"""Sampling: SamplingParams, the processed distribution (temperature -> top-k -> top-p) and an exact
categorical draw by inverting the CDF with one uniform per token, taken from the request's own generator
when it has a seed (so a seeded request gives the same tokens whatever else is in the batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# the seeds torch.Generator.manual_seed takes (a negative one is read as its two's complement)
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
MAX_LOGPROBS = 20


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's own distribution (log_softmax of the raw logits, before
    temperature, top-k and top-p, as OpenAI reports it), and the `num_top` most likely tokens there."""
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

    def __init__(self, device: torch.device, seed: int | None = None):
        self.device = torch.device(device)
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

    def params_tensors(self, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        temp = torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev)
        top_k = torch.tensor([p.top_k for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        return temp, top_k, top_p

    def probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from (one-hot at the argmax for greedy rows)."""
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
        """logits (B, V) -> tokens (B,). Greedy rows take the argmax and consume no randomness."""
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits.argmax(dim=-1)
        probs = self.probs(logits, params)
        u = self.uniforms([None if gr else g for gr, g in zip(greedy, generators)])
        tokens = draw(probs, u)
        if not any(greedy):
            return tokens
        return torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(dim=-1), tokens)
