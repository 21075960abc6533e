"""The model runner: the only place that touches the device. It lays a step's tokens out as tensors
(`StepBatch`, the attention metadata, passed explicitly) and runs the model's own forward over them
(`DeepSeekV3.hidden_states`, `MTPModule.forward`) with an attention backend (`StepAttention`) that writes
and reads the latent cache; it returns hidden states. Whatever changes the model's blocks (tensor or expert
parallelism, FP8) changes the engine with them.

Every step, prefill or decode, is the same operation: each sequence feeds the tokens it has not computed
yet (its prompt; or its last token, plus drafts when speculating) at the positions that follow its cached
ones. Token-wise work (projections, MoE) runs on all fed tokens flattened together; attention gathers each
sequence's latents from the cache and runs padded per sequence.

Attention over the latent cache, two ways that compute the same thing:
- naive (prefill): expand the cached latents into per-head keys and values with W_UK, W_UV (`wkv_b`), then
  ordinary attention. Cheapest when many queries share the keys.
- absorbed (decode): never expand the cache. Fold W_UK into the query, q_lat = q_nope W_UK (C wide per
  head), score against the latents directly, average the latents, then apply W_UV. Cost per query grows
  with C instead of with every cached token's per-head keys: what makes MLA decode fast.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..model.layers import cast
from ..model.model import MLA, DeepSeekV3, attention
from .kv_cache import LatentCache


@dataclass
class StepBatch:
    """Attention metadata for one step. N fed tokens in all; B sequences; T the longest feed; S the longest
    context (cached + fed)."""
    input_ids: torch.Tensor  # (N,) the fed tokens, sequence after sequence
    positions: torch.Tensor  # (N,) their positions
    slots: torch.Tensor  # (N,) where their latents go in the cache
    q_index: torch.Tensor  # (B, T) index into the N fed tokens, padded with 0
    q_valid: torch.Tensor  # (B, T) bool
    slot_table: torch.Tensor  # (B, S) the slots of positions 0..S-1 of each sequence (any slot past its end)
    mask: torch.Tensor | None  # (B, 1, T, S) bool: query may attend key (key position <= query position);
    # None until first asked for (`key_mask`): at a long context only pieces of it are ever built
    feed_lens: list[int]  # tokens fed per sequence
    uniform: bool = False  # every sequence feeds T tokens: the (B, T) layout is a plain view of the N
    causal: bool = False  # every sequence feeds positions 0..T-1 (T == S): the mask is plain causal, and the
    # attention kernel can skip the masked half instead of being handed the mask
    starts: list[int] | None = None  # each sequence's first fed position (ragged steps group by it)
    q_pos: torch.Tensor | None = None  # (B, T) each fed token's position, -1 for padding: what builds the mask
    siblings: list = field(default_factory=list)  # (b, t, lo, hi): query t of sequence b skips keys lo..hi-1
    _bias: torch.Tensor | None = field(default=None, repr=False)
    _freqs: torch.Tensor | None = field(default=None, repr=False)
    _groups: list | None = field(default=None, repr=False)

    def groups(self, absorb_max_queries: int) -> list["AttentionGroup"]:
        """A ragged step's sequences grouped for attention, so that none is padded to another's length: the
        ones feeding at most absorb_max_queries tokens (decodes, drafts) together, for absorbed attention; every
        longer feed (a prompt or a chunk of one) alone, for naive attention over its own context. Padding a
        decode to a 2048-token chunk would give it 2048 query rows of attention over the chunk's context."""
        if self._groups is None:
            lens, starts = self.feed_lens, self.starts
            short = [b for b, n in enumerate(lens) if n <= absorb_max_queries]
            members = ([short] if short else []) + [[b] for b, n in enumerate(lens) if n > absorb_max_queries]
            self._groups = [AttentionGroup.of(self, m, causal=len(m) == 1 and starts[m[0]] == 0
                                              and lens[m[0]] > absorb_max_queries) for m in members]
        return self._groups

    def rope(self, rotary) -> torch.Tensor:
        """The rotary factors of the fed positions (N, R/2), computed once per step (the MTP module reuses
        them when it runs at the same positions)."""
        if self._freqs is None:
            self._freqs = rotary(self.positions)
        return self._freqs

    def key_mask(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """The mask's keys lo..hi-1 (B, 1, T, hi - lo); the whole mask (built once a step) by default."""
        if self.mask is None:
            S = self.slot_table.shape[1]
            hi = S if hi is None else hi
            if lo != 0 or hi != S:  # a piece: built for the asking (long contexts)
                return positional_mask(self.q_pos, self.q_valid, self.siblings, lo, hi, not self.uniform)
            self.mask = positional_mask(self.q_pos, self.q_valid, self.siblings, 0, S, not self.uniform)
        return self.mask[..., lo:hi]

    def score_bias(self, n_heads: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias (B, T*H, S) of 0 and -inf, laid out like the absorbed attention's
        scores; built on first use and shared by every layer of the step."""
        if self._bias is None or self._bias.dtype != dtype:
            self._bias = score_bias(self.key_mask(), n_heads, dtype)
        return self._bias

    def leading(self, m: int, input_ids: torch.Tensor) -> "StepBatch":
        """This uniform step cut to the first m fed tokens of every sequence, feeding input_ids (B*m,) there
        instead: the MTP module's step when the main model kept m positions of every sequence. The first m
        rows must be consecutive positions with a causal mask (a decode's tokens and its first draft are; the
        further alternatives are not). Rotary factors and the score bias are sliced, not rebuilt."""
        B, T = self.q_index.shape
        lead = lambda t: t.view(B, T, *t.shape[1:])[:, :m].reshape(B * m, *t.shape[1:])  # noqa: E731
        bias = None if self._bias is None else self._bias[:, : m * (self._bias.shape[1] // T)]
        q_index = _arange(B * m).view(B, m)
        if q_index.device != input_ids.device:
            q_index = q_index.to(input_ids.device)
        return StepBatch(input_ids=input_ids, positions=lead(self.positions), slots=lead(self.slots),
                         q_index=q_index, q_valid=self.q_valid[:, :m], slot_table=self.slot_table,
                         mask=self.key_mask()[:, :, :m], feed_lens=[m] * B, uniform=True, _bias=bias,
                         _freqs=None if self._freqs is None else lead(self._freqs))

    @property
    def last_index(self) -> torch.Tensor:
        """(B,) index of each sequence's last fed token in the N."""
        return torch.tensor([n - 1 for n in itertools.accumulate(self.feed_lens)], device=self.input_ids.device)

    def last_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, ...) -> the rows of each sequence's last fed token (B, ...)."""
        if self.uniform and self.q_index.shape[1] == 1:  # plain decode: every row is a last one
            return x
        return x.index_select(0, self.last_index)


@dataclass
class AttentionGroup:
    """Some of a ragged step's sequences, cut to their own longest feed T and context S (`StepBatch.groups`)."""
    rows: torch.Tensor  # (n,) their fed tokens' indices in the step's N, in (sequence, position) order
    q_index: torch.Tensor  # (B, T) index into the N, padded with 0
    q_valid: torch.Tensor  # (B, T)
    slot_table: torch.Tensor  # (B, S)
    causal: bool  # a lone sequence feeding positions 0..T-1: the mask is plain causal (`mask` is None)
    batch: StepBatch = field(repr=False)
    idx: torch.Tensor = field(repr=False)  # (B,) the members' rows in the step
    _mask: torch.Tensor | None = field(default=None, repr=False)
    _bias: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def of(batch: StepBatch, members: list[int], causal: bool) -> "AttentionGroup":
        T = max(batch.feed_lens[b] for b in members)
        S = max(batch.starts[b] + batch.feed_lens[b] for b in members)
        idx = torch.tensor(members, device=batch.q_index.device)
        q_index, q_valid = batch.q_index[idx, :T], batch.q_valid[idx, :T]
        return AttentionGroup(rows=q_index[q_valid], q_index=q_index, q_valid=q_valid,
                              slot_table=batch.slot_table[idx, :S], causal=causal, batch=batch, idx=idx)

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, S), or None when plain causal."""
        if self._mask is None and not self.causal:
            T, S = self.q_index.shape[1], self.slot_table.shape[1]
            self._mask = self.batch.key_mask()[self.idx, :, :T, :S]
        return self._mask

    def key_mask(self, lo: int, hi: int) -> torch.Tensor:
        """The mask's keys lo..hi-1 (B, 1, T, hi - lo), causal or not."""
        return self.batch.key_mask(lo, hi)[self.idx, :, : self.q_index.shape[1]]

    def score_bias(self, n_heads: int, dtype: torch.dtype) -> torch.Tensor:
        if self._bias is None or self._bias.dtype != dtype:
            self._bias = score_bias(self.mask, n_heads, dtype)
        return self._bias


def score_bias(mask: torch.Tensor, n_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (B, 1, T, S) -> additive bias (B, T*H, S): 0 where attention is allowed, -inf elsewhere."""
    B, _, T, S = mask.shape
    bias = torch.zeros(B, T, 1, S, dtype=dtype, device=mask.device)
    bias.masked_fill_(~mask.view(B, T, 1, S), float("-inf"))
    return bias.expand(B, T, n_heads, S).reshape(B, T * n_heads, S)


def positional_mask(q_pos: torch.Tensor, q_valid: torch.Tensor, siblings: list, lo: int, hi: int,
                    pad_rows: bool) -> torch.Tensor:
    """Keys lo..hi-1 of the mask from the queries' positions q_pos (B, T) -> (B, 1, T, hi - lo) bool: a key is
    seen by the queries at or after its position (past-the-end keys of a shorter sequence by none); the
    siblings' exclusions (`build_batch`) applied; with pad_rows, padded query rows see key 0, so that their
    softmax stays finite (their output is discarded)."""
    keys = _arange(hi)[lo:]
    if keys.device != q_pos.device:
        keys = keys.to(q_pos.device)
    mask = keys <= q_pos[:, None, :, None]
    for b, t, a, z in siblings:
        a, z = max(a, lo) - lo, min(z, hi) - lo
        if a < z:
            mask[b, 0, t, a:z] = False
    if pad_rows and lo == 0:
        mask[:, 0, :, 0] |= ~q_valid
    return mask


_ARANGE = torch.arange(4096)


def _arange(n: int) -> torch.Tensor:
    """torch.arange(n) as a slice of a cached one (one op fewer per call)."""
    global _ARANGE
    if n > _ARANGE.numel():
        _ARANGE = torch.arange(max(n, 2 * _ARANGE.numel()))
    return _ARANGE[:n]


def slot_of(block_table: list[int], pos: int, block_size: int) -> int:
    """The cache slot of a sequence's position (kv_cache.py's layout)."""
    return block_table[pos // block_size] * block_size + pos % block_size


def build_batch(feeds: list[list[int]], starts: list[int], block_tables: list[list[int]], block_size: int,
                device: torch.device, alternatives: list[int] | None = None) -> StepBatch:
    """feeds[b]: the tokens sequence b feeds, at positions starts[b], starts[b] + 1, ...

    alternatives[b] = c > 1 makes the last c tokens of feeds[b] alternatives for one position (a draft tree
    one level deep: several guesses for the next token verified in one forward). They share that position's
    rotary angle, each attends to the tokens before them and to itself only, and they are stored at
    consecutive cache slots from that position on (the speculator moves the kept one into place).

    Built from Python lists with a dozen tensor ops: at batch 1 a decode step of a small model takes a few
    milliseconds, and on a CPU each op here costs 5-20 us."""
    B = len(feeds)
    lens = [len(f) for f in feeds]
    alternatives = alternatives or [0] * B
    T, S = max(lens), max(s + n for s, n in zip(starts, lens))
    n_blocks = -(-S // block_size)
    tables = torch.tensor([t[:n_blocks] + [0] * (n_blocks - len(t[:n_blocks])) for t in block_tables])
    slot_table = (tables[:, :, None] * block_size + _arange(block_size)).flatten(1)[:, :S]  # (B, S)
    input_ids, positions, slots, q_index, q_pos = [], [], [], [], []
    siblings = []  # (b, t, first, last): query t of sequence b must not see the keys at first..last-1
    n = 0
    for b, (feed, start, table, alt) in enumerate(zip(feeds, starts, block_tables, alternatives)):
        pad = T - len(feed)
        stored = range(start, start + len(feed))  # where each fed token's latent is written
        input_ids += feed
        slots += [slot_of(table, p, block_size) for p in stored]
        q_index.append(list(range(n, n + len(feed))) + [0] * pad)
        q_pos.append(list(stored) + [-1] * pad)
        if alt > 1:
            first = len(feed) - alt
            positions += [*stored[:first], *[start + first] * alt]
            siblings += [(b, first + j, start + first, start + first + j) for j in range(1, alt)]
        else:
            positions += stored
        n += len(feed)
    uniform = all(len(f) == T for f in feeds)
    input_ids_N, positions_N, slots_N = torch.tensor([input_ids, positions, slots]).unbind()  # (not the slow
    q_index_BT, q_pos_BT = torch.tensor([q_index, q_pos]).unbind()  # Python iteration over a tensor's rows)
    # the mask (B, 1, T, S) is built from q_pos when first asked for (`StepBatch.key_mask`): causal by position,
    # past-the-end keys excluded, the siblings' exclusions applied, padded rows given key 0
    batch = StepBatch(input_ids=input_ids_N, positions=positions_N, slots=slots_N, q_index=q_index_BT,
                      q_valid=q_pos_BT >= 0, slot_table=slot_table, mask=None, feed_lens=lens, uniform=uniform,
                      causal=uniform and T == S and not siblings, starts=list(starts), q_pos=q_pos_BT,
                      siblings=siblings)
    if torch.device(device).type != "cpu":
        for name in ("input_ids", "positions", "slots", "q_index", "q_valid", "slot_table", "q_pos"):
            setattr(batch, name, getattr(batch, name).to(device, non_blocking=True))
    return batch


def mla_naive(attn: MLA, q_nope, q_rope, ctx, mask) -> torch.Tensor:
    """q_nope (B, T, H, P), q_rope (B, T, H, R); cached rows ctx (B, S, C + R); mask (B, 1, T, S), or None
    when T == S and the mask is plain causal -> (B, T, H, V), by expanding the latents into per-head keys and
    values."""
    k, v = attn.expand_kv(ctx[..., : attn.kv_lora_rank], ctx[..., attn.kv_lora_rank:])  # (B, S, H, P+R), (B, S, H, V)
    return attention(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, attn.softmax_scale)


def mla_absorbed(q_nope, q_rope, ctx, bias, w_uk, w_uv_t, scale: float) -> torch.Tensor:
    """The same as `mla_naive`, with W_UK (H, P, C) absorbed into the query and W_UV (given transposed,
    (H, C, V)) applied after attention: the cache is never expanded. Scores against the latent and the
    roped key come from one product, since a cache row holds both side by side; the scale and the mask
    (as an additive bias (B, T*H, S), `StepBatch.score_bias`) are applied by the same op."""
    B, T, H, P = q_nope.shape
    C = w_uk.shape[-1]
    q_lat = torch.bmm(q_nope.reshape(B * T, H, P).transpose(0, 1), w_uk)  # (H, B*T, C)
    q = torch.cat([q_lat.transpose(0, 1), q_rope.reshape(B * T, H, -1)], dim=-1)  # (B*T, H, C+R)
    scores = torch.baddbmm(bias, q.view(B, T * H, -1), ctx.transpose(1, 2), alpha=scale)  # (B, T*H, S)
    probs = cast(cast(scores, torch.float32).softmax(dim=-1), ctx.dtype)
    out_lat = torch.bmm(probs, ctx[..., :C])  # (B, T*H, C): per head, a weighted mean of latents
    out = torch.bmm(out_lat.view(B * T, H, C).transpose(0, 1), w_uv_t)  # (H, B*T, V)
    return out.transpose(0, 1).reshape(B, T, H, -1)


def attention_in_pieces(q: torch.Tensor, keys_values, key_mask, S: int, piece: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over S keys taken `piece` at a time, the pieces merged by log-sum-exp (online
    softmax, as flash attention and flash decoding do): the working set grows with the piece, not with S.

    q (B, G, T, D) for G heads (or head groups) sharing the keys; keys_values(lo, hi) -> k (B, G|1, hi - lo, D),
    v (B, G|1, hi - lo, V); key_mask(lo, hi) -> (B, 1|G, T, hi - lo) bool. Every query must see key 0 (causal
    attention does; padded rows are given it), so the running maximum is finite after the first piece.
    Scores and sums in float32 -> (B, G, T, V) in q's dtype."""
    qf = q.float()
    m = l = acc = None
    for lo in range(0, S, piece):
        hi = min(S, lo + piece)
        k, v = keys_values(lo, hi)
        scores = torch.matmul(qf, k.float().transpose(-1, -2)).mul_(scale)  # (B, G, T, hi - lo)
        scores.masked_fill_(~key_mask(lo, hi), float("-inf"))
        m_new = scores.amax(dim=-1, keepdim=True)
        if m is not None:
            m_new = torch.maximum(m, m_new)
        p = scores.sub_(m_new).exp_()  # (in place: the scores are not needed again)
        pv = torch.matmul(p, v.float())
        if m is None:
            l, acc = p.sum(dim=-1, keepdim=True), pv
        else:
            rescale = (m - m_new).exp_()
            l = l.mul_(rescale).add_(p.sum(dim=-1, keepdim=True))
            acc = acc.mul_(rescale).add_(pv)
        m = m_new
    return acc.div_(l).to(q.dtype)


class StepAttention:
    """The attention backend of one engine step, handed to the model's forward (`MLA.forward`): each MLA module
    stores the fed tokens' latents at their slots in its cache layer and attends over its sequences' cached
    ones, absorbed or naive, whole or in pieces (`ModelRunner.attend`). last_only: only each sequence's last
    fed token is attended and carried on (`rows`): an MTP module drafting."""

    def __init__(self, runner: "ModelRunner", batch: StepBatch, last_only: bool = False):
        self.runner, self.batch, self.last_only = runner, batch, last_only

    def freqs(self, rotary) -> torch.Tensor:
        return self.batch.rope(rotary)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, ...) -> the rows attention computed: all, or each sequence's last (B, ...)."""
        if not self.last_only:
            return x
        if self.batch.uniform:
            B, T = self.batch.q_index.shape
            return x.view(B, T, *x.shape[1:])[:, -1]
        return x.index_select(0, self.batch.last_index)

    def __call__(self, attn: MLA, q_nope, q_rope, kv, k_rope) -> torch.Tensor:
        self.runner.cache.write(attn.layer_id, self.batch.slots, kv, k_rope)
        attend = self.runner.attend_last if self.last_only else self.runner.attend
        return attend(attn, q_nope, q_rope, self.batch)


DEFAULT_ATTENTION_WORKSPACE = 256 * 2**20  # bytes a layer's attention may take at once beyond the cache


class ModelRunner:
    def __init__(self, model: DeepSeekV3, cache: LatentCache, absorb_max_queries: int = 4,
                 attention_workspace: int = DEFAULT_ATTENTION_WORKSPACE):
        self.model, self.cache = model, cache  # the model arrives packed (LLM.__init__)
        self.config = model.config
        self.device = model.device
        self.absorb_max_queries = absorb_max_queries  # steps feeding at most this many tokens per sequence
        # Attention reads a sequence's context whole while its keys, values and scores fit in this many bytes;
        # past that (a long context), in pieces that do, merged by log-sum-exp (`attention_in_pieces`)
        self.attention_workspace = attention_workspace
        # W_UK (H, P, C) and W_UV^T (H, C, V) per attention module (dequantised once if FP8)
        self.absorbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.absorb_weights()

    @torch.no_grad()
    def absorb_weights(self) -> None:
        """W_UK and W_UV^T of every attention module (of its local heads, under tensor parallelism), taken from
        wkv_b as it is now (again after the weights changed: a training step on the live model, see
        LLM.refresh_weights)."""
        cfg, dtype = self.config, self.model.dtype
        blocks = list(self.model.layers) + [m.block for m in self.model.mtp]
        for i, block in enumerate(blocks):
            w = block.attn.wkv_b.dense_weight(dtype).view(-1, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
            self.absorbed[i] = (w[:, : cfg.qk_nope_head_dim].contiguous(),
                                w[:, cfg.qk_nope_head_dim:].transpose(1, 2).contiguous())

    def heads(self, attn: MLA) -> int:
        """The heads this process computes: all of them, or its share under tensor parallelism."""
        return self.absorbed[attn.layer_id][0].shape[0]

    def piece(self, attn: MLA, B: int, T: int, absorbed: bool) -> int:
        """The keys per piece that keep one attention's working set within attention_workspace: per key, the
        gathered latent row, the float32 scores of every query and head and their mask, and the values: the
        latent's first C columns as a float32 matrix (absorbed), or the expanded per-head keys and values with
        their float32 copies (naive)."""
        H, C, R = self.heads(attn), attn.kv_lora_rank, attn.rope_dim
        elem = self.cache.data.element_size()
        per_key = B * ((C + R) * elem + T * H * (4 + 1))
        if absorbed:
            per_key += B * C * 4
        else:
            per_key += B * H * (attn.nope_dim + R + attn.v_dim) * (elem + 4)
        return max(16, self.attention_workspace // per_key)

    def attend_long(self, attn: MLA, layer: int, q_nope, q_rope, slot_table, key_mask, absorbed: bool) -> torch.Tensor:
        """Attention of q_nope (B, T, H, P), q_rope (B, T, H, R) over the cached rows of slot_table (B, S), key
        piece by key piece (`attention_in_pieces`): each piece's latents are gathered from the cache, and for
        the naive form expanded to per-head keys and values, only when its turn comes. -> (B, T, H, V)."""
        B, T, H, _ = q_nope.shape
        S, C = slot_table.shape[1], attn.kv_lora_rank
        read = lambda lo, hi: self.cache.read(layer, slot_table[:, lo:hi])  # noqa: E731  (B, hi - lo, C+R)
        if absorbed:  # queries folded into the latent space: every head scores the same latent rows
            w_uk, w_uv_t = self.absorbed[layer]
            q_lat = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk).transpose(0, 1)  # (B*T, H, C)
            q = torch.cat([q_lat, q_rope.reshape(B * T, H, -1)], dim=-1).view(B, 1, T * H, C + q_rope.shape[-1])

            def keys_values(lo, hi):
                ctx = read(lo, hi).unsqueeze(1)  # (B, 1, piece, C+R)
                return ctx, ctx[..., :C]

            mask = lambda lo, hi: key_mask(lo, hi).repeat_interleave(H, dim=2)  # noqa: E731  (B, 1, T*H, piece)
            out_lat = attention_in_pieces(q, keys_values, mask, S, self.piece(attn, B, T, True),
                                          attn.softmax_scale)  # (B, 1, T*H, C)
            out = torch.bmm(out_lat.view(B * T, H, C).transpose(0, 1), w_uv_t)  # (H, B*T, V)
            return out.transpose(0, 1).reshape(B, T, H, -1)

        def keys_values(lo, hi):
            ctx = read(lo, hi)
            k, v = attn.expand_kv(ctx[..., :C], ctx[..., C:])  # (B, piece, H, P+R), (B, piece, H, V)
            return k.transpose(1, 2), v.transpose(1, 2)

        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, P+R)
        out = attention_in_pieces(q, keys_values, key_mask, S, self.piece(attn, B, T, False), attn.softmax_scale)
        return out.transpose(1, 2)  # (B, T, H, V)

    def is_long(self, attn: MLA, B: int, T: int, S: int) -> bool:
        """Whether S keys take more than one piece."""
        return S > self.piece(attn, B, T, T <= self.absorb_max_queries)

    def attend(self, attn: MLA, q_nope: torch.Tensor, q_rope: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The fed tokens' queries q_nope (N, H, P), q_rope (N, H, R) over each sequence's cached latents (the
        fed ones included) -> (N, H, V)."""
        layer = attn.layer_id
        B, T = batch.q_index.shape
        if batch.uniform and self.is_long(attn, B, T, batch.slot_table.shape[1]):
            out = self.attend_long(attn, layer, q_nope.unflatten(0, (B, T)), q_rope.unflatten(0, (B, T)),
                                   batch.slot_table, batch.key_mask, T <= self.absorb_max_queries)
            return out.flatten(0, 1)
        if batch.uniform:  # decode (one token, or 1 + drafts, per sequence) or equal prompts: a plain (B, T) view
            ctx = self.cache.read(layer, batch.slot_table)  # (B, S, C+R)
            q_nope, q_rope = q_nope.unflatten(0, (B, T)), q_rope.unflatten(0, (B, T))
            if T <= self.absorb_max_queries:
                out = mla_absorbed(q_nope, q_rope, ctx, batch.score_bias(self.heads(attn), ctx.dtype),
                                   *self.absorbed[layer], attn.softmax_scale)
            else:
                out = mla_naive(attn, q_nope, q_rope, ctx, None if batch.causal else batch.key_mask())
            return out.flatten(0, 1)
        out = q_nope.new_empty(q_nope.shape[0], self.heads(attn), attn.v_dim)  # (N, H, V), in fed order
        for g in batch.groups(self.absorb_max_queries):  # ragged: no sequence padded to another's length
            qn, qr = q_nope[g.q_index], q_rope[g.q_index]  # (Bg, Tg, H, .)
            (Bg, Tg), Sg = g.q_index.shape, g.slot_table.shape[1]
            if self.is_long(attn, Bg, Tg, Sg):
                o = self.attend_long(attn, layer, qn, qr, g.slot_table, g.key_mask, Tg <= self.absorb_max_queries)
                out[g.rows] = o[g.q_valid]
                continue
            ctx = self.cache.read(layer, g.slot_table)
            if qn.shape[1] <= self.absorb_max_queries:
                o = mla_absorbed(qn, qr, ctx, g.score_bias(self.heads(attn), ctx.dtype), *self.absorbed[layer],
                                 attn.softmax_scale)
            else:
                o = mla_naive(attn, qn, qr, ctx, g.mask)
            out[g.rows] = o[g.q_valid]
        return out

    def attend_last(self, attn: MLA, q_nope: torch.Tensor, q_rope: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """As `attend`, for each sequence's last fed token only -> (B, H, V)."""
        layer, H = attn.layer_id, self.heads(attn)
        B, S = batch.slot_table.shape
        if self.is_long(attn, B, 1, S):  # each sequence's last row over its context, in pieces
            if batch.uniform:
                T = batch.q_index.shape[1]
                rows = batch.q_index[:, -1]
                key_mask = lambda lo, hi: batch.key_mask(lo, hi)[:, :, T - 1:]  # noqa: E731
            else:
                rows, last_pos = batch.last_index, batch.positions.index_select(0, batch.last_index)
                key_mask = lambda lo, hi: (_arange(hi)[lo:].to(last_pos.device)  # noqa: E731
                                           <= last_pos[:, None, None, None])
            out = self.attend_long(attn, layer, q_nope.index_select(0, rows).unsqueeze(1),
                                   q_rope.index_select(0, rows).unsqueeze(1), batch.slot_table, key_mask, True)
            return out.squeeze(1)
        ctx = self.cache.read(layer, batch.slot_table)  # (B, S, C+R)
        if batch.uniform:  # (B, T) rows: the last ones are views, their bias a slice of the step's
            T = batch.q_index.shape[1]
            q_nope, q_rope = q_nope.view(B, T, H, -1)[:, -1:], q_rope.view(B, T, H, -1)[:, -1:]
            bias = batch.score_bias(H, ctx.dtype)[:, (T - 1) * H:]
        else:
            last = batch.last_index
            mask = _arange(ctx.shape[1]).to(ctx.device) <= batch.positions.index_select(0, last)[:, None]  # (B, S)
            q_nope, q_rope = q_nope.index_select(0, last).unsqueeze(1), q_rope.index_select(0, last).unsqueeze(1)
            bias = score_bias(mask[:, None, None, :], H, ctx.dtype)
        return mla_absorbed(q_nope, q_rope, ctx, bias, *self.absorbed[layer], attn.softmax_scale).squeeze(1)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The main model on the fed tokens -> final-normed hidden states (N, D): the model's own forward, its
        attention through this runner (`StepAttention`)."""
        return self.model.hidden_states(batch.input_ids, backend=StepAttention(self, batch))

    @torch.inference_mode()
    def forward_mtp(self, batch: StepBatch, h_prev: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """MTP module 1 at the fed positions: batch.input_ids are the *next* tokens t_{p+1}, h_prev the main
        model's hidden states at p -> the module's hidden states (N, D), before its shared_head.norm.

        last_only: -> only each sequence's last row (B, D), the one that drafts. Every fed row's latent still
        goes to the module's cache (later drafts attend to them), but attention and the MoE run for the last
        rows only: a step that confirmed several positions, or catches up on many, pays for one row's."""
        module = self.model.mtp[0]
        every_row_last = batch.uniform and batch.q_index.shape[1] == 1  # (a plain decode: nothing to save)
        backend = StepAttention(self, batch, last_only=last_only and not every_row_last)
        return module(h_prev, self.model.embed(batch.input_ids), backend.freqs(self.model.rope), None, None, backend)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h).float()

    @torch.inference_mode()
    def mtp_logits(self, h_mtp: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.mtp[0].norm(h_mtp)).float()
