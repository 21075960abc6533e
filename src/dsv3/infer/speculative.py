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

Then MTP module 1 runs over the positions the main model has just confirmed, p, with the main model's h_p
and the token t_{p+1}, extending its own latent cache, and its prediction at the last of them gives the
next drafts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch

from .model_runner import ModelRunner, StepBatch, build_batch, slot_of
from .sampling import Sampler, draw
from .scheduler import Sequence


# What verifying one more guess costs, as a share of the tokens a step yields: an extra row in the main
# forward and a step layout the MTP module can no longer reuse. Measured on CPU (tiny, batch 1, where a step
# is dispatch-bound): 6-9% of a cycle. On a GPU the extra row is nearly free, so this errs towards fewer guesses.
EXTRA_GUESS_COST = 0.08
HIT_RATE_DECAY = 0.95  # the hit rates are averages over roughly the last 20 verified positions


@dataclass
class SpecStats:
    drafted: int = 0  # verified positions: one per sequence per decode step, however many alternatives
    accepted: int = 0  # of those, the ones where a draft was kept
    decode_forwards: int = 0  # per sequence: main-model positions verified, one per sequence per step
    decode_tokens: int = 0  # tokens those forwards produced
    accepted_by_rank: list[int] = field(default_factory=list)  # kept drafts by their rank in the module's top-k

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.decode_tokens / self.decode_forwards if self.decode_forwards else 0.0


class MTPSpeculator:
    def __init__(self, runner: ModelRunner, sampler: Sampler, topk: int | None = None):
        """topk: how many of the module's top guesses a greedy step verifies; None adapts between 1 and 2."""
        if not runner.model.mtp:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        if topk is not None and topk < 1:
            raise ValueError(f"speculative_topk must be at least 1, not {topk}")
        self.runner, self.sampler = runner, sampler
        self.adaptive = topk is None
        self.topk = min(2 if topk is None else topk, runner.config.vocab_size)  # the most guesses verified
        # per rank, how often the main model's token was the module's guess (verified or not): starts by
        # assuming a second guess pays, and learns within ~20 positions
        self.hit_rate = [0.5, 0.25, *[0.0] * (self.topk - 2)][: self.topk]
        self.guesses: dict[int, list[int]] = {}  # seq_id -> the module's top guesses behind its greedy draft
        self.draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> q, the distribution its draft was drawn from
        self.stats = SpecStats(accepted_by_rank=[0] * self.topk)

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
        """Cache positions a decode step may write past a sequence's last token: the drafts, and itself."""
        return 1 + self.topk

    def step(self, seqs: list[Sequence], generators: list[torch.Generator | None], block_size: int
             ) -> tuple[list[list[int]], list[list[int]], torch.Tensor, StepBatch]:
        """One main forward (+ one MTP forward) for `seqs` -> (new tokens per sequence, for each the fed row
        whose logits gave it, main logits of every fed token (N, V), the batch). Updates each sequence's
        cache counts and drafts."""
        runner = self.runner
        feeds = [s.token_ids[s.num_cached:] + s.draft for s in seqs]
        alternatives = [len(s.draft) for s in seqs]
        batch = build_batch(feeds, [s.num_cached for s in seqs], [s.block_table for s in seqs], block_size,
                            runner.device, alternatives if max(alternatives) > 1 else None)
        h = runner.forward(batch)
        logits = runner.logits(h)
        params = [s.params for s in seqs]
        ends = list(itertools.accumulate(batch.feed_lens))
        new_tokens, token_rows, kept_rows, moves = [], [], [], ([], [])
        for i, seq in enumerate(seqs):
            last = ends[i] - 1 - len(seq.draft)  # the row of the sequence's last token (before its drafts)
            prefix = list(range(ends[i] - len(feeds[i]), last + 1))  # rows fed before the drafts: all kept
            if not seq.draft:  # prefill: sample from the last position, as plain decoding
                toks = [int(self.sampler.sample(logits[last:last + 1], [params[i]], [generators[i]]))]
            elif params[i].greedy:  # argmaxes only: no distributions needed
                best = logits[last:ends[i]].argmax(dim=-1).tolist()  # position n, then each alternative's row
                toks = [best[0]]
                self._observe(seq.seq_id, best[0])
                if best[0] in seq.draft:
                    j = seq.draft.index(best[0])
                    toks.append(best[1 + j])
                    self.stats.accepted_by_rank[j] += 1
                    if j:  # stored j slots on: move its latents to the slot of its position
                        pos = seq.num_cached + len(prefix)
                        moves[0].append(slot_of(seq.block_table, pos + j, block_size))
                        moves[1].append(slot_of(seq.block_table, pos, block_size))
            else:
                p = self.sampler.probs(logits[last:last + 2], [params[i]] * 2)
                q = self.draft_probs.pop(seq.seq_id)
                toks = verify_draft(p[0], p[1], q, seq.draft[0], False, generators[i] or self.sampler.default)
                if len(toks) == 2:
                    self.stats.accepted_by_rank[0] += 1
            rows = [last] if len(toks) == 1 else [last, last + 1 + seq.draft.index(toks[0])]
            new_tokens.append(toks)
            token_rows.append(rows)
            kept_rows.append(prefix + rows[1:])
            if seq.draft:
                self.stats.drafted += 1
                self.stats.accepted += len(toks) - 1
                self.stats.decode_forwards += 1
                self.stats.decode_tokens += len(toks)
        if moves[0]:
            runner.cache.move(*moves)

        # the main model's cache now holds the kept positions; MTP runs at each, p, with h_p and token p+1
        mtp_feeds = []
        for seq, toks, kept in zip(seqs, new_tokens, kept_rows):
            assert seq.num_mtp_cached == seq.num_cached, (seq.num_mtp_cached, seq.num_cached)
            start = seq.num_cached
            seq.num_cached = start + len(kept)
            seq.token_ids.extend(toks)
            mtp_feeds.append(seq.token_ids[start + 1: seq.num_cached + 1])
        kept_flat = list(itertools.chain.from_iterable(kept_rows))
        mtp_ids = torch.tensor(list(itertools.chain.from_iterable(mtp_feeds)), device=batch.input_ids.device)
        kept = {len(k) for k in kept_rows}
        if kept_flat == list(range(ends[-1])):
            # every fed token was kept (a prefill, or single drafts all accepted): MTP runs at exactly the main
            # step's positions, so its batch is the main one with the next tokens fed
            mtp_batch, h_prev = replace(batch, input_ids=mtp_ids), h
        else:
            if batch.uniform and len(kept) == 1:
                # a decode that kept m positions of every sequence: its last token's and, with m = 2, its first
                # draft's row have the positions, slots and causal mask the MTP step needs
                mtp_batch = batch.leading(kept.pop(), mtp_ids)
            else:
                mtp_batch = build_batch(mtp_feeds, [s.num_mtp_cached for s in seqs], [s.block_table for s in seqs],
                                        block_size, runner.device)
            h_prev = h.index_select(0, torch.tensor(kept_flat, device=h.device))
        h_mtp = runner.forward_mtp(mtp_batch, h_prev)
        draft_logits = runner.mtp_logits(mtp_batch.last_rows(h_mtp))
        for seq in seqs:
            seq.num_mtp_cached = seq.num_cached
        self._propose(seqs, params, generators, draft_logits)
        return new_tokens, token_rows, logits, batch

    def _propose(self, seqs, params, generators, draft_logits: torch.Tensor) -> None:
        """Set each sequence's drafts from the MTP module's logits at its last kept position: the top-k for
        greedy requests, one token drawn from q (remembered for its verification) for sampled ones."""
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            rows = draft_logits if len(greedy) == len(seqs) else draft_logits[greedy]
            top = rows.topk(self.topk, dim=-1).indices.tolist() if self.topk > 1 else rows.argmax(-1)[:, None].tolist()
            k = self.num_guesses()
            for i, guesses in zip(greedy, top):
                seqs[i].draft = guesses[:k]
                self.guesses[seqs[i].seq_id] = guesses
        if sampled:
            rows = draft_logits[sampled]
            sub = [params[i] for i in sampled]
            drawn = self.sampler.sample(rows, sub, [generators[i] for i in sampled]).tolist()
            q_all = self.sampler.probs(rows, sub)
            for j, i in enumerate(sampled):  # the distribution each draft came from, for its verification
                seqs[i].draft = [drawn[j]]
                self.draft_probs[seqs[i].seq_id] = q_all[j]

    def forget(self, seq: Sequence) -> None:
        self.draft_probs.pop(seq.seq_id, None)
        self.guesses.pop(seq.seq_id, None)
        seq.draft = []


def verify_draft(p: torch.Tensor, p_next: torch.Tensor, q: torch.Tensor, draft: int, greedy: bool,
                 generator: torch.Generator) -> list[int]:
    """The tokens one verified draft yields. p, p_next: the main model's distributions at the draft's
    position and the one after; q: the distribution the draft was drawn from. -> [draft, bonus] if the
    draft is kept, else [replacement]."""
    if greedy:
        if int(p.argmax()) == draft:
            return [draft, int(p_next.argmax())]
        return [int(p.argmax())]
    u = float(torch.rand(1, generator=generator))
    if u * float(q[draft]) < float(p[draft]):  # kept with probability min(1, p(d) / q(d))
        return [draft, _draw_one(p_next, generator)]
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0:  # only when p == q, where a rejection cannot happen; stay safe
        residual = p
    return [_draw_one(residual / residual.sum(), generator)]


def _draw_one(probs: torch.Tensor, generator: torch.Generator) -> int:
    u = torch.rand(1, generator=generator).to(probs.device)
    return int(draw(probs[None], u)[0])
