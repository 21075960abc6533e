"""`dsv3 eval bpb` and the evaluation the trainer shares with it (eval/bpb.py). lm-eval's own figures against
`dsv3 serve`: tests/test_lm_eval.py."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

import dsv3
from dsv3.cli import main as cli
from dsv3.data.corpus import builtin_corpus, split
from dsv3.data.dataset import PackedSequences
from dsv3.eval import bits_per_byte, next_token_loss
from dsv3.eval.bpb import lm_eval_prefix_token, rolling_windows
from dsv3.tokenizer import train_bpe
from dsv3.train.metrics import read_metrics
from dsv3.train.train import add_args, main as train

from conftest import random_model, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("run") / "run"
    p = argparse.ArgumentParser()
    add_args(p)
    train(p.parse_args(["--preset", "micro", "--out", str(out), "--data", corpus_file, "--steps", "3",
                        "--eval-batches", "2", "--no-plots", "--precision", "fp32"]))
    return out


def test_eval_bpb_matches_the_trainers_val_bpb(trained, corpus_file, tmp_path):
    """On the documents the run held out, with its sequence length and batches, `dsv3 eval bpb` reports the
    run's last val_loss and val_bpb: the same weights (exported in float32) and the same sums."""
    out = tmp_path / "bpb.json"
    assert cli(["eval", "bpb", "--model", str(trained), "--data", corpus_file, "--val-fraction", "0.02",
                "--seq-len", "64", "--batches", "2", "--batch-size", "8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    last = read_metrics(os.path.join(trained, "metrics.jsonl"))[-1]
    assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(last["val_bpb"], rel=1e-5)
    run = json.loads((trained / "run.json").read_text())
    val = PackedSequences(np.load(trained / "data" / "val.npy"), 64, seed=0)
    assert result["bytes"] == run["data"]["val_bytes"] and result["data_tokens"] == run["data"]["val_tokens"]
    assert result["tokens"] == min(16, val.num_sequences) * 64
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] / math.log(2) * result["data_tokens"] / result["bytes"], rel=1e-12)


def test_eval_bpb_defaults_and_errors(trained, tmp_path, capsys):
    """Without --data: the built-in corpus's validation split, as `dsv3 train` holds it out. A model directory
    without a tokenizer is refused before its weights load."""
    out = tmp_path / "bpb.json"
    assert cli(["eval", "bpb", "--model", str(trained), "--seq-len", "64", "--batches", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"bits_per_byte", "loss", "tokens", "bytes"}
    assert result["data"] == "python-stdlib" and result["documents"] == len(split(builtin_corpus(), 0.02)[1])
    assert result["tokens"] == 8 * 64 and 0 < result["bits_per_byte"] < 8
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((trained / "config.json").read_text())
    assert cli(["eval", "bpb", "--model", str(bare), "--output", str(tmp_path / "x.json")]) == 2
    assert "tokenizer" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_next_token_loss_is_the_mean_cross_entropy():
    model = random_model(tiny_config()).train()
    tokens = np.random.default_rng(0).integers(0, 300, size=5 * 16 + 1).astype(np.int32)
    data = PackedSequences(tokens, 16, seed=0, shuffle=False)
    r = next_token_loss(model, data, None, 2, "cpu", count_loads=True)  # batches of 2, 2, 1
    assert model.training  # put back as it was
    b = data.batch(0, 5)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model.eval()(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).item()
    assert (r.sequences, r.tokens) == (5, 80) and r.loss == pytest.approx(want, rel=1e-5)
    assert r.loads[:2].sum(-1).tolist() == [80 * 3] * 2 and r.loads[2].sum() == 0  # the MTP block did not run
    assert bits_per_byte(math.log(2), 0.25) == pytest.approx(0.25)


def test_eval_bpb_rolling_is_the_models_forward_over_lm_evals_windows(tmp_path, capsys):
    """The default mode: every document's tokens over lm-eval's rolling windows (tests/test_lm_eval.py holds them
    to lm-eval's), scored through the engine in batches, equal the model's own forward; --max-length past the
    context config.json names is admitted; the JSON goes to standard output, lm-eval's metric names."""
    text = "the cat sat on the mat. the dog ate the bone! hello world. " * 10
    tok = train_bpe([text], vocab_size=280)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=32))
    d = tmp_path / "m"
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)
    docs = ["x", text[:70], text, "naïve café 🙂\n\tdone"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    L = 48  # past the config's 32
    assert cli(["eval", "bpb", "--model", str(d), "--data", str(data), "--max-length", str(L),
                "--batch-size", "3"]) == 0
    result = json.loads(capsys.readouterr().out)

    prefix = lm_eval_prefix_token(tok.bos_token_id, tok.eos_token_id)
    assert prefix == tok.eos_token_id == result["prefix_token_id"]  # lm-eval's: BOS is id 0
    ll, windows = 0.0, 0
    model.config = model.config.replace(max_position_embeddings=L)  # RoPE is computed for any position
    with torch.no_grad():
        for t in docs:
            for seq, n_context in rolling_windows(tok.encode(t, add_special_tokens=False), prefix, L):
                lp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), -1)
                ll += lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][n_context - 1:].sum().item()
                windows += 1
    n_bytes = sum(len(t.encode()) for t in docs)
    assert result["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    words = sum(len(t.split()) + t[:1].isspace() + t[-1:].isspace() for t in docs)  # re.split(r"\s+")'s pieces
    assert result["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert (result["windows"], result["documents"], result["bytes"], result["max_length"]) == (windows, 4, n_bytes, L)
    assert windows > len(docs) and result["tokens"] == sum(len(tok.encode(t, add_special_tokens=False)) for t in docs)

    assert cli(["eval", "bpb", "--model", str(d), "--data", str(data), "--max-length", str(L),
                "--prefix-token", "bos", "--output", str(tmp_path / "bos.json")]) == 0
    assert json.loads((tmp_path / "bos.json").read_text())["prefix_token_id"] == tok.bos_token_id == 0


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "16", "--max-length", "16"], "give one"),
    (["--batches", "2"], "--batches applies to --seq-len"),
    (["--max-length", "2"], "max_length=2 must be >= 3"),
    (["--prefix-token", "beginning"], "--prefix-token 'beginning'"),
    (["--server", "http://127.0.0.1:9"], "not both"),
])
def test_eval_bpb_refuses_bad_options(tmp_path, capsys, args, message):
    tok = train_bpe(["the cat sat on the mat " * 10], vocab_size=270)
    d = tmp_path / "m"
    dsv3.save_pretrained(random_model(tiny_config(vocab_size=tok.vocab_size)), d, tokenizer=tok)
    data = tmp_path / "d.txt"
    data.write_text("the cat sat")
    assert cli(["eval", "bpb", "--model", str(d), "--data", str(data), *args]) == 2
    assert message in capsys.readouterr().err
