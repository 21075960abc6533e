"""MTP speculative decoding, on top of the model runner (DeepSeek-V3 report §2.2 and §5.4.3).

Each decode step feeds, per sequence, its last token t_n and drafts for t_{n+1} proposed by MTP module 1.
The main model scores them in the same forward:
- greedy: the module's k most likely tokens are verified at once, as alternatives for position n+1 (a
  draft tree one level deep: each attends to the sequence and to itself). The one equal to the argmax at
  position n is kept, if any, and the argmax at its own row comes for free. A second guess costs one more
  row in the same forward: worth it for a module that is often second-best (a briefly trained one: 20% ->
  71% of positions kept on a 150-step tiny model), not for one that is nearly always right. By default k
  adapts: the speculator tracks how often the main model's token is each of the module's top guesses,
  verified or not, and verifies a further guess while its hit rate pays for its row.
- sampling (Leviathan et al. 2023; Chen et al. 2023): one draft d, drawn from the draft distribution q, is
  kept with probability min(1, p(d) / q(d)); if not, the token is drawn from max(0, p - q), renormalised.
  Either way the output is distributed exactly as plain sampling from p.
Drafts are written to the cache slots from position n+1 on; the kept one is moved to position n+1's slot,
and the slots past the last kept position are simply overwritten by the next step.

With `num_tokens` = k > 1 the drafts form a chain instead, one token for each of positions n+1 .. n+k (as
SGLang and vLLM reuse V3's single MTP module for several draft steps, EAGLE-style): after drafting d_1, the
module runs again one position further, fed its own output hidden state in place of the main model's (not
known yet) and the token it just drafted, and so on. The main model verifies the chain in one forward over
n .. n+k; the longest agreeing prefix is kept, plus the main model's own token after it (greedy), or the chain
is accepted token by token with the same rule as a single draft, a rejection ending it (sampling). The MTP
cache rows the chain wrote past the confirmed positions are rewritten, from the main model's hidden states,
by the next step's MTP pass.

Then MTP module 1 runs over the positions the main model has just confirmed, p, with the main model's h_p
and the token t_{p+1}, extending its own latent cache, and its prediction at the last of them gives the
next drafts.

Drafting does not always pay: a verify step of several rows, the module's forward and the drafting cost
more than a plain step, and on a CPU, or with a module that is often wrong, they can cost more than the
kept drafts save. `DraftPolicy` measures both kinds of step as the engine runs and drafts only while it pays,
per batch size. A step that does not draft is a plain step: no drafts fed, no MTP forward. The module's
cache then falls behind the main model's; the main model's hidden states of the positions it missed are
kept (the module at p needs h_p and t_{p+1}), and it catches up over all of them in one forward when
drafting resumes, or when the main model completes a block (so that the prefix cache can register it: a
block's rows include the module's), or when too many have piled up.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .model_runner import ModelRunner, StepBatch, build_batch, slot_of
from .sampling import History, Sampler, draw, history
from .scheduler import Sequence


# What verifying one more guess costs, as a share of the tokens a step yields: an extra row in the main
# forward and a step layout the MTP module can no longer reuse. Measured on CPU (tiny, batch 1, where a step
# is dispatch-bound). On a GPU the extra row is nearly free, so this errs towards fewer guesses.
EXTRA_GUESS_COST = 0.08
HIT_RATE_DECAY = 0.95  # the hit rates are averages over roughly the last 20 verified positions

# DraftPolicy
WINDOW = 15  # measurements an estimate keeps (their median)
PAIR_GAP = 8  # decode steps: a drafting and a plain step this close are compared (a shared machine's speed
# drifts over seconds; the ratio of the two steps' costs much less)
LEARN = 3  # cost ratios a bucket measures before it decides
PROBE_STEPS = 4  # drafting steps per probe while drafting loses: 3 measurements of a steady drafting step
PROBE_SHARE = 0.01  # while drafting loses, probes may cost this share of the time (their expected loss)...
MIN_WAIT, MAX_WAIT = 8, 256  # ...with between MIN_WAIT and MAX_WAIT plain steps from one to the next
PLAIN_EVERY = 32  # while drafting pays, one plain step in this many keeps the comparison current
NOISE = 0.2  # an expected gain this close to 1 may be noise while the estimates rest on few steps
START_MARGIN = 0.05  # drafting (re)starts only at an expected gain above 1 + this, and goes on while above 1: the
# estimates wander by several percent on a shared machine, and "never slower than plain" weighs a wrong start
# more than a late one
TOKENS_WINDOW, TOKENS_AGE = 64, 128  # tokens per drafting step: a mean over the last 64 sequences' drafting
# steps, none older than 128 decode steps but the newest 16 (a probe after a long wait counts for more)
MAX_BACKLOG = 256  # without prefix caching: positions a sequence's MTP rows may fall behind (memory held)


@dataclass
class SpecStats:
    drafted: int = 0  # drafted positions verified (k per sequence per step; alternatives count as one)
    accepted: int = 0  # of those, the ones whose draft was kept
    decode_forwards: int = 0  # per sequence: main-model forwards that verified drafts
    decode_tokens: int = 0  # tokens those forwards produced
    accepted_by_rank: list[int] = field(default_factory=list)  # kept drafts by their rank in the module's top-k
    accepted_by_depth: list[int] = field(default_factory=list)  # kept drafts by their place in the chain

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.decode_tokens / self.decode_forwards if self.decode_forwards else 0.0


@dataclass
class StepCosts:
    """One batch-size bucket's measurements and where its decisions stand."""
    plain: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # (decode step, seconds): plain steps,
    # less any MTP catch-up
    drafting: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # (decode step, seconds): steady
    # drafting steps, verification, the module's forward and the drafts
    ratios: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # drafting / plain, from close steps
    seen: set = field(default_factory=set)  # the kinds of step measured once at least
    drafting_now: bool = True  # its last decision
    probe: int = 0  # drafting steps left in the current probe
    wait: int = MIN_WAIT  # plain steps before the next probe
    streak: int = 0  # drafting steps decided since the last plain one
    steps: int = 0  # decode steps measured
    catch_up: float = 0.0  # what the MTP module's catching up cost when drafting last resumed, in plain steps

    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if len(self.ratios) >= LEARN else None


class DraftPolicy:
    """Whether the next decode step drafts: while a drafting step's tokens per second beat a plain step's at
    that batch size, both measured as the engine runs.

    A plain decode step's cost is the engine's whole step, less any MTP work catching up on positions; a
    drafting step's is the whole step of one that verified drafts and drafted again (the module's forward
    over its own new positions only). Per batch-size bucket (1, 2, 3-4, 5-8, ...) the policy keeps the ratio
    of the two, each ratio measured from steps at most PAIR_GAP decode steps apart: a shared machine's speed
    drifts (another process, a slow spell), which moves both kinds of step alike. Over all steps it keeps
    the tokens a drafting step yields per sequence (1 + the drafts kept). Drafting pays while
    tokens / ratio > 1 (medians of the last WINDOW ratios; a mean of the tokens), with a margin to start
    (START_MARGIN) against a marginal gain that is only noise.

    A bucket first measures a few drafting steps (what the engine did before any measurement), then plain
    ones, then decides step by step. While drafting loses it probes, a few drafting steps now and then, so
    that a rise in acceptance or a change in the machine is noticed: the worse drafting did, the longer the
    wait, so that probing (and the module catching up for it) costs about PROBE_SHARE of the time; but if it
    lost by little, no longer than a quarter of the steps run so far (early estimates rest on few steps, and
    the first tokens of a sequence are the hardest to draft). While drafting pays, one step in PLAIN_EVERY
    is plain, which keeps the ratio current. always=True drafts every step (and still measures). clock:
    seconds, injectable so that tests can drive the policy."""

    def __init__(self, always: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.always, self.clock = always, clock
        self.buckets: dict[int, StepCosts] = {}
        self.token_counts: deque[tuple[int, int]] = deque(maxlen=TOKENS_WINDOW)  # (decode step, tokens)
        self.decode_steps = self.drafting_steps = 0

    @staticmethod
    def bucket(batch_size: int) -> int:
        """The bucket of a batch size: the next power of two (1, 2, 4, 8, ...)."""
        return 1 << max(batch_size - 1, 0).bit_length()

    def costs(self, batch_size: int) -> StepCosts:
        b = self.bucket(batch_size)
        if b not in self.buckets:
            self.buckets[b] = StepCosts()
        return self.buckets[b]

    @property
    def tokens(self) -> float | None:
        """Tokens per sequence per drafting step, recently."""
        counts = self.token_counts
        while len(counts) > 16 and self.decode_steps - counts[0][0] > TOKENS_AGE:
            counts.popleft()
        return statistics.fmean(n for _, n in counts) if counts else None

    def gain(self, c: StepCosts) -> float | None:
        """Expected tokens/s drafting over tokens/s plain; None until measured."""
        ratio, tokens = c.ratio(), self.tokens
        return None if ratio is None or tokens is None else tokens / ratio

    def draft_next(self, batch_size: int) -> bool:
        """Whether to draft for the next step of batch_size sequences (called once per step that sampled)."""
        if self.always:
            return True
        c = self.costs(batch_size)
        c.drafting_now = self._decide(c)
        return c.drafting_now

    def _decide(self, c: StepCosts) -> bool:
        if c.probe > 0:
            c.probe -= 1
            return True
        gain = self.gain(c)
        if gain is None:  # learning: a few drafting steps, then plain ones close to them
            now = self.decode_steps
            return sum(now - step <= PAIR_GAP for step, _ in c.drafting) < LEARN
        if gain > 1 + (0 if c.streak else START_MARGIN):
            c.streak += 1
            return c.streak % PLAIN_EVERY != 0
        c.streak = 0
        if c.drafting_now:  # drafting (or a probe) has stopped paying: wait in proportion to what a probe costs
            # (its steps' loss, and the module's catching up on the positions it missed, which a sequence that ends
            # first never needs), but while the estimates rest on few steps and it lost by little (maybe noise),
            # for at most a quarter of the steps run so far
            wait = min(round((PROBE_STEPS * max(1 - gain, 0.0) + c.catch_up) / PROBE_SHARE), MAX_WAIT)
            if gain > 1 - NOISE:
                wait = min(wait, c.steps // 4)
            c.wait = max(wait, MIN_WAIT)
        if c.wait > 0:
            c.wait -= 1
            return False
        c.probe = PROBE_STEPS - 1
        return True

    def observe_step(self, batch_size: int, verified: bool, seconds: float, mtp_seconds: float, steady: bool) -> None:
        """A decode step of batch_size sequences took `seconds`, mtp_seconds of them in MTP work; verified: it
        fed drafts; steady: its MTP work was one drafting step's (no catching up on positions missed before)."""
        c = self.costs(batch_size)
        c.steps += 1
        self.decode_steps += 1
        self.drafting_steps += verified
        if not verified and mtp_seconds > 0 and c.plain:  # a plain step after which drafting resumes
            c.catch_up = mtp_seconds / statistics.median(x for _, x in c.plain)
        if verified and not steady:
            return  # a step between drafting and plain ones: neither kind
        kind = "drafting" if verified else "plain"
        if kind not in c.seen:  # a bucket's first step of a kind may pay one-time costs (allocations, cold caches)
            c.seen.add(kind)
            return
        now, cost = self.decode_steps, max(seconds if verified else seconds - mtp_seconds, 1e-9)
        getattr(c, kind).append((now, cost))
        near = [x for step, x in (c.plain if verified else c.drafting) if now - step <= PAIR_GAP]
        if near:
            other = statistics.median(near)
            c.ratios.append(cost / other if verified else other / cost)

    def observe_tokens(self, tokens: int) -> None:
        """A sequence's drafting step yielded `tokens` (the drafts kept and the main model's own)."""
        self.token_counts.append((self.decode_steps, tokens))

    def stats(self) -> dict:
        ms = lambda xs: round(1e3 * statistics.median(x for _, x in xs), 3) if xs else None  # noqa: E731
        return {"policy": "always" if self.always else "adaptive",
                "decode_steps": self.decode_steps, "drafting_steps": self.drafting_steps,
                "drafting_fraction": self.drafting_steps / max(self.decode_steps, 1),
                "tokens_per_drafting_step": self.tokens,
                "buckets": {b: {"plain_ms": ms(c.plain), "drafting_ms": ms(c.drafting), "ratio": c.ratio(),
                                "gain": self.gain(c)} for b, c in sorted(self.buckets.items())}}


@dataclass
class Backlog:
    """The main model's hidden states at a sequence's positions start, start + 1, ... that the MTP module has
    not seen yet, as (step's hidden states, rows) pieces in position order."""
    start: int
    pieces: list[tuple[torch.Tensor, list[int]]] = field(default_factory=list)
    count: int = 0

    def add(self, h: torch.Tensor, rows: list[int], copy: bool) -> None:
        if copy:  # a view would keep a whole prefill step's states alive
            h, rows = _take(h, rows).clone(), list(range(len(rows)))
        self.pieces.append((h, rows))
        self.count += len(rows)


def _take(h: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """h's rows, as a view where they are consecutive."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return h[rows[0]: rows[-1] + 1]
    return h.index_select(0, torch.tensor(rows, device=h.device))


class MTPSpeculator:
    def __init__(self, runner: ModelRunner, sampler: Sampler, topk: int | None = None, num_tokens: int = 1,
                 policy: DraftPolicy | None = None, prefix_caching: bool = True):
        """topk: how many of the module's top guesses a greedy step verifies for the next position; None adapts
        between 1 and 2. num_tokens: positions drafted per step (a chain; with more than one, one guess each).
        policy: when to draft (default: an adaptive DraftPolicy). prefix_caching: the cache registers full
        blocks, with the module's rows: those of a prompt's blocks are computed even while not drafting."""
        if not runner.model.mtp:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        if topk is not None and topk < 1:
            raise ValueError(f"speculative_topk must be at least 1, not {topk}")
        if num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, not {num_tokens}")
        if num_tokens > 1 and topk not in (None, 1):
            raise ValueError(f"speculative_topk={topk} verifies alternatives for one drafted position; with "
                             f"num_speculative_tokens={num_tokens} the drafts form a chain of single guesses")
        self.runner, self.sampler = runner, sampler
        self.policy = policy or DraftPolicy()
        self.prefix_caching = prefix_caching
        self.num_tokens = num_tokens
        self.adaptive = topk is None and num_tokens == 1
        self.topk = 1 if num_tokens > 1 else min(2 if topk is None else topk, runner.config.vocab_size)
        # per rank, how often the main model's token was the module's guess (verified or not): starts by
        # assuming a second guess pays, and learns within ~20 positions
        self.hit_rate = [0.5, 0.25, *[0.0] * (self.topk - 2)][: self.topk]
        self.guesses: dict[int, list[int]] = {}  # seq_id -> the module's top guesses behind its greedy draft
        self.draft_probs: dict[int, list[torch.Tensor]] = {}  # seq_id -> q per draft, what it was drawn from
        self.backlogs: dict[int, Backlog] = {}  # seq_id -> hidden states the MTP module has yet to see
        self.stats = SpecStats(accepted_by_rank=[0] * self.topk, accepted_by_depth=[0] * self.num_tokens)
        self._step_start: float | None = None
        self._step_record: tuple | None = None  # what the policy learns from the step being run

    def num_guesses(self) -> int:
        """Guesses a greedy step verifies now: all `topk` if fixed; adaptively, rank r is added while its hit
        rate exceeds EXTRA_GUESS_COST times the tokens a step already yields."""
        if not self.adaptive:
            return self.topk
        k, expected = 1, 1 + self.hit_rate[0]
        for r in range(1, self.topk):
            if self.hit_rate[r] <= EXTRA_GUESS_COST * expected:
                break
            k, expected = r + 1, expected + self.hit_rate[r]
        return k

    def _observe(self, seq_id: int, token: int) -> None:
        """Update the per-rank hit rates with the main model's token at a drafted position."""
        guesses = self.guesses.pop(seq_id, None)
        if guesses is None:
            return
        for r, g in enumerate(guesses):
            self.hit_rate[r] = HIT_RATE_DECAY * self.hit_rate[r] + (1 - HIT_RATE_DECAY) * (g == token)

    @property
    def lookahead(self) -> int:
        """Cache positions a step may write from a sequence's last token on: itself and its drafts; for a chain
        of k, up to k - 1 more, where the module drafts past the k + 1 positions the step may confirm."""
        return 1 + self.topk if self.num_tokens == 1 else 2 * self.num_tokens

    def may_draft(self, seq: Sequence) -> bool:
        """A seeded sampled request's tokens depend on which of its steps drafted (a kept draft and a plain draw
        use its random stream differently): under an adaptive policy it never drafts, so that its seed gives
        the same tokens every run (those of plain decoding)."""
        p = seq.params
        return self.policy.always or p is None or p.greedy or p.seed is None

    # ---- the step -------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """The engine's step begins: the policy weighs the whole step, scheduling and postprocessing included."""
        self._step_start, self._step_record = self.policy.clock(), None

    def end_step(self) -> None:
        if self._step_record is not None and self._step_start is not None:
            batch_size, verified, mtp_seconds, steady = self._step_record
            self.policy.observe_step(batch_size, verified, self.policy.clock() - self._step_start, mtp_seconds,
                                     steady)
        self._step_start = self._step_record = None

    def step(self, seqs: list[Sequence], generators: list[torch.Generator | None], block_size: int
             ) -> tuple[list[list[int]], list[list[int]], torch.Tensor, StepBatch]:
        """One main forward, then the MTP module's forward over the confirmed positions and drafting (+ one MTP
        forward per further chained position) where the policy drafts -> (new tokens per sequence, for each the
        fed row whose logits gave it, the main model's final hidden states of every fed token (N, D), the batch).
        Updates each sequence's cache counts and drafts."""
        for s in seqs:  # near the context's end the scheduler leaves no room for every draft: verify fewer
            self._trim(s, len(s.block_table) * block_size - s.num_tokens)
        feeds = [s.token_ids[s.num_cached: s.num_cached + s.num_scheduled] + s.draft for s in seqs]
        # a sequence given only a chunk of its prompt computes it (and the MTP module's rows for it) and samples
        # nothing: no token, no drafts
        sampling = [s.num_cached + s.num_scheduled == s.num_tokens for s in seqs]
        verified = any(s.draft for s in seqs)
        decode = all(smp and s.num_scheduled == 1 for s, smp in zip(seqs, sampling))
        alternatives = [len(s.draft) for s in seqs] if self.num_tokens == 1 and verified else [0]
        batch = build_batch(feeds, [s.num_cached for s in seqs], [s.block_table for s in seqs], block_size,
                            self.runner.device, alternatives if max(alternatives) > 1 else None)
        h = self.runner.forward(batch)
        ends = list(itertools.accumulate(batch.feed_lens))
        if verified:
            new_tokens, token_rows, kept_rows = self._verify(seqs, feeds, sampling, batch, h, ends, generators,
                                                             block_size)
        else:
            new_tokens, token_rows, kept_rows = self._sample(seqs, feeds, sampling, batch, h, ends, generators)
        starts = [s.num_cached for s in seqs]  # the main model's cache now holds the kept positions
        for seq, toks, kept in zip(seqs, new_tokens, kept_rows):
            seq.num_cached += len(kept)
            seq.token_ids.extend(toks)

        t0 = self.policy.clock()
        drafting = any(sampling) and self.policy.draft_next(sum(sampling))
        wants = [smp and drafting and self.may_draft(s) for s, smp in zip(seqs, sampling)]
        # the MTP module catches up where it drafts, over a prompt chunk while drafting, and where it is too far
        # behind (_too_far_behind)
        extend = [w or (drafting and not smp) or self._too_far_behind(s, block_size)
                  for s, w, smp in zip(seqs, wants, sampling)]
        h_mtp, steady = self._extend_mtp(seqs, starts, kept_rows, h, batch, extend, block_size,
                                         copy=h.shape[0] > len(seqs) * self.lookahead)
        for s, w in zip(seqs, wants):
            if not w:
                s.draft = []
        if any(wants):
            extended = [i for i, e in enumerate(extend) if e]
            drafters = [i for i in extended if wants[i]]
            if len(drafters) < len(extended):
                h_mtp = h_mtp.index_select(0, torch.tensor([extended.index(i) for i in drafters], device=h.device))
            self._draft([seqs[i] for i in drafters], [generators[i] for i in drafters], h_mtp, block_size)
        if decode:  # (MTP work: none if the module did not run)
            mtp_seconds = self.policy.clock() - t0 if h_mtp is not None else 0.0
            self._step_record = (len(seqs), verified, mtp_seconds, verified and steady)
        return new_tokens, token_rows, h, batch

    def _too_far_behind(self, seq: Sequence, block_size: int) -> bool:
        """Whether a sequence that does not draft should catch up all the same: with prefix caching, when it has
        computed a full block (a block's registered rows include the module's: a shared prompt, or a chat's last
        reply, is found by the next request); without, past MAX_BACKLOG positions (memory). A catch-up runs the
        module's attention and MoE for one row only (`forward_mtp(last_only=True)`): per position it costs a
        small fraction of a plain step."""
        if self.prefix_caching and seq.num_mtp_cached // block_size < seq.num_cached // block_size:
            return True
        return seq.num_cached - seq.num_mtp_cached > MAX_BACKLOG

    def _sample(self, seqs, feeds, sampling, batch: StepBatch, h: torch.Tensor, ends: list[int], generators
                ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """No drafts to verify: every fed row is kept, and each sequence that samples draws its token from its
        last row, all in one call, as plain decoding does. -> (new tokens, their rows, kept rows)."""
        new_tokens, token_rows = [[] for _ in seqs], [[] for _ in seqs]
        kept_rows = [list(range(end - len(f), end)) for f, end in zip(feeds, ends)]
        idx = [i for i, smp in enumerate(sampling) if smp]
        if idx:
            last = batch.last_rows(h)
            if len(idx) < len(seqs):
                last = last.index_select(0, torch.tensor(idx, device=h.device))
            params = [seqs[i].params for i in idx]
            logits = self.sampler.adjust(self.runner.logits(last), params, lambda: [history(seqs[i]) for i in idx])
            toks = self.sampler.sample(logits, params, [generators[i] for i in idx]).tolist()
            for i, t in zip(idx, toks):
                new_tokens[i], token_rows[i] = [t], [ends[i] - 1]
        return new_tokens, token_rows, kept_rows

    def _verify(self, seqs, feeds, sampling, batch: StepBatch, h: torch.Tensor, ends: list[int], generators,
                block_size: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Check each sequence's drafts against the main model's rows -> (new tokens, the rows whose logits gave
        them, the rows kept: fed before the drafts, and the kept drafts'). Moves a kept alternative's latents to
        its position's slot."""
        params = [s.params for s in seqs]
        # the head only where verification looks: each sequence's last token and its drafts (not a whole prompt:
        # at V3's vocabulary a long prefill's logits alone would take gigabytes)
        lasts = [end - 1 - len(s.draft) for s, end in zip(seqs, ends)]
        spans = [range(last, end) if smp else range(0) for last, end, smp in zip(lasts, ends, sampling)]
        needed = list(itertools.chain.from_iterable(spans))
        logits = self.runner.logits(h if len(needed) == ends[-1] else
                                    h.index_select(0, torch.tensor(needed, dtype=torch.long, device=h.device)))
        offsets = [0, *itertools.accumulate(len(r) for r in spans)]
        # the logits to verify against, each row adjusted with its own history: the drafts before it
        logits = self.sampler.adjust(logits, [params[i] for i, r in enumerate(spans) for _ in r],
                                     lambda: [x for s, r in zip(seqs, spans) if r for x in self._row_histories(s)])
        # greedy verification needs argmaxes only: all of them in one op and one read back (one sync on a GPU)
        argmax = logits.argmax(dim=-1).tolist() if any(p.greedy for p in params) else []
        # sampled verification, the processed distributions p of its rows: all of them in one call too
        sampled = [i for i, (s, smp) in enumerate(zip(seqs, sampling)) if smp and s.draft and not params[i].greedy]
        probs = {}
        if sampled:
            rows = [r for i in sampled for r in range(offsets[i], offsets[i + 1])]
            p_all = self.sampler.probs(logits if len(rows) == len(logits) else logits[rows],
                                       [params[i] for i in sampled for _ in range(offsets[i], offsets[i + 1])])
            probs = dict(zip(sampled, p_all.split([offsets[i + 1] - offsets[i] for i in sampled])))
        # single sampled drafts (no chain) of 3 sequences or more: the accept/reject rule for all of them at once
        # (about 30 ops whatever their number, where verify_chain takes about 15 per sequence)
        ruled = {}
        if len(sampled) >= 3 and self.num_tokens == 1:
            sampled_p = p_all.view(len(sampled), 2, -1)  # (n, 2, V): each draft's position and the next
            q = torch.stack([self.draft_probs.pop(seqs[i].seq_id)[0] for i in sampled])
            gens = [generators[i] or self.sampler.default for i in sampled]
            ruled = dict(zip(sampled, verify_drafts(sampled_p, q, [seqs[i].draft[0] for i in sampled], gens)))
        new_tokens, token_rows, kept_rows, moves = [], [], [], ([], [])
        for i, seq in enumerate(seqs):
            last = lasts[i]  # the row of the sequence's last token (before its drafts)
            prefix = list(range(ends[i] - len(feeds[i]), last + 1))  # rows fed before the drafts: all kept
            rank = 0  # which of several guesses for one position was kept
            if not sampling[i]:  # a chunk of a longer prompt: every fed row kept, nothing sampled
                new_tokens.append([])
                token_rows.append([])
                kept_rows.append(prefix)
                continue
            best = argmax[offsets[i]:offsets[i + 1]]
            if not seq.draft:  # a prefill, or a request that does not draft: sample from the last position
                toks = [int(self.sampler.sample(logits[offsets[i]:offsets[i + 1]], [params[i]], [generators[i]]))]
            elif i in ruled:
                toks = ruled[i]
            elif self.num_tokens > 1:
                toks = self._verify_chain(seq, probs.get(i), best, params[i], generators[i])
            else:
                toks, rank = self._verify_guesses(seq, probs.get(i), best, params[i], generators[i])
                if rank:  # stored `rank` slots on: move its latents to the slot of its position
                    pos = seq.num_cached + len(prefix)
                    moves[0].append(slot_of(seq.block_table, pos + rank, block_size))
                    moves[1].append(slot_of(seq.block_table, pos, block_size))
            rows = [last] + [last + 1 + rank + j for j in range(len(toks) - 1)]  # the rows that gave the tokens
            new_tokens.append(toks)
            token_rows.append(rows)
            kept_rows.append(prefix + rows[1:])
            if seq.draft:
                self._count(seq, toks, rank)
        if moves[0]:
            self.runner.cache.move(*moves)
        return new_tokens, token_rows, kept_rows

    def _extend_mtp(self, seqs: list[Sequence], starts: list[int], kept_rows: list[list[int]], h: torch.Tensor,
                    batch: StepBatch, extend: list[bool], block_size: int, copy: bool
                    ) -> tuple[torch.Tensor | None, bool]:
        """MTP module 1 at every position the main model has confirmed and the module has not seen, p, with h_p
        and token p+1, for the sequences marked `extend`; the others keep this step's hidden states for later.
        starts: each sequence's cached positions before this step; kept_rows: the rows of h this step confirmed.
        -> (the module's hidden state at each extended sequence's last position (E, D), or None; whether that
        was the usual pass of a drafting step: every sequence, this step's positions only)."""
        for seq, start, rows, ext in zip(seqs, starts, kept_rows, extend):
            backlog = self.backlogs.get(seq.seq_id)
            if backlog is not None and (backlog.start != seq.num_mtp_cached or backlog.start + backlog.count != start):
                del self.backlogs[seq.seq_id]  # left from before a preemption, which recomputes both caches
                backlog = None
            assert seq.num_mtp_cached == (start if backlog is None else backlog.start), \
                (seq.num_mtp_cached, start, backlog and backlog.start)
            if not ext:
                if backlog is None:
                    backlog = self.backlogs[seq.seq_id] = Backlog(start)
                backlog.add(h, rows, copy)
        extended = [i for i, e in enumerate(extend) if e]
        if not extended:
            return None, False
        behind = any(seqs[i].seq_id in self.backlogs for i in extended)
        mtp_feeds = [seqs[i].token_ids[seqs[i].num_mtp_cached + 1: seqs[i].num_cached + 1] for i in extended]
        mtp_ids = torch.tensor(list(itertools.chain.from_iterable(mtp_feeds)), device=batch.input_ids.device)
        steady = len(extended) == len(seqs) and not behind
        if steady:
            ends = list(itertools.accumulate(batch.feed_lens))
            kept_flat = list(itertools.chain.from_iterable(kept_rows))
            kept = {len(k) for k in kept_rows}
            if kept_flat == list(range(ends[-1])):
                # every fed token was kept (a prefill, or single drafts all accepted): MTP runs at exactly the
                # main step's positions, so its batch is the main one with the next tokens fed
                mtp_batch, h_prev = replace(batch, input_ids=mtp_ids), h
            else:
                if batch.uniform and len(kept) == 1:
                    # a decode that kept m positions of every sequence: the rows of its last token and of the
                    # drafts it kept (the first m - 1 of a chain, or the first guess) have the positions, slots
                    # and causal mask the MTP step needs
                    mtp_batch = batch.leading(kept.pop(), mtp_ids)
                else:
                    mtp_batch = build_batch(mtp_feeds, starts, [s.block_table for s in seqs], block_size,
                                            self.runner.device)
                h_prev = _take(h, kept_flat)
        else:  # some sequences are behind, or not all extend: their own layout, over all they have missed
            sub = [seqs[i] for i in extended]
            pieces = []
            for i in extended:
                backlog = self.backlogs.pop(seqs[i].seq_id, None)
                if backlog is not None:
                    pieces += [_take(x, rows) for x, rows in backlog.pieces]
                pieces.append(_take(h, kept_rows[i]))
            h_prev = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            mtp_batch = build_batch(mtp_feeds, [s.num_mtp_cached for s in sub], [s.block_table for s in sub],
                                    block_size, self.runner.device)
        h_mtp = self.runner.forward_mtp(mtp_batch, h_prev, last_only=True)  # (E, D): each sequence's last row
        for i in extended:
            seqs[i].num_mtp_cached = seqs[i].num_cached
        return h_mtp, steady

    def _draft(self, seqs: list[Sequence], generators, h_mtp: torch.Tensor, block_size: int) -> None:
        """Set each sequence's drafts from the module's hidden state at its last position (h_mtp (B, D)); for a
        chain, run the module on, one position further per draft."""
        params = [s.params for s in seqs]
        self._propose(seqs, params, generators, self.runner.mtp_logits(h_mtp))
        live = list(range(len(seqs)))
        for j in range(1, self.num_tokens):
            # the chain's next draft: the module one position further on (cached position + j - 1), fed its own
            # last hidden state in place of the main model's and the draft it has just made; not past the
            # positions a sequence's blocks cover (its end is near)
            room = [i for i in live if seqs[i].num_cached + j - 1 < len(seqs[i].block_table) * block_size]
            if not room:
                break
            if room != live:
                h_mtp = h_mtp.index_select(0, torch.tensor([live.index(i) for i in room], device=h_mtp.device))
                live = room
            sub = [seqs[i] for i in live]
            chain = build_batch([[s.draft[-1]] for s in sub], [s.num_cached + j - 1 for s in sub],
                                [s.block_table for s in sub], block_size, self.runner.device)
            h_mtp = self.runner.forward_mtp(chain, h_mtp)
            self._propose(sub, [params[i] for i in live], [generators[i] for i in live],
                          self.runner.mtp_logits(h_mtp), extend=True)

    def _row_histories(self, seq: Sequence) -> list[History]:
        """The token history at each verified row of a sequence: its last token's (the output so far), then each
        draft's: a chain's row j follows drafts[:j]; an alternative follows the output and itself."""
        prompt, out = history(seq)
        if self.num_tokens == 1:
            return [(prompt, out)] + [(prompt, out + [d]) for d in seq.draft]
        return [(prompt, out + seq.draft[:j]) for j in range(len(seq.draft) + 1)]

    def _trim(self, seq: Sequence, room: int) -> None:
        """Keep at most `room` drafts (and their distributions)."""
        if len(seq.draft) > room:
            del seq.draft[max(room, 0):]
            if seq.seq_id in self.draft_probs:
                del self.draft_probs[seq.seq_id][max(room, 0):]

    def _verify_chain(self, seq: Sequence, p: torch.Tensor | None, best: list[int], params, generator) -> list[int]:
        """A chain of drafts at consecutive positions, each checked by the main model's row before it, the rows
        of the sequence's last token and of its k drafts: p (k+1, V), their distributions (sampling); best,
        their argmaxes (greedy)."""
        if params.greedy:  # the longest prefix the main model agrees with, then its own next token
            n = 0
            while n < len(seq.draft) and seq.draft[n] == best[n]:
                n += 1
            return seq.draft[:n] + [best[n]]
        return verify_chain(p, self.draft_probs.pop(seq.seq_id), seq.draft, generator or self.sampler.default)

    def _verify_guesses(self, seq: Sequence, p: torch.Tensor | None, best: list[int], params, generator
                        ) -> tuple[list[int], int]:
        """One drafted position with one or more guesses (alternatives), the rows of the last token and of each
        guess: p, their distributions (sampling: one guess); best, their argmaxes (greedy): position n's, then
        each alternative's row's. -> (new tokens, the rank of the kept guess, 0 if none)."""
        if not params.greedy:  # a single sampled draft, the exact rule
            return verify_chain(p[:2], self.draft_probs.pop(seq.seq_id), seq.draft[:1],
                                generator or self.sampler.default), 0
        self._observe(seq.seq_id, best[0])
        if best[0] not in seq.draft:
            return [best[0]], 0
        rank = seq.draft.index(best[0])
        return [best[0], best[1 + rank]], rank

    def _count(self, seq: Sequence, toks: list[int], rank: int) -> None:
        st = self.stats
        st.drafted += len(seq.draft) if self.num_tokens > 1 else 1
        st.accepted += len(toks) - 1
        st.decode_forwards += 1
        st.decode_tokens += len(toks)
        for j in range(len(toks) - 1):
            st.accepted_by_depth[j] += 1
        if self.num_tokens == 1 and len(toks) == 2:
            st.accepted_by_rank[rank] += 1
        self.policy.observe_tokens(len(toks))

    def _propose(self, seqs, params, generators, draft_logits: torch.Tensor, extend: bool = False) -> None:
        """Set each sequence's drafts from the MTP module's logits (B, V) at its last row: the top-k for greedy
        requests, one token drawn from q (remembered for its verification) for sampled ones. extend: append
        the next draft of a chain instead. The logits are adjusted as the main model's are, each row with its
        history, the drafts so far included: drafts then follow the penalties and logits processors (a sampled
        draft's q is the distribution it was drawn from, whatever that is)."""
        draft_logits = self.sampler.adjust(draft_logits, params,
                                           lambda: [history(s, s.draft if extend else ()) for s in seqs])
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            rows = draft_logits if len(greedy) == len(seqs) else draft_logits[greedy]
            top = rows.topk(self.topk, dim=-1).indices.tolist() if self.topk > 1 else rows.argmax(-1)[:, None].tolist()
            k = self.num_guesses()
            for i, guesses in zip(greedy, top):
                if extend:
                    seqs[i].draft.append(guesses[0])
                    continue
                seqs[i].draft = guesses[:k]
                if self.adaptive:
                    self.guesses[seqs[i].seq_id] = guesses
        if sampled:  # (Sampler.sample's draw, from q computed once)
            q_all = self.sampler.probs(draft_logits[sampled], [params[i] for i in sampled])
            drawn = draw(q_all, self.sampler.uniforms([generators[i] for i in sampled])).tolist()
            for j, i in enumerate(sampled):  # the distribution each draft came from, for its verification
                sid = seqs[i].seq_id
                if extend:
                    seqs[i].draft.append(drawn[j])
                    self.draft_probs[sid].append(q_all[j])
                else:
                    seqs[i].draft = [drawn[j]]
                    self.draft_probs[sid] = [q_all[j]]

    def forget(self, seq: Sequence) -> None:
        self.draft_probs.pop(seq.seq_id, None)
        self.guesses.pop(seq.seq_id, None)
        self.backlogs.pop(seq.seq_id, None)
        seq.draft = []


def verify_chain(p: torch.Tensor, qs: list[torch.Tensor], drafts: list[int], generator: torch.Generator
                 ) -> list[int]:
    """The tokens a chain of sampled drafts yields. p (k+1, V): the main model's distributions at the k
    drafts' positions and the one after; qs: the distribution each draft was drawn from. Each draft in turn is
    kept with probability min(1, p_j(d) / q_j(d)); the first rejected one is replaced by a draw from
    max(0, p_j - q_j), renormalised, and ends the chain; if all are kept, a bonus token is drawn from p_k.
    Every token is then distributed as plain sampling would give it (Leviathan et al. 2023, position by
    position)."""
    for j, d in enumerate(drafts):
        u = float(torch.rand(1, generator=generator))
        if not u * float(qs[j][d]) < float(p[j, d]):  # kept with probability min(1, p(d) / q(d))
            residual = (p[j] - qs[j]).clamp(min=0)
            if float(residual.sum()) <= 0:  # only when p == q, where a rejection cannot happen; stay safe
                residual = p[j]
            return list(drafts[:j]) + [_draw_one(residual / residual.sum(), generator)]
    return list(drafts) + [_draw_one(p[len(drafts)], generator)]


def verify_drafts(p: torch.Tensor, q: torch.Tensor, drafts: list[int], generators: list[torch.Generator]
                  ) -> list[list[int]]:
    """verify_chain for n sequences with one sampled draft each, in about 30 ops whatever n: p (n, 2, V), the
    main model's distributions at each draft's position and the one after; q (n, V), what each draft was drawn
    from. Sequence i draws its two uniforms (accept, then the token) from generators[i], in that order."""
    d = torch.tensor(drafts, device=p.device)[:, None]
    accept_u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(p.device, torch.float64)
    p0 = p[:, 0]
    kept = accept_u * q.gather(1, d).squeeze(1).double() < p0.gather(1, d).squeeze(1).double()  # min(1, p/q)
    residual = (p0 - q).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p0)  # mass 0 only where p == q: no rejection
    target = torch.where(kept[:, None], p[:, 1], residual)  # kept: the bonus token from p_next
    tokens = draw(target, torch.cat([torch.rand(1, generator=g) for g in generators]).to(p.device)).tolist()
    return [[dr, t] if k else [t] for dr, t, k in zip(drafts, tokens, kept.tolist())]


def verify_draft(p: torch.Tensor, p_next: torch.Tensor, q: torch.Tensor, draft: int, greedy: bool,
                 generator: torch.Generator) -> list[int]:
    """The tokens one verified draft yields. p, p_next: the main model's distributions at the draft's
    position and the one after; q: the distribution the draft was drawn from. -> [draft, bonus] if the
    draft is kept, else [replacement]."""
    if greedy:
        if int(p.argmax()) == draft:
            return [draft, int(p_next.argmax())]
        return [int(p.argmax())]
    return verify_chain(torch.stack([p, p_next]), [q], [draft], generator)


def _draw_one(probs: torch.Tensor, generator: torch.Generator) -> int:
    u = torch.rand(1, generator=generator).to(probs.device)
    return int(draw(probs[None], u)[0])
