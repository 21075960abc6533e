"""`dsv3 bench`: runs on a model directory without a tokenizer, reports consistent figures, writes JSON, and
refuses bad sizes. (Figures are checked for consistency, never against a time.)"""

from __future__ import annotations

import json

import pytest
import torch

import dsv3
from dsv3.cli import main

from conftest import random_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "tiny"
    dsv3.save_pretrained(random_model(tiny_config()), d, dtype=torch.float32)
    return d


def bench(model_dir, tmp_path, *args) -> dict:
    """Run `dsv3 bench ARGS` on the tiny model; -> the figures it wrote as JSON."""
    out = tmp_path / "bench.json"
    assert main(["bench", *args, "--model", str(model_dir), "--json", str(out), "--device", "cpu"]) == 0
    return json.loads(out.read_text())


def test_latency(model_dir, tmp_path, capsys):
    r = bench(model_dir, tmp_path, "latency", "--batch-size", "2", "--input-len", "9", "--output-len", "5",
              "--iters", "2")
    assert (r["mode"], r["batch_size"], r["input_len"], r["output_len"]) == ("latency", 2, 9, 5)
    assert len(r["latency_s_all"]) == len(r["ttft_s_all"]) == 2
    assert 0 < r["ttft_s"] and 0 < r["latency_s"]
    assert r["end_to_end_tokens_per_s"] == pytest.approx(2 * 5 / r["latency_s"])
    assert r["kv_cache_bytes_per_token"] == 3 * (40 + 8) * 4  # layers x (kv_lora + rope) x fp32
    printed = capsys.readouterr().out
    assert "time to first token" in printed and "tokens/s" in printed


def test_throughput_with_speculation(model_dir, tmp_path, capsys):
    r = bench(model_dir, tmp_path, "throughput", "--num-prompts", "5", "--input-len", "7", "--output-len", "4",
              "--speculative", "mtp")
    assert r["mode"] == "throughput" and r["num_prompts"] == 5 and r["speculative"] == "mtp"
    assert r["output_tokens_per_s"] == pytest.approx(5 * 4 / r["seconds"])
    assert 0 <= r["acceptance_rate"] <= 1 and r["tokens_per_forward"] >= 1
    assert "MTP drafts accepted" in capsys.readouterr().out


def test_bad_sizes_are_refused(model_dir, capsys):
    assert main(["bench", "latency", "--model", str(model_dir), "--output-len", "0"]) == 2
    assert "--output-len must be at least 1" in capsys.readouterr().err
