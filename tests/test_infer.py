"""The engine against plain references: absorbed vs naive MLA over the latent cache, engine greedy vs
full-recompute greedy and transformers' generate, batched vs alone, speculative vs plain, stop rules."""

from __future__ import annotations

import logging

import pytest
import torch

import dsv3
from dsv3.infer import LLM, SamplingParams
from dsv3.infer.kv_cache import LatentCache
from dsv3.infer.model_runner import mla_absorbed, mla_naive, score_bias
from dsv3.tokenizer import train_bpe

from conftest import random_model, rel_err, tiny_config

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
# Tests of the drafting machinery draft every step (the adaptive policy, the default, would decide by the clock
# whether drafting pays: tests/test_speculative_policy.py drives it with a fake one)
ALWAYS = dict(speculative="mtp", speculative_policy="always")


@torch.no_grad()
def reference_greedy(model, prompt, n):
    ids = torch.tensor([prompt], device=model.device)
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_absorbed_attention_equals_naive():
    c = tiny_config()
    attn = random_model(c).layers[0].attn
    B, T, S, H = 3, 2, 9, c.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q_nope, q_rope = torch.randn(B, T, H, c.qk_nope_head_dim, generator=g), torch.randn(B, T, H, c.qk_rope_head_dim, generator=g)
    kv, k_rope = torch.randn(B, S, c.kv_lora_rank, generator=g), torch.randn(B, S, c.qk_rope_head_dim, generator=g)
    lens = torch.tensor([9, 5, 2])
    qpos = lens[:, None] - T + torch.arange(T)
    mask = (torch.arange(S)[None, None] <= qpos[..., None])[:, None]
    w = attn.wkv_b.weight.view(H, -1, c.kv_lora_rank)
    ctx = torch.cat([kv, k_rope], dim=-1)
    with torch.no_grad():
        a = mla_absorbed(q_nope, q_rope, ctx, score_bias(mask, H, ctx.dtype), w[:, :c.qk_nope_head_dim],
                         w[:, c.qk_nope_head_dim:].transpose(1, 2), attn.softmax_scale)
        b = mla_naive(attn, q_nope, q_rope, ctx, mask)
    assert rel_err(a, b) <= 1e-5


def test_mtp_forward_of_the_last_rows_only_equals_the_full_one():
    """forward_mtp(last_only=True) writes every fed row's latent to the module's cache, as the full forward
    does, and gives each sequence's last row of it (a ragged step: a prompt, a decode and three positions)."""
    from dsv3.infer.model_runner import build_batch

    c = tiny_config()
    tables = [[0, 1], [2, 3], [4, 5]]
    # ragged; and uniform (each sequence 2 rows, as a step that kept a decode's token and its draft)
    for feeds, starts in [([[5, 7, 9, 11, 13, 2, 4], [3], [8, 8, 1]], [0, 6, 2]), ([[5, 7], [3, 1], [8, 2]], [3, 0, 5])]:
        outs, rows = [], []
        for last_only in (False, True):
            llm = LLM(random_model(c), cpu_kernels=False, max_num_seqs=4, block_size=4, **ALWAYS)
            layer = c.num_hidden_layers
            batch = build_batch(feeds, starts, tables, 4, "cpu")
            h_prev = torch.randn(sum(map(len, feeds)), c.hidden_size, generator=torch.Generator().manual_seed(0))
            h = llm.runner.forward_mtp(batch, h_prev, last_only=last_only)
            outs.append(h if last_only else batch.last_rows(h))
            rows.append(llm.cache.data[layer, batch.slots].clone())
        assert outs[1].shape == (3, c.hidden_size) and rel_err(outs[1], outs[0]) <= 1e-5
        assert torch.equal(rows[0], rows[1])


def test_engine_greedy_equals_full_recompute_and_batched_equals_alone():
    c = tiny_config()
    model = random_model(c, std=0.2)
    ps = prompts(c.vocab_size, [7, 3, 12, 5])
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    batched = llm.generate(ps, GREEDY)
    for p, out in zip(ps, batched):
        assert out.token_ids == reference_greedy(model, p, 10)
        assert out.finish_reason == "length" and out.prompt_token_ids == p
        assert llm.generate([p], GREEDY)[0].token_ids == out.token_ids  # alone
    # the absorbed path decoded these (one query per sequence); the naive one prefilled them
    assert llm.stats["decode_tokens"] > 0


def test_engine_runs_the_models_own_blocks():
    """The engine calls the model's forward (its attention through a backend over the cache), not a copy of it:
    a change to one block (a forward hook here; tensor parallelism or FP8 in practice) reaches the engine's
    tokens and its MTP module's hidden states exactly as it reaches the model's own forward."""
    from dsv3.infer.model_runner import build_batch

    c = tiny_config()
    model = random_model(c, std=0.2)
    ps = prompts(c.vocab_size, [7, 3])
    plain = LLM(model, block_size=4, kv_cache_tokens=256).generate(ps, GREEDY)
    shift = torch.randn(c.hidden_size, generator=torch.Generator().manual_seed(1))
    hooks = [model.layers[1].register_forward_hook(lambda mod, args, out: out + shift),
             model.mtp[0].block.register_forward_hook(lambda mod, args, out: out - shift)]
    try:
        llm = LLM(model, block_size=4, kv_cache_tokens=256, **ALWAYS)
        shifted = llm.generate(ps, GREEDY)
        assert [o.token_ids for o in shifted] != [o.token_ids for o in plain]  # the hook matters
        for p, out in zip(ps, shifted):
            assert out.token_ids == reference_greedy(model, p, 10)
        ids = torch.tensor([ps[0]])
        with torch.no_grad():
            h = model.hidden_states(ids)
            want = model.mtp_hidden_states(h, ids)[0][0]  # (T-1, D): module 1 at positions 0..T-2
        batch = build_batch([ps[0][1:]], [0], [list(range(8))], 4, "cpu")
        got = llm.runner.forward_mtp(batch, h[0, :-1])
        assert rel_err(got, want) <= 1e-5
    finally:
        for hk in hooks:
            hk.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, speculative", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.float32, "mtp")])
def test_engine_on_cuda(dtype, speculative):
    """On a GPU: greedy equals full recompute in float32 (with and without MTP drafts); in bfloat16 the eager
    engine and the CUDA-graph one give the same tokens for most of the way (rounding may split them late)."""
    c = tiny_config()
    model = random_model(c, std=0.2).to("cuda", dtype)
    ps = prompts(c.vocab_size, [7, 3, 12, 5])
    llm = LLM(model, speculative=speculative, num_speculative_tokens=2 if speculative else 1, block_size=16,
              kv_cache_tokens=512)
    outs = llm.generate(ps, GREEDY)
    if dtype == torch.float32:
        for p, out in zip(ps, outs):
            assert out.token_ids == reference_greedy(model, p, 10)
    else:
        eager = LLM(model, block_size=16, kv_cache_tokens=512, cuda_graphs=False).generate(ps, GREEDY)
        agree = [sum(a == b for a, b in zip(o.token_ids, e.token_ids)) for o, e in zip(outs, eager)]
        assert min(o.token_ids[:3] == e.token_ids[:3] for o, e in zip(outs, eager)) and sum(agree) >= 30, agree


def test_engine_greedy_equals_transformers_generate(tmp_path, quiet):
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    c = tiny_config(vocab_size=64)
    model = random_model(c, std=0.2)
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = LLM(tmp_path, kv_cache_tokens=512)
    for p in prompts(c.vocab_size, [6, 15], seed=1):
        ours = llm.generate([p], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))[0].token_ids
        with torch.no_grad():
            x = torch.tensor([p])
            theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert ours == theirs


def test_preemption_recomputes_and_changes_nothing():
    c = tiny_config()
    model = random_model(c, std=0.2)
    ps = prompts(c.vocab_size, [6, 6, 6, 6], seed=2)
    want = [reference_greedy(model, p, 10) for p in ps]
    # 12 blocks of 4 positions: four sequences of 16 positions cannot all fit
    llm = LLM(model, block_size=4, kv_cache_tokens=48)
    outs = llm.generate(ps, GREEDY)
    assert llm.stats["preemptions"] > 0
    assert [o.token_ids for o in outs] == want
    # with MTP drafts (up to 3 alternatives, written past each sequence's end) and as little room: the same
    spec = LLM(model, speculative="mtp", speculative_topk=3, block_size=4, kv_cache_tokens=56)
    outs = spec.generate(ps, GREEDY)
    assert spec.stats["preemptions"] > 0 and spec.stats["drafted"] > 0
    assert [o.token_ids for o in outs] == want


@pytest.mark.parametrize("vocab, topk, k", [(8, 1, 1), (8, 2, 1), (8, 3, 1), (8, None, 1), (300, 1, 1), (300, None, 1),
                                            (4, None, 2), (8, None, 2), (300, None, 2), (4, None, 3), (300, None, 3)])
def test_speculative_greedy_is_identical_to_plain_greedy(vocab, topk, k):
    """A small vocabulary makes the random MTP module right often enough to exercise every branch: a draft
    rejected, kept at rank 1, and kept at rank 2 or 3 (its latents moved into place; with block_size 4 the
    alternatives often straddle a block boundary); with k = num_speculative_tokens > 1, chains of k drafted
    positions (the module run once per position on its own hidden state) kept whole or in part."""
    c = tiny_config(vocab_size=vocab)
    model = random_model(c, std=0.2, seed=5)
    ps = prompts(vocab, [5, 9, 2, 14], seed=3)
    params = SamplingParams(temperature=0, max_new_tokens=25, ignore_eos=True)
    plain = LLM(model, block_size=4, kv_cache_tokens=512).generate(ps, params)
    spec_llm = LLM(model, **ALWAYS, speculative_topk=topk, num_speculative_tokens=k, block_size=4,
                   kv_cache_tokens=512)
    spec = spec_llm.generate(ps, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    # alone, every step is uniform: the MTP step reuses the main step's layout (StepBatch.leading)
    assert spec_llm.generate(ps[1], params)[0].token_ids == plain[1].token_ids
    st = spec_llm.stats
    assert st["drafted"] > 0 and st["tokens_per_forward"] == pytest.approx(1 + k * st["acceptance_rate"])
    depth = st["accepted_by_depth"]
    assert len(depth) == k and sum(depth) == st["accepted"] and depth == sorted(depth, reverse=True)
    if k == 1:
        assert len(st["accepted_by_rank"]) == (topk or 2) and sum(st["accepted_by_rank"]) == st["accepted"]
    if vocab == 8 and k == 1:
        assert 0 < st["accepted"] < st["drafted"]
        if topk and topk > 1:
            assert sum(st["accepted_by_rank"][1:]) > 0
    if vocab == 4:
        assert depth[1] > 0  # whole chains of two were kept
    if k > 1:  # under cache pressure (preemptions; drafts written past each sequence's end): the same tokens
        short = [p[:6] for p in ps]
        want = [o.token_ids for o in LLM(model, block_size=4, kv_cache_tokens=512).generate(short, params)]
        tight = LLM(model, **ALWAYS, num_speculative_tokens=k, block_size=4, kv_cache_tokens=64)
        assert [o.token_ids for o in tight.generate(short, params)] == want and tight.stats["preemptions"] > 0


@pytest.mark.parametrize("k, topk", [(1, None), (1, 3), (2, None), (3, None)])
def test_speculation_runs_to_the_end_of_the_context(k, topk):
    """A cache of exactly one context (the CPU default at batch 1): near the end there is no room for every
    draft, so fewer are verified, and sequences stop at the context's end with plain greedy's tokens (this
    used to preempt the sequence for its drafts' room, forever). A context longer than the cache is cut to it."""
    c = tiny_config(vocab_size=4, max_position_embeddings=32)
    model = random_model(c, std=0.2, seed=5)
    ps, params = [[1, 2, 3, 0, 1], [2, 2]], SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)
    want = [o.token_ids for o in LLM(model, block_size=4, max_num_seqs=1).generate(ps, params)]
    llm = LLM(model, **ALWAYS, num_speculative_tokens=k, speculative_topk=topk, block_size=4, max_num_seqs=1)
    outs = llm.generate(ps, params)
    assert [o.token_ids for o in outs] == want and [len(o.token_ids) for o in outs] == [27, 30]
    assert all(o.finish_reason == "length" for o in outs) and llm.stats["accepted"] > 0
    assert LLM(model, block_size=4, kv_cache_tokens=20).max_model_len == 20
    with pytest.raises(ValueError, match="longer than the latent cache"):
        LLM(model, block_size=4, kv_cache_tokens=20, max_model_len=32)


@pytest.mark.parametrize("k", [1, 3])
def test_stop_string_inside_a_speculative_step(k):
    """A step can yield several tokens; a stop string completed by one of them drops the ones after it, as
    plain decoding never generated them (tokens, logprobs and the count all agree with plain)."""
    class OneLetterTokenizer:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return "".join("abcd"[i] for i in ids)

    model = random_model(tiny_config(vocab_size=4), std=0.2, seed=5)
    p = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, stop=["bbc"], logprobs=0)
    prompt = [3, 3, 1, 3, 1, 2]
    plain = LLM(model, tokenizer=OneLetterTokenizer(), block_size=4, kv_cache_tokens=512).generate([prompt], p)[0]
    llm = LLM(model, tokenizer=OneLetterTokenizer(), speculative="mtp", num_speculative_tokens=k, block_size=4,
              kv_cache_tokens=512)
    spec = llm.generate([prompt], p)[0]
    assert plain.finish_reason == spec.finish_reason == "stop" and "bbc" not in spec.text
    assert spec.token_ids == plain.token_ids and len(spec.logprobs) == len(plain.token_ids)
    assert llm.stats["decode_tokens"] == len(spec.token_ids) - 1  # the prefill gave the first


def test_chained_drafts_sampled_reproducible_and_errors():
    c = tiny_config(vocab_size=6)
    model = random_model(c, std=0.2, seed=5)
    ps = prompts(6, [4, 6], seed=4)
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=30, ignore_eos=True, seed=s) for s in (1, 2)]
    runs = [LLM(model, **ALWAYS, num_speculative_tokens=3, block_size=4, kv_cache_tokens=256)
            for _ in range(2)]
    a, b = (llm.generate(ps + [ps[0]], params + [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)])
            for llm in runs)
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and all(len(o.token_ids) == 30 for o in a)
    assert runs[0].stats["accepted"] > 0
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(model, speculative="mtp", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="chain"):
        LLM(model, speculative="mtp", num_speculative_tokens=2, speculative_topk=2)
    with pytest.raises(ValueError, match="needs speculative"):
        LLM(model, num_speculative_tokens=2)


def test_adaptive_guesses_follow_the_hit_rates():
    """By default a second guess is verified while the main model's token is often enough the module's
    second choice; the rates are learned from every drafted position, verified guess or not."""
    from dsv3.infer.speculative import EXTRA_GUESS_COST, MTPSpeculator
    c = tiny_config(vocab_size=8)
    llm = LLM(random_model(c, std=0.2, seed=5), speculative="mtp", block_size=4, kv_cache_tokens=256)
    sp: MTPSpeculator = llm.speculator
    assert sp.adaptive and sp.topk == 2 and llm.scheduler.lookahead == 3 and sp.num_guesses() == 2
    sp.hit_rate = [0.9, 0.01]  # first guesses nearly always right: the second does not pay for its row
    assert sp.num_guesses() == 1
    sp.hit_rate = [0.3, 0.4]  # a briefly trained module: often right only at its second guess
    assert sp.num_guesses() == 2
    sp.hit_rate = [0.9, EXTRA_GUESS_COST * 1.9 + 1e-3]
    assert sp.num_guesses() == 2
    sp.guesses[7] = [3, 5]
    sp._observe(7, 5)  # the main model's token was the second guess
    assert sp.hit_rate[1] > EXTRA_GUESS_COST * 1.9 and sp.hit_rate[0] < 0.9 and 7 not in sp.guesses
    assert LLM(random_model(c), speculative="mtp", speculative_topk=1).speculator.num_guesses() == 1


def test_draft_alternatives_share_a_position_and_see_only_the_prefix():
    """build_batch's one-level draft tree: the alternatives take the same rotary position, are stored at
    consecutive slots, and attend to the sequence and to themselves, not to each other."""
    from dsv3.infer.model_runner import build_batch
    b = build_batch([[7, 1, 2, 3], [9]], [5, 2], [[0, 1, 2], [3]], 4, "cpu", alternatives=[3, 0])
    assert b.positions.tolist() == [5, 6, 6, 6, 2]
    assert b.slots.tolist() == [5, 6, 7, 8, 14]
    allowed = b.key_mask()[0, 0]  # (T, S) for the first sequence: key positions 0..8
    assert allowed[0].tolist() == [True] * 6 + [False] * 3  # the last real token: causal
    for j in range(3):  # alternative j: the prefix 0..5 and its own slot 6 + j
        assert allowed[1 + j].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6 + j]
    assert b.key_mask()[1, 0, 0, :3].tolist() == [True] * 3 and not b.key_mask()[1, 0, 0, 3:].any()


def test_speculative_topk_one_guess_per_sampled_request():
    """Sampled requests verify a single draft (the exact accept/reject rule), whatever speculative_topk."""
    c = tiny_config(vocab_size=8)
    model = random_model(c, std=0.2, seed=5)
    llm = LLM(model, **ALWAYS, speculative_topk=3, block_size=4, kv_cache_tokens=512)
    ps = prompts(8, [4, 6], seed=4)
    params = [SamplingParams(temperature=0.8, max_new_tokens=20, ignore_eos=True, seed=1),
              SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)]
    outs = llm.generate(ps, params)
    assert outs[1].token_ids == LLM(model, block_size=4, kv_cache_tokens=512).generate([ps[1]], params[1])[0].token_ids
    assert all(len(o.token_ids) == 20 for o in outs)
    with pytest.raises(ValueError, match="speculative_topk"):
        LLM(model, speculative="mtp", speculative_topk=0)


def test_speculative_sampling_is_reproducible_and_plausible():
    c = tiny_config(vocab_size=8)
    model = random_model(c, std=0.2, seed=5)
    ps = prompts(8, [4, 6], seed=4)
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=30, ignore_eos=True, seed=s) for s in (1, 2)]
    a = LLM(model, **ALWAYS, block_size=4, kv_cache_tokens=256).generate(ps, params)
    b = LLM(model, **ALWAYS, block_size=4, kv_cache_tokens=256).generate(ps, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 30 for o in a)
    # four sequences: their drafts are verified together (verify_drafts), still reproducible
    ps4 = prompts(8, [4, 6, 3, 5], seed=6)
    params4 = [SamplingParams(temperature=0.8, max_new_tokens=24, ignore_eos=True, seed=s) for s in range(4)]
    runs = []
    for _ in range(2):
        llm = LLM(model, **ALWAYS, block_size=4, kv_cache_tokens=512)
        runs.append([o.token_ids for o in llm.generate(ps4, params4)])
    assert runs[0] == runs[1] and all(len(t) == 24 for t in runs[0])
    assert llm.stats["drafted"] > 0 and 0 < llm.stats["accepted"] < llm.stats["drafted"]


def test_seeded_sampling_independent_of_batch():
    c = tiny_config()
    model = random_model(c, std=0.2)
    ps = prompts(c.vocab_size, [5, 8, 3])
    sp = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=8, seed=123, ignore_eos=True)
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    together = llm.generate(ps, [sp, SamplingParams(temperature=1.0, max_new_tokens=8), sp])
    alone = llm.generate([ps[0]], sp)[0]
    assert together[0].token_ids == alone.token_ids


def test_stop_rules_and_errors(tmp_path):
    tok = train_bpe(["the cat sat on the mat. the dog ate the bone! " * 20], vocab_size=300)
    c = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=64)
    model = random_model(c, std=0.2)
    llm = LLM(model, tokenizer=tok, block_size=4, kv_cache_tokens=256)
    free = llm.generate("the cat", SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert len(free.token_ids if isinstance(free, dsv3.infer.RequestOutput) else free[0].token_ids) == 12
    out = free[0]
    assert out.text == tok.decode(out.token_ids)
    # stop token ids end the output and are kept; the max length is respected
    stop_tok = out.token_ids[3]
    o = llm.generate("the cat", SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[stop_tok]))[0]
    assert o.token_ids == out.token_ids[:out.token_ids.index(stop_tok) + 1] and o.finish_reason == "stop"
    # stop strings end the text before them
    if len(out.text) > 4:
        s = out.text[2:4]
        o = llm.generate("the cat", SamplingParams(temperature=0, max_new_tokens=12, stop=[s]))[0]
        assert o.finish_reason == "stop" and o.text == out.text[:out.text.index(s)]
    # eos ends the output unless ignore_eos
    eos_llm = LLM(model, tokenizer=tok, block_size=4, kv_cache_tokens=256)
    eos_llm.eos_token_ids = {out.token_ids[5]}
    o = eos_llm.generate("the cat", SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert o.finish_reason == "stop" and len(o.token_ids) <= 6
    # an over-long prompt is refused before any work
    with pytest.raises(ValueError, match="prompt has 64 tokens but the context is 64"):
        llm.generate([[1] * 64], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[c.vocab_size + 5]], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    assert not llm.has_unfinished()


def test_kv_cache_bytes_per_token_is_the_latent_formula():
    c = tiny_config()
    llm = LLM(random_model(c), block_size=4, kv_cache_tokens=64)
    assert llm.kv_cache_bytes_per_token == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    # measured: the allocation holds the capacity plus one scratch row (the padding rows of CUDA-graph steps)
    assert llm.cache.data.nbytes == llm.kv_cache_bytes_per_token * (llm.cache.capacity + 1)
    v3 = dsv3.ModelConfig.preset("671B")
    assert LatentCache.bytes_per_token(v3, torch.bfloat16) == 70_272
    full = v3.num_hidden_layers * v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim) * 2
    assert full == 4_997_120 and full // 70_272 == 71


def test_fp8_model_generates_like_its_dequantised_twin(tmp_path):
    c = tiny_config()
    model = random_model(c, std=0.2)
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float32, fp8=True)
    ps = prompts(c.vocab_size, [5, 9])
    a = LLM(tmp_path, kv_cache_tokens=256).generate(ps, GREEDY)
    b = LLM(dsv3.load_pretrained(tmp_path, fp8=False), kv_cache_tokens=256).generate(ps, GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


@pytest.mark.parametrize("speculative", [None, "mtp", "mtp-chain"])
def test_logprobs_are_the_raw_model_distribution(speculative):
    """Generated and prompt tokens' logprobs are log_softmax of the model's own logits (before temperature and
    top-k/top-p), the top alternatives best first: checked against a full forward over prompt + output."""
    c = tiny_config(vocab_size={None: 300, "mtp": 8, "mtp-chain": 4}[speculative])  # small: MTP drafts get kept
    model = random_model(c, std=0.2, seed=5)
    ps = prompts(c.vocab_size, [6, 3, 9], seed=6)
    if speculative == "mtp-chain":
        llm = LLM(model, **ALWAYS, num_speculative_tokens=3, block_size=4, kv_cache_tokens=256)
    else:
        llm = LLM(model, speculative=speculative, speculative_policy="always", speculative_topk=3, block_size=4,
                  kv_cache_tokens=256)
    params = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2),
              SamplingParams(temperature=0.7, top_k=4, max_new_tokens=12, ignore_eos=True, logprobs=0, seed=1),
              SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)]
    outs = llm.generate(ps, params)
    for p, sp, out in zip(ps, params, outs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p + out.token_ids]))[0].float(), dim=-1)
        if sp.logprobs is None:
            assert out.logprobs is None and out.prompt_logprobs is None
            continue
        assert [lp.token_id for lp in out.logprobs] == out.token_ids
        for k, lp in enumerate(out.logprobs):
            row = ref[len(p) - 1 + k]
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == row.topk(sp.logprobs).indices.tolist()
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        for k, lp in enumerate(out.prompt_logprobs[1:], start=1):
            assert lp.token_id == p[k] and lp.logprob == pytest.approx(ref[k - 1, p[k]].item(), abs=1e-4)
            assert len(lp.top) == 2
    if speculative == "mtp":  # drafts were kept, some at rank 2 or 3: a new token's row was not simply the next one
        assert llm.stats["accepted"] > 0 and sum(llm.stats["accepted_by_rank"][1:]) > 0
    if speculative == "mtp-chain":  # chains kept two drafts and more: several new tokens per step
        assert llm.stats["accepted_by_depth"][1] > 0
