"""What the benchmarks share: the line naming the machine that every script prints first (and stores in its
JSON), and bench-small's weights (seeded, random), saved once to a temporary model directory that both dsv3
and transformers load, and removed when the process exits."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.bench import machine_info, machine_line  # noqa: E402


def print_machine(device=None) -> dict:
    """Print the machine a figure comes from (CPU model and ISA flags, threads, torch and its BLAS, the GPU when
    `device` is a CUDA one) -> dsv3.bench.machine_info(), for the script's JSON. Call it after setting the
    thread count."""
    info = machine_info(device)
    print(machine_line(info), flush=True)
    return info


def bench_small_checkpoint(prefix: str, **overrides) -> tuple[dsv3.ModelConfig, str]:
    """-> (the config, a model directory of bench-small in float32), overrides replacing config fields
    (a longer context, no MTP module...). Seed 0, init std 0.02: every benchmark sees the same weights."""
    cfg = dsv3.ModelConfig.preset("bench-small")
    if overrides:
        cfg = cfg.replace(**overrides)
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg)
    dsv3.init_weights(model, std=0.02)
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # the weights are ~140 MB
    dsv3.save_pretrained(model, path, dtype=torch.float32)
    return cfg, path
