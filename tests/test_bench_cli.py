"""`dsv3 bench`: runs on a model directory without a tokenizer, reports consistent figures, writes JSON with the
machine they came from, and refuses bad sizes. (Figures are checked for consistency, never against a time.)"""

from __future__ import annotations

import json

import pytest
import torch

import dsv3
from dsv3 import bench as bench_mod
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
    assert r["machine"]["torch"] == torch.__version__ and r["machine"]["torch_threads"] >= 1
    assert r["enable_prefix_caching"] and r["prefix_cache_hit_tokens"] == 0  # fresh prompts every run
    printed = capsys.readouterr().out
    assert "time to first token" in printed and "tokens/s" in printed
    assert printed.startswith("machine: ")


def test_throughput_with_speculation(model_dir, tmp_path, capsys):
    r = bench(model_dir, tmp_path, "throughput", "--num-prompts", "5", "--input-len", "7", "--output-len", "4",
              "--speculative", "mtp")
    assert r["mode"] == "throughput" and r["num_prompts"] == 5 and r["speculative"] == "mtp"
    assert r["machine"]["torch"] == torch.__version__ and r["prefix_cache_hit_tokens"] == 0
    assert r["output_tokens_per_s"] == pytest.approx(5 * 4 / r["seconds"])
    assert 0 <= r["acceptance_rate"] <= 1 and r["tokens_per_forward"] >= 1
    assert r["speculative_policy"] == "adaptive" and 0 <= r["drafting_fraction"] <= 1
    assert "MTP drafts accepted" in capsys.readouterr().out


def test_bad_sizes_are_refused(model_dir, capsys):
    assert main(["bench", "latency", "--model", str(model_dir), "--output-len", "0"]) == 2
    assert "--output-len must be at least 1" in capsys.readouterr().err


MACHINE_KEYS = {"cpu", "cpu_family", "cpu_model", "cpu_flags", "arch", "l3_cache_bytes", "logical_cpus",
                "torch_threads", "torch", "blas"}


def test_machine_info():
    info = bench_mod.machine_info()
    assert MACHINE_KEYS <= set(info)
    assert info["cpu"] and info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert set(info["cpu_flags"]) <= set(bench_mod.ISA_FLAGS) and "gpu" not in info  # no CUDA device asked for
    line = bench_mod.machine_line(info)
    assert line.startswith("machine: ") and info["cpu"] in line and f"torch {torch.__version__}" in line
    json.dumps(info)  # stored in the benchmarks' JSON as it is


def test_machine_info_without_lscpu(monkeypatch):
    """Where lscpu is missing, /proc/cpuinfo (or platform) names the CPU."""
    monkeypatch.setattr(bench_mod.shutil, "which", lambda name: None)
    bench_mod._cpu.cache_clear()
    try:
        info = bench_mod.machine_info()
    finally:
        bench_mod._cpu.cache_clear()
    assert MACHINE_KEYS <= set(info) and info["cpu"]
    assert bench_mod._size_bytes("32 MiB (1 instance)") == bench_mod._size_bytes("32768K") == 32 * 2 ** 20
    assert bench_mod._blas("... BLAS_INFO=mkl, ... Math Kernel Library Version 2024.2-Product") == "MKL 2024.2"
    assert bench_mod._blas("BLAS_INFO=open, LAPACK_INFO=open") == "OpenBLAS"
