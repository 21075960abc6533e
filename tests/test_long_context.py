"""Long contexts in the engine: attention over the latent cache in pieces of keys merged by log-sum-exp
(model_runner.attention_in_pieces), so that a layer's working set grows with the piece, not the context.
Held equal to attention over the whole context: the merge alone against a plain softmax, and the engine with
a workspace small enough to cut every context into many pieces against the engine without, in prefill
(whole and chunked), decode, ragged batches, prompt log-probabilities and MTP speculation."""

from __future__ import annotations

import pytest
import torch

from dsv3.infer import LLM, SamplingParams
from dsv3.infer.model_runner import attention_in_pieces

from conftest import random_model, tiny_config

MODES = {"plain": {}, "mtp": {"speculative": "mtp"}, "mtp-chain": {"speculative": "mtp", "num_speculative_tokens": 2}}


@pytest.mark.parametrize("piece", [1, 7, 16, 64, 1000])
def test_pieces_merged_by_log_sum_exp_equal_one_softmax(piece):
    g = torch.Generator().manual_seed(0)
    B, G, T, S, D, V = 2, 3, 5, 61, 12, 7
    q, k, v = (torch.randn(B, G, T, D, generator=g), torch.randn(B, G, S, D, generator=g),
               torch.randn(B, G, S, V, generator=g))
    q_pos = torch.tensor([[56, 57, 58, 59, 60], [10, 20, 30, 40, 50]])  # row 1: keys past 50 unseen by all
    mask = torch.arange(S) <= q_pos[:, None, :, None]  # (B, 1, T, S)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ v
    got = attention_in_pieces(q, lambda lo, hi: (k[:, :, lo:hi], v[:, :, lo:hi]),
                              lambda lo, hi: mask[..., lo:hi], S, piece, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(max_position_embeddings=1024), std=0.2)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def close_logprobs(a, b):
    assert [x.token_id for x in a] == [y.token_id for y in b]
    torch.testing.assert_close(torch.tensor([x.logprob for x in a]), torch.tensor([y.logprob for y in b]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("chunk", [4096, 37])
def test_engine_in_pieces_equals_whole_context(model, mode, chunk):
    """A workspace of 1 byte gives pieces of 16 keys: contexts of up to ~400 positions take up to 25 pieces,
    in prefill (whole prompts, and chunks of 37 over cached context: the naive form over pieces) and decode
    (the absorbed form over pieces), ragged batches of both, and the MTP module's steps."""
    ps = prompts([300, 5, 123, 40, 211])
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    kw = dict(block_size=8, kv_cache_tokens=4096, max_num_seqs=3, max_num_batched_tokens=chunk,
              speculative_policy="always", **MODES[mode])
    whole = LLM(model, **kw)
    pieces = LLM(model, attention_workspace=1, **kw)
    assert pieces.runner.piece(model.layers[0].attn, 1, 1, True) == 16
    for x, y in zip(pieces.generate(ps, greedy), whole.generate(ps, greedy)):
        assert x.token_ids == y.token_ids
        close_logprobs(x.logprobs, y.logprobs)
        close_logprobs(x.prompt_logprobs[1:], y.prompt_logprobs[1:])


def test_sampling_in_pieces_draws_the_same_tokens(model):
    ps = prompts([250, 90], seed=1)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=16, seed=3, ignore_eos=True)
    kw = dict(block_size=8, kv_cache_tokens=2048, max_num_batched_tokens=64)
    a = LLM(model, attention_workspace=1, **kw).generate(ps, params)
    b = LLM(model, **kw).generate(ps, params)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


# ---- `dsv3 train --rope-scaling yarn`: the extension stage ------------------------------------------------

def test_train_extends_a_run_with_yarn_and_transformers_reads_it(tmp_path, corpus_file):
    import json

    from dsv3 import ModelConfig, load_pretrained
    from dsv3.cli import main as cli

    base, ext = tmp_path / "base", tmp_path / "ext"
    common = ["--data", corpus_file, "--steps", "2", "--eval-batches", "1", "--no-plots", "--precision", "fp32",
              "--batch-size", "2"]
    assert cli(["train", "--preset", "micro", "--out", str(base), "--seq-len", "32"] + common) == 0
    assert cli(["train", "--init-from", str(base), "--out", str(ext), "--seq-len", "128", "--rope-scaling", "yarn",
                "--rope-factor", "8", "--lr-schedule", "constant", "--lr", "1e-4"] + common) == 0
    hf = json.loads((ext / "config.json").read_text())
    assert hf["rope_scaling"] == {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert hf["max_position_embeddings"] == 512  # max(the model's 512, 8 x 32)
    config = ModelConfig.from_hf(ext)
    assert config.rope_type == "yarn" and config.original_max_position_embeddings == 32
    lrs = [json.loads(line)["lr"] for line in (ext / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(1e-4)
    transformers = pytest.importorskip("transformers")
    t_config = transformers.AutoConfig.from_pretrained(ext)
    scaling = getattr(t_config, "rope_scaling", None) or getattr(t_config, "rope_parameters", None)
    assert scaling["factor"] == 8.0 and scaling["original_max_position_embeddings"] == 32
    # the next stage from the extended model keeps its scaling (and its original length)
    from dsv3.train.trainer import rope_scaling_of, trained_length
    assert trained_length(str(ext)) == 32
    assert rope_scaling_of("yarn", 16, None, str(ext))["original_max_position_embeddings"] == 32
    model = load_pretrained(ext)
    assert model.config.rope_factor == 8.0


@pytest.mark.parametrize("argv, message", [
    (["--rope-scaling", "yarn"], "needs --rope-factor"),
    (["--rope-factor", "4"], "go with --rope-scaling yarn"),
    (["--rope-scaling", "{bad", "--init-from", "x"], "expected 'yarn' or a JSON object"),
    (["--rope-scaling", "yarn", "--rope-factor", "4"], "needs --original-max-position-embeddings"),
])
def test_bad_extension_options_are_named(argv, message):
    import argparse

    from dsv3.train.train import add_args
    from dsv3.train.trainer import TrainConfig
    p = argparse.ArgumentParser()
    add_args(p)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_args(p.parse_args(["--out", "x"] + argv))
