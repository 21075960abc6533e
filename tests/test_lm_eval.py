"""lm-eval against `dsv3 serve`, and `dsv3 eval bpb` as lm-eval defines bits per byte (eval/bpb.py).

lm-eval's `local-completions` model with the remote tokenizer (the server's /tokenizer_info, /tokenize and
/detokenize; no tokenizer files on the client) scores a local JSONL task of `loglikelihood_rolling` against a
`dsv3 serve` process; its bits_per_byte must be `dsv3 eval bpb`'s, over the server and over the model directory.
The window arithmetic is held to lm-eval's own functions."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

import dsv3
from dsv3.cli import main as cli
from dsv3.eval.bpb import lm_eval_prefix_token, rolling_windows
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config

lm_eval = pytest.importorskip("lm_eval")
httpx = pytest.importorskip("httpx")
from lm_eval.models.api_models import TemplateAPI  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

MODEL = "tiny-v3"
CONTEXT = 64  # the server's context
MAX_LENGTH = 24  # lm-eval's max_length: windows of 23 tokens, 22 predicted each

TEXT = ("the cat sat on the mat. the dog ate the bone! hello world. "
        "def f(x):\n    return x * 2  # twice\n\n") * 8
DOCS = [
    "a",  # one token
    "the cat",
    TEXT[:150],
    TEXT,  # many windows
    "naïve café, 日本語 and emoji 🙂: multi-byte characters count as their UTF-8 bytes\n\tand   runs of space",
    TEXT[40:] + " the end",
]


# ---- the arithmetic, against lm-eval's own functions ----------------------------------------------------------

@pytest.mark.parametrize("max_length", [3, 4, 7, 24])
def test_rolling_windows_are_lm_evals(max_length):
    """TemplateAPI.loglikelihood_rolling's windows (max_seq_len = max_length - 2, context_len 1, made disjoint):
    the same sequences and context lengths for a document of 1 token, exactly a window, one more, 3 windows + 2."""
    L = max_length
    for n in sorted({1, 2, L - 2, L - 1, L, L + 1, 2 * L, 3 * L + 2, 7 * L + 5}):
        tokens = list(range(100, 100 + n))
        want = [(ctx + cont, len(ctx)) for ctx, cont in
                map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=L - 2,
                                                                    context_len=1))]
        got = rolling_windows(tokens, 7, L)
        assert got == want, (L, n)
        # every token predicted once, every request within max_length - 1 tokens
        assert [t for seq, c in got for t in seq[c:]] == tokens and max(len(s) for s, _ in got) <= L - 1
    assert rolling_windows([], 7, L) == []
    with pytest.raises(ValueError, match="max_length"):
        rolling_windows([1, 2], 7, 2)


def test_prefix_token_is_lm_evals():
    """lm-eval's local-completions starts documents from `bos_token_id or eos_token_id`: EOS when BOS is id 0."""
    for bos, eos in [(0, 1), (5, 1), (None, 1), (2, None)]:
        fake = types.SimpleNamespace(tokenizer=types.SimpleNamespace(bos_token_id=bos, eos_token_id=eos),
                                     tokenizer_backend="remote", custom_prefix_token_id=None)
        assert lm_eval_prefix_token(bos, eos) == TemplateAPI.prefix_token_id.func(fake), (bos, eos)
    with pytest.raises(ValueError, match="prefix-token"):
        lm_eval_prefix_token(None, None)


# ---- end to end ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model (float32) with a trained tokenizer whose tokenizer_config.json spells BOS and EOS as
    AddedToken objects, as DeepSeek-V3's release does."""
    tok = train_bpe([TEXT * 4], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT), std=0.2)
    d = tmp_path_factory.mktemp("lm-eval") / MODEL
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)
    config = json.loads((d / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False, "normalized": True,
                       "rstrip": False, "single_word": False}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    """`dsv3 serve` on a free port of 127.0.0.1 -> its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DSV3_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-model-len", str(CONTEXT), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "dsv3 serve did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return path


def test_tokenizer_info_names_special_tokens_as_strings(server, model_dir):
    """vLLM's /tokenizer_info writes AddedToken objects as their strings; lm-eval encodes `bos_token` and
    `eos_token` through /tokenize to find their ids."""
    info = httpx.get(server + "/tokenizer_info").json()
    tok = dsv3.LLM(model_dir, max_model_len=CONTEXT).tokenizer
    assert info["bos_token"] == "<｜begin▁of▁sentence｜>" and isinstance(info["eos_token"], str)
    for key in ("bos", "eos"):
        ids = httpx.post(server + "/tokenize", json={"prompt": info[f"{key}_token"], "add_special_tokens": False})
        assert ids.json()["tokens"] == [info[f"{key}_token_id"]] == [getattr(tok, f"{key}_token_id")]


def test_lm_eval_against_dsv3_serve_equals_dsv3_eval_bpb(server, model_dir, data, tmp_path, monkeypatch):
    """lm-eval's local-completions with the remote tokenizer, on a local rolling-loglikelihood task, reports
    the bits per byte (and perplexities) `dsv3 eval bpb` computes over the server and over the model directory."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # lm-eval's datasets cache: the test's own
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "dsv3_rolling.yaml").write_text(
        "task: dsv3_rolling\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        "doc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="local-completions",
                          model_args={"model": MODEL, "base_url": server + "/v1/completions",
                                      "tokenizer_backend": "remote", "max_length": MAX_LENGTH, "max_retries": 1},
                          tasks=["dsv3_rolling"], task_manager=TaskManager(include_path=str(tasks),
                                                                           include_defaults=False),
                          bootstrap_iters=0, log_samples=False)
    lm = out["results"]["dsv3_rolling"]
    lm = {k.split(",")[0]: v for k, v in lm.items() if "," in k and "stderr" not in k}
    assert set(lm) >= {"bits_per_byte", "byte_perplexity", "word_perplexity"}

    results = {}
    for source in (["--server", server], ["--model", str(model_dir)]):
        path = tmp_path / f"bpb{len(results)}.json"
        assert cli(["eval", "bpb", *source, "--data", str(data), "--max-length", str(MAX_LENGTH),
                    "--output", str(path)]) == 0
        results[source[0]] = json.loads(path.read_text())
    for name, r in results.items():
        for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
            assert r[metric] == pytest.approx(lm[metric], rel=1e-3), (name, metric)
    # the two agree far closer: the same engine and float32 weights, batched differently
    assert results["--model"]["bits_per_byte"] == pytest.approx(results["--server"]["bits_per_byte"], rel=1e-5)
    r = results["--server"]
    assert r["documents"] == len(DOCS) and r["bytes"] == sum(len(t.encode()) for t in DOCS)
    assert r["max_length"] == MAX_LENGTH and r["windows"] > len(DOCS) and r["prefix_token_id"] == 1  # EOS: BOS is 0
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / r["bytes"] / math.log(2), rel=1e-12)


def test_every_eval_gives_the_same_figures_over_the_server_and_the_model_directory(server, model_dir, data, tmp_path):
    """loss-by-position (the server's echo log-probabilities), niah (its greedy completions) and mc: the
    server and the engine in this process answer alike."""
    mc_file = tmp_path / "mc.jsonl"
    mc_file.write_text(json.dumps({"context": "the cat", "choices": [" sat", " ate the bone"], "gold": 0}) + "\n")
    runs = {"loss-by-position": ["--data", str(data), "--max-length", "20"],
            "niah": ["--lengths", "56", "--depths", "0,1", "--samples", "1", "--format", "code", "--haystack", str(data),
                     "--max-new-tokens", "4"],
            "mc": ["--data", str(mc_file)]}
    for task, argv in runs.items():
        got = {}
        for where in (["--server", server], ["--model", str(model_dir)]):
            out = tmp_path / f"{task}-{where[0][2:]}.json"
            assert cli(["eval", task, *where, *argv, "--output", str(out)]) == 0
            got[where[0]] = json.loads(out.read_text())
        a, b = got["--server"], got["--model"]
        if task == "loss-by-position":
            assert a["windows"] == b["windows"] >= 1
            assert a["models"][0]["loss_by_position"] == pytest.approx(b["models"][0]["loss_by_position"], rel=1e-5)
        elif task == "niah":
            assert [c["answer"] for c in a["cases"]] == [c["answer"] for c in b["cases"]]
        else:
            assert (a["acc"], a["acc_norm"], a["records"]) == (b["acc"], b["acc_norm"], b["records"])
            assert a["loglikelihoods"][0] == pytest.approx(b["loglikelihoods"][0], rel=1e-5)
