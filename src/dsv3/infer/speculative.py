"""MTP speculative decoding, on top of the model runner (DeepSeek-V3 report §2.2 and §5.4.3).

Each decode step feeds, per sequence, its last token t_n and one draft d for t_{n+1} proposed by MTP
module 1. The main model scores both positions in one forward:
- greedy: d is kept if it is the argmax at position n; then position n+1's argmax comes for free.
- sampling (Leviathan et al. 2023; Chen et al. 2023): d, drawn from the draft distribution q, is kept with
  probability min(1, p(d) / q(d)); if not, the token is drawn from max(0, p - q), renormalised. Either way
  the output is distributed exactly as plain sampling from p.
A rejected draft's cache row is simply left behind: the next step overwrites it.

Then MTP module 1 runs over the positions the main model has just confirmed, p, with the main model's h_p
and the token t_{p+1}, extending its own latent cache, and its prediction at the last of them is the
next draft.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from .model_runner import ModelRunner, StepBatch, build_batch
from .sampling import Sampler, draw
from .scheduler import Sequence


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    decode_forwards: int = 0  # per sequence: main-model positions verified, one per sequence per step
    decode_tokens: int = 0  # tokens those forwards produced

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.decode_tokens / self.decode_forwards if self.decode_forwards else 0.0


class MTPSpeculator:
    def __init__(self, runner: ModelRunner, sampler: Sampler):
        if not runner.model.mtp:
            raise ValueError("speculative='mtp' needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        self.runner, self.sampler = runner, sampler
        self.draft_probs: dict[int, torch.Tensor] = {}  # seq_id -> q, the distribution its draft was drawn from
        self.stats = SpecStats()

    def step(self, seqs: list[Sequence], generators: list[torch.Generator | None], block_size: int
             ) -> tuple[list[list[int]], torch.Tensor, StepBatch]:
        """One main forward (+ one MTP forward) for `seqs` -> (new tokens per sequence, main logits of every
        fed token (N, V), the batch). Updates each sequence's cache counts and draft."""
        runner = self.runner
        feeds = [s.token_ids[s.num_cached:] + s.draft for s in seqs]
        batch = build_batch(feeds, [s.num_cached for s in seqs], [s.block_table for s in seqs], block_size,
                            runner.device)
        h = runner.forward(batch)
        logits = runner.logits(h)
        params = [s.params for s in seqs]
        starts = [0, *itertools.accumulate(batch.feed_lens)]
        new_tokens: list[list[int]] = []
        for i, seq in enumerate(seqs):
            last = starts[i + 1] - 1
            if not seq.draft:  # prefill: sample from the last position, as plain decoding
                tok = self.sampler.sample(logits[last:last + 1], [params[i]], [generators[i]])
                new_tokens.append([int(tok)])
                continue
            if params[i].greedy:  # argmaxes only: no distributions needed
                best = logits[last - 1:last + 1].argmax(dim=-1).tolist()  # positions n, n+1
                toks = [seq.draft[0], best[1]] if best[0] == seq.draft[0] else [best[0]]
            else:
                p = self.sampler.probs(logits[last - 1:last + 1], [params[i]] * 2)
                q = self.draft_probs.pop(seq.seq_id)
                toks = verify_draft(p[0], p[1], q, seq.draft[0], False, generators[i] or self.sampler.default)
            new_tokens.append(toks)
            self.stats.drafted += 1
            self.stats.accepted += len(toks) - 1
            self.stats.decode_forwards += 1
            self.stats.decode_tokens += len(new_tokens[-1])

        # the main model's cache now holds confirmed positions up to the last accepted one
        mtp_feeds, mtp_h = [], []
        for i, (seq, toks) in enumerate(zip(seqs, new_tokens)):
            start = seq.num_cached
            seq.num_cached = start + (len(feeds[i]) if not seq.draft else len(toks))
            seq.token_ids.extend(toks)
            # MTP at positions [num_mtp_cached, num_cached): main hidden state at p, token p+1
            n = seq.num_cached - seq.num_mtp_cached
            assert seq.num_mtp_cached == start, (seq.num_mtp_cached, start)
            mtp_feeds.append(seq.token_ids[seq.num_mtp_cached + 1: seq.num_cached + 1])
            mtp_h.append(h[starts[i]: starts[i] + n])
        if [len(f) for f in mtp_feeds] == batch.feed_lens:
            # every fed position was confirmed (a prefill, or all drafts kept): MTP runs at exactly the main
            # step's positions, so its batch is the main one with the next tokens fed
            mtp_batch = replace(batch, input_ids=torch.tensor(
                list(itertools.chain.from_iterable(mtp_feeds)), device=batch.input_ids.device))
            h_prev = h
        else:
            mtp_batch = build_batch(mtp_feeds, [s.num_mtp_cached for s in seqs], [s.block_table for s in seqs],
                                    block_size, runner.device)
            h_prev = mtp_h[0] if len(mtp_h) == 1 else torch.cat(mtp_h)
        h_mtp = runner.forward_mtp(mtp_batch, h_prev)
        draft_logits = runner.mtp_logits(mtp_batch.last_rows(h_mtp))
        drafts = self.sampler.sample(draft_logits, params, generators).tolist()
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        q_all = self.sampler.probs(draft_logits[sampled], [params[i] for i in sampled]) if sampled else None
        for i, seq in enumerate(seqs):
            seq.num_mtp_cached = seq.num_cached
            seq.draft = [drafts[i]]
        for j, i in enumerate(sampled):  # the distribution each sampled draft came from, for its verification
            self.draft_probs[seqs[i].seq_id] = q_all[j]
        return new_tokens, logits, batch

    def forget(self, seq: Sequence) -> None:
        self.draft_probs.pop(seq.seq_id, None)
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
