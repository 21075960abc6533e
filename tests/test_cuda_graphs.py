"""Fixed-shape decode (cuda_graphs.py) against the engine's ordinary decode: the padded steps that CUDA graphs
capture give the same tokens and logprobs. On a CPU they run eagerly; the capture itself is checked on CUDA."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer import LLM, SamplingParams
from dsv3.infer.kv_cache import LatentCache
from dsv3.infer.model_runner import ModelRunner, build_batch
from dsv3.model.model import DeepSeekV3
from dsv3.model.moe import Experts
from dsv3.infer.cuda_graphs import DecodeGraphs, StaticDecode, batch_bucket, capture_blocker, context_bucket

from conftest import random_model, tiny_config


def prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_buckets():
    assert [batch_bucket(n, 6) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert [context_bucket(s, 10_000) for s in (1, 16, 17, 4096, 4097, 9000)] == [16, 16, 32, 4096, 8192, 10_000]
    assert context_bucket(100, 70) == 100  # never below the context itself
    llm = LLM(random_model(tiny_config(max_position_embeddings=20_000)), block_size=4, kv_cache_tokens=64)
    graphs = DecodeGraphs(llm.runner, 8, 20_000, capture=False)
    assert graphs.fits(8, 8192) and not graphs.fits(9, 100) and not graphs.fits(1, 8193)  # longer: eager


def test_padded_decode_steps_equal_eager_decode():
    """Ragged prompts, requests ending at different steps (the batch bucket shrinks 4 -> 2 -> 1), contexts
    crossing bucket edges, greedy and seeded sampling, logprobs: the same as the ordinary engine."""
    c = tiny_config()
    model = random_model(c, std=0.2, seed=3)
    ps = prompts(c.vocab_size, [7, 3, 12], seed=4)
    params = [SamplingParams(temperature=0, max_new_tokens=25, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=9, ignore_eos=True, seed=7),
              SamplingParams(temperature=0, max_new_tokens=14, ignore_eos=True, logprobs=0)]
    eager = LLM(model, block_size=4, kv_cache_tokens=256, max_num_seqs=4)
    assert eager.graphs is None  # nothing to capture on a CPU
    ref = eager.generate(ps, params)

    padded = LLM(model, block_size=4, kv_cache_tokens=256, max_num_seqs=4)
    padded.graphs = DecodeGraphs(padded.runner, 4, padded.max_model_len, capture=False)
    outs = padded.generate(ps, params)
    for a, b in zip(outs, ref):
        assert a.token_ids == b.token_ids
        if b.logprobs is not None:
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert {k for k in padded.graphs.buckets} >= {(4, 16), (4, 32), (2, 32), (1, 32)}
    # the padding rows wrote their latents to the scratch slot, which no sequence owns
    assert padded.cache.data[:, padded.cache.scratch_slot].abs().sum() > 0
    assert padded.cache.scratch_slot == padded.cache.capacity


def test_cuda_graphs_refused_where_they_cannot_run():
    llm = LLM(random_model(tiny_config()), block_size=4, kv_cache_tokens=64)
    assert "CUDA device" in capture_blocker(llm.runner)
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        LLM(random_model(tiny_config()), block_size=4, kv_cache_tokens=64, cuda_graphs=True)
    with pytest.raises(ValueError, match="speculative steps run eagerly"):
        LLM(random_model(tiny_config()), speculative="mtp", block_size=4, kv_cache_tokens=64, cuda_graphs=True)


def meta_step(fp8: bool = False) -> StaticDecode:
    c = tiny_config()
    with torch.device("meta"):
        model = DeepSeekV3(c)
    model = model.to("meta", torch.bfloat16).eval()
    if fp8:
        for m in model.modules():
            if isinstance(m, Experts):
                m.to_fp8()
    runner = ModelRunner(model.pack_projections(), LatentCache(c, 8, 4, torch.bfloat16, torch.device("meta")))
    return StaticDecode(runner, 4, 32)


def test_fixed_shape_step_never_reads_the_host():
    """A CUDA graph cannot capture a step that reads a device value on the host (.item(), .tolist(),
    bincount, nonzero, a copy to the CPU) or copies from host memory. On the meta device every such read
    raises, and a CPU tensor mixed in is an error: so a step that runs there has none. The routed experts take
    their grouped-GEMM path there, as on a GPU; FP8 experts loop on the host and are refused by
    capture_blocker for that reason."""
    logits = meta_step().forward()
    assert logits.shape == (4, tiny_config().vocab_size) and logits.device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):
        meta_step(fp8=True).forward()


def test_failed_capture_falls_back_to_eager(monkeypatch):
    c = tiny_config()
    model = random_model(c, std=0.2, seed=3)
    ps = prompts(c.vocab_size, [5, 8], seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    ref = LLM(model, block_size=4, kv_cache_tokens=128).generate(ps, params)
    llm = LLM(model, block_size=4, kv_cache_tokens=128)
    llm.graphs = DecodeGraphs(llm.runner, 16, llm.max_model_len, capture=False)
    llm.graphs.capture = True  # as on CUDA, with a capture that fails (a host sync inside, say)

    def fail(self, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticDecode, "capture", fail)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        outs = llm.generate(ps, params)
    assert llm.graphs is None and [o.token_ids for o in outs] == [o.token_ids for o in ref]


@pytest.mark.gpu
def test_captured_graphs_decode_like_eager_on_cuda():
    """A captured step's logits equal the eager step's on the same decode batch (bf16: loosely, scatter-adds are
    not bitwise reproducible), and the engine decodes through graphs."""
    c = tiny_config(moe_intermediate_size=64, intermediate_size=128)
    model = random_model(c, std=0.2, seed=3).to("cuda", torch.bfloat16)
    llm = LLM(model, block_size=16, kv_cache_tokens=512, max_num_seqs=4)
    blocker = capture_blocker(llm.runner)
    if blocker is not None:
        pytest.skip(blocker)
    feeds, starts, tables = [[5], [7], [9]], [10, 4, 7], [[0], [1], [2]]
    eager = llm.runner.logits(llm.runner.forward(build_batch(feeds, starts, tables, 16, "cuda")))
    graphed = llm.graphs.decode(build_batch(feeds, starts, tables, 16, "cpu"))
    assert llm.graphs.num_graphs == 1 and graphed.shape == eager.shape
    assert torch.allclose(graphed, eager, rtol=0.05, atol=0.05)
    outs = llm.generate(prompts(c.vocab_size, [7, 3, 12], seed=4),
                        SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    assert all(len(o.token_ids) == 20 for o in outs) and llm.stats["cuda_graphs"] >= 2 and llm.graphs is not None
