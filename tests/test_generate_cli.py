"""`dsv3 generate`: batch (--input-file, --prompt) and interactive chat, on BF16 and FP8 checkpoints."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.infer import LLM, SamplingParams
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def model_dir(request, tmp_path_factory):
    tok = train_bpe(["the cat sat on the mat. the dog ate the bone! hello world " * 20], vocab_size=300)
    model = random_model(tiny_config(vocab_size=tok.vocab_size), std=0.2)
    d = tmp_path_factory.mktemp(request.param)
    dsv3.save_pretrained(model, d, dtype=torch.bfloat16, fp8=request.param == "fp8", tokenizer=tok)
    return d


def test_batch_from_file_in_order(model_dir, tmp_path, capsys):
    prompts = ["hello", "the cat sat", "the dog"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    out_file = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(model_dir), "--input-file", str(f), "--temperature", "0",
               "--max-new-tokens", "6", "--output-file", str(out_file), "--enforce-eager"])
    assert rc == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    # the same as the engine gives for each chat-formatted prompt alone
    llm = LLM(model_dir, kv_cache_tokens=512)
    for r in rows:
        ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True)
        alone = llm.generate([ids], SamplingParams(temperature=0, max_new_tokens=6))[0]
        assert r["token_ids"] == alone.token_ids and r["text"] == alone.text
        assert f"Prompt: {r['prompt']}\nCompletion: {r['text']}\n" in stdout
    assert stdout.index("Prompt: hello") < stdout.index("Prompt: the cat sat") < stdout.index("Prompt: the dog")


def test_interactive_chat_keeps_history_and_clears(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nthe cat\n/clear\nthe dog\n/exit\n"))
    rc = main(["generate", "--model", str(model_dir), "--interactive", "--temperature", "0",
               "--max-new-tokens", "5", "--speculative", "mtp", "--speculative-topk", "2",
               "--speculative-policy", "always"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "history cleared" in captured.err
    replies = [r for r in captured.out.split(">>> ") if r.strip()]
    assert len(replies) == 3
    # the second turn saw the first (history), the third did not (cleared): compare with the engine directly
    llm = LLM(model_dir, kv_cache_tokens=512)
    tok = llm.tokenizer
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    first = llm.generate([tok.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=True)],
                         greedy)[0].text
    second = llm.generate([tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
         {"role": "user", "content": "the cat"}], tokenize=True)], greedy)[0].text
    third = llm.generate([tok.apply_chat_template([{"role": "user", "content": "the dog"}], tokenize=True)],
                         greedy)[0].text
    assert [r.rstrip("\n") for r in replies] == [first, second, third]


def test_interactive_reports_overlong_conversation_and_goes_on(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("cat " * 200 + "\nhi\n"))  # then EOF ends the session
    rc = main(["generate", "--model", str(model_dir), "-i", "--max-model-len", "64", "--max-new-tokens", "3"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "but the context is 64" in captured.err
    assert len([r for r in captured.out.split(">>> ") if r.strip()]) == 1  # "hi" was still answered


def test_generate_subprocess_prompt(model_dir):
    r = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--model", str(model_dir), "--prompt", "hello",
                        "--max-new-tokens", "4", "--seed", "1", "--speculative", "mtp",
                        "--num-speculative-tokens", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Prompt: hello\nCompletion: ") and "tokens/s" in r.stderr


def test_generate_errors(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
