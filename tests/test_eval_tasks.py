"""`dsv3 eval loss-by-position | mc | niah | passkey` (eval/positions.py, mc.py, niah.py): the arithmetic held to
the model's own forward, the prompts and the scoring to hand-made cases, and the command lines."""

from __future__ import annotations

import json

import pytest
import torch

import dsv3
from dsv3.cli import main as cli
from dsv3.eval import mc, niah, positions
from dsv3.eval.scoring import open_scorer
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n"
        "the grass is green. the sky is blue. 0123456789 ") * 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_bpe([TEXT * 4], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256), std=0.2)
    d = tmp_path_factory.mktemp("eval") / "model"
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": TEXT[i:] + TEXT[:i]}) + "\n" for i in range(0, 400, 50)))
    return f


def forward_logprobs(model_dir, seqs):
    model = dsv3.load_pretrained(model_dir)
    model.config = model.config.replace(max_position_embeddings=4096)
    x = torch.tensor(seqs)
    with torch.no_grad():
        lp = torch.log_softmax(model(x[:, :-1]).float(), -1)
    return lp.gather(-1, x[:, 1:, None])[..., 0]  # (B, L-1)


def test_loss_by_position_is_the_forwards_cross_entropy_past_the_configured_context(model_dir, docs_file, tmp_path):
    out, png = tmp_path / "pos.json", tmp_path / "pos.png"
    L = 300  # past the 256 the config names: --context admits it
    assert cli(["eval", "loss-by-position", "--model", str(model_dir), "--data", str(docs_file), "--max-length",
                str(L), "--bucket", "50", "--train-length", "100", "--plot", str(png), "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    m = r["models"][0]
    scorer = open_scorer(model=str(model_dir), context=L)
    texts = [json.loads(line)["text"] for line in docs_file.read_text().splitlines()]
    windows = positions.windows_of(texts, scorer.encode, scorer.bos_token_id, scorer.eos_token_id, L, None)
    assert r["windows"] == len(windows) >= 2 and all(len(w) == L for w in windows)
    want = -forward_logprobs(model_dir, windows).mean(0)
    torch.testing.assert_close(torch.tensor(m["loss_by_position"]), want, rtol=1e-5, atol=1e-5)
    assert m["bucket_start"] == [1, 51, 101, 151, 201, 251]
    assert m["bucket_loss"][0] == pytest.approx(want[:50].mean().item(), rel=1e-5)
    assert m["loss_at_train_length"] == pytest.approx(want[:99].mean().item(), rel=1e-5)
    assert m["last_bucket_over_train_length"] == pytest.approx(m["bucket_loss"][-1] / m["loss_at_train_length"])
    assert png.stat().st_size > 1000


def test_mc_sums_the_continuations_logprobs_as_lm_eval(model_dir, tmp_path):
    records = [{"context": "def add(a, b):\n    return", "choices": [" a + b", " a * b * b"], "gold": 0},
               {"query": "the grass is ", "choices": ["green.", "blue!", "yellow"], "label": 2}]
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "mc.json"
    assert cli(["eval", "mc", "--model", str(model_dir), "--data", str(f), "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    scorer = open_scorer(model=str(model_dir))
    acc, acc_norm, all_lls = [], [], []
    for rec in records:
        context = rec.get("context", rec.get("query"))
        gold = rec.get("gold", rec.get("label"))
        lls = []
        for c in rec["choices"]:
            ctx, cont = mc.continuation_split(scorer, context, c)
            assert scorer.encode(context.rstrip(" ")) == ctx[1:]  # BOS, then the context (trailing space moved)
            lp = forward_logprobs(model_dir, [ctx + cont])[0]
            lls.append(lp[len(ctx) - 1:].sum().item())
        all_lls.append(lls)
        norm = [x / len(c.encode()) for x, c in zip(lls, rec["choices"])]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == gold))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == gold))
    assert r["acc"] == sum(acc) / 2 and r["acc_norm"] == sum(acc_norm) / 2 and r["records"] == 2
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    for got, want in zip(r["loglikelihoods"], all_lls):
        assert got == pytest.approx(want, rel=1e-5)


class Oracle:
    """A stub scorer that reads the needle's value from its prompt (right) or answers a fixed number (wrong)."""

    def __init__(self, tok, right: bool):
        self.tok, self.right = tok, right
        self.max_length, self.bos_token_id, self.eos_token_id = 10_000, tok.bos_token_id, tok.eos_token_id

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        return self.tok.decode(ids)

    def value(self, ids):
        import re
        return re.search(r"PASS_KEY = (\d{5})", self.decode(ids)).group(1)

    def greedy(self, prompts, max_new_tokens, desc=""):
        return [f" {self.value(p)}\n" if self.right else " 12345\n" for p in prompts]

    def logprobs(self, seqs, desc=""):  # the key after the question is likeliest when it is the needle's (right)
        out = []
        for s in seqs:
            good = self.right and self.decode(s).rstrip().endswith(self.value(s))
            out.append([0.0] * (len(s) - 2) + [0.0 if good else -1.0])
        return out


@pytest.mark.parametrize("right", [True, False])
def test_niah_places_the_needle_at_its_depth_and_scores_exact_retrieval(model_dir, right):
    from dsv3.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    scorer = Oracle(tok, right)
    depths = [0, 0.5, 1]
    r = niah.run(scorer, "passkey", "code", [120, 200], depths, 2, 0, TEXT * 20, choices=4)
    assert len(r["cases"]) == 12
    want = 1.0 if right else 0.0
    assert r["accuracy"] == want and r["choice_accuracy"] == want
    assert r["accuracy_by_depth_length"] == [[want, want]] * 3
    hay = tok.encode(TEXT * 20)
    newline_ids = {i for i in set(hay) if "\n" in tok.decode([i])}
    for c in r["cases"]:  # the needle starts at its depth's line break, within 64 tokens
        n = c["length"] - 1 - len(tok.encode(niah.FORMATS[("passkey", "code")][0].format(value=c["value"])))
        n -= len(tok.encode(niah.FORMATS[("passkey", "code")][1]))
        assert abs((c["needle_at"] - 1) - c["depth"] * n) <= 64
    prompt, at = niah.build_prompt(hay, 0, 100, 0.5, [7, 7], [9], tok.bos_token_id, newline_ids)
    assert len(prompt) == 100 and prompt[at:at + 2] == [7, 7] and prompt[-1] == 9 and prompt[0] == tok.bos_token_id
    assert at == 1 or prompt[at - 1] in newline_ids


def test_niah_and_passkey_commands_write_json_and_heatmap(model_dir, tmp_path):
    out, png = tmp_path / "niah.json", tmp_path / "niah.png"
    assert cli(["eval", "passkey", "--model", str(model_dir), "--lengths", "100,300", "--depths", "0,1",
                "--samples", "1", "--choices", "3", "--format", "code", "--plot", str(png), "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["lengths"] == [100, 300] and len(r["cases"]) == 4 and 0 <= r["accuracy"] <= 1 and r["choices"] == 3
    assert png.stat().st_size > 1000
    assert niah.first_number(" the key is 04213, not 5") == "04213" and niah.first_number("none") is None


@pytest.mark.parametrize("argv, message", [
    (["eval", "niah", "--lengths", "64", "--depths", "1.5"], "fractions in"),
    (["eval", "niah", "--lengths", "4"], "at least 8"),
    (["eval", "loss-by-position", "--max-length", "5000", "--data", "{docs}"], "fewer than"),
    (["eval", "mc", "--data", "{mc}"], "gold"),
])
def test_bad_input_is_named(model_dir, docs_file, tmp_path, capsys, argv, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "gold": 5}) + "\n")
    argv = [a.replace("{mc}", str(f)).replace("{docs}", str(docs_file)) for a in argv] + ["--model", str(model_dir)]
    assert cli(argv) == 2
    assert message in capsys.readouterr().err
