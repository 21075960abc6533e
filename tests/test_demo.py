"""`make demo` end to end at a toy length: train, plot, complete with and without MTP, and run it again."""

from __future__ import annotations

import os

from dsv3 import demo


def test_demo_runs_end_to_end_and_again(tmp_path, capsys):
    out = str(tmp_path / "demo")
    demo.main(["--out", out, "--steps", "2", "--new-tokens", "4"])
    first = capsys.readouterr().out
    assert "final validation loss" in first and "unigram entropy" in first
    assert "identical greedy outputs:       True" in first
    for f in ("model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png", "maxvio.png", "expert_load.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    demo.main(["--out", out, "--steps", "2", "--new-tokens", "4"])  # finished: straight to generation
    again = capsys.readouterr().out
    assert "already trained 2 of 2 steps" in again
    loss_line = [line for line in first.splitlines() if "final validation loss" in line][0]
    assert loss_line.split("]")[1] == [line for line in again.splitlines() if "final validation loss" in line][0].split("]")[1]
