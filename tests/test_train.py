"""Pretraining: the recipe's pieces against their definitions, and whole runs of the micro preset: the loss
falls, the run directory is a model directory transformers reads, and a run killed at any moment and
started again ends exactly as one never interrupted."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dsv3
from dsv3.ckpt.state import list_checkpoints
from dsv3.data.corpus import Document, builtin_corpus, load_corpus, split
from dsv3.data.dataset import PackedSequences, tokenize, unigram_entropy
from dsv3.model.moe import balance_loss
from dsv3.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE, train_bpe
from dsv3.train import balance
from dsv3.train.metrics import read_metrics
from dsv3.train.optim import AdamW
from dsv3.train.schedules import gamma_at, lr_at, mtp_lambda_at

from conftest import rel_err


# ---- the recipe's pieces -----------------------------------------------------------------------------------

def test_lr_schedule():
    total, peak, warm = 1000, 1e-3, 50
    lrs = [lr_at(s, total, peak, warm) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)  # linear warmup
    assert all(v == peak for v in lrs[warm:675])  # constant for the first 10/14.8 of the run
    cos = lrs[676:966]
    assert all(a >= b for a, b in zip(cos, cos[1:])) and cos[0] < peak and cos[-1] > peak * 0.1  # cosine down
    assert lrs[970] == pytest.approx(peak * 0.1) and lrs[-1] == pytest.approx(peak * 7.3e-6 / 2.2e-4)


def test_gamma_and_lambda_schedules():
    assert gamma_at(0, 100, 0.001) == 0.001 and gamma_at(96, 100, 0.001) == 0.001
    assert gamma_at(97, 100, 0.001) == 0.0  # the last 0.5T of 14.8T tokens: no bias updates
    assert mtp_lambda_at(0, 300) == 0.3 and mtp_lambda_at(200, 300) == 0.3 and mtp_lambda_at(203, 300) == 0.1


def test_bias_update_moves_towards_balance():
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.preset("micro"))
    dsv3.init_weights(model)
    balance.configure(model, "aux-free", 1e-4)
    moes = balance.moe_layers(model)
    loads = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5]] * len(moes))
    balance.update_bias(model, loads, 0.01)
    b = moes[0].gate.bias
    assert b[0] == pytest.approx(-0.01) and b[1] == pytest.approx(0.01) and b[2] == pytest.approx(0.0)
    assert balance.maxvio(loads)[0].item() == pytest.approx((10 - 5) / 5)
    mv = balance.maxvio(torch.tensor([[4, 4, 4, 4], [0, 0, 0, 0], [8, 0, 0, 0]]))
    assert mv[0] == 0 and mv[1].isnan() and mv[2] == 3 and mv.nanmean() == 1.5  # an idle layer is left out


def test_sequence_wise_balance_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    B, T, E, K = 3, 7, 8, 2
    scores = torch.rand(B, T, E, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    want = 0.0
    for b in range(B):  # eqs. 17-20, sequence by sequence
        f = torch.zeros(E)
        for t in range(T):
            for e in experts[b, t]:
                f[e] += E / (K * T)
        P = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        want += (f * P).sum() / B
    # the same float32 sums in another order (vectorised vs the loops above): reassociation, 1e-5
    assert balance_loss(scores, experts, E).item() == pytest.approx(want.item(), rel=1e-5)
    # perfectly balanced routing with uniform affinities gives the minimum, 1
    uni = torch.ones(1, 4, 4)
    assert balance_loss(uni, torch.tensor([[[0], [1], [2], [3]]]), 4).item() == pytest.approx(1.0)


def test_our_adamw_equals_torch_and_keeps_bf16_moments():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    oa = AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(3, 8)
        for m, o in ((a, oa), (b, ob)):
            m(x).square().sum().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    c = torch.nn.Linear(8, 4)
    oc = AdamW(c.parameters(), lr=1e-2, moment_dtype=torch.bfloat16)
    c(torch.randn(3, 8)).sum().backward()
    oc.step()
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in oc.state.values())
    oc2 = AdamW(c.parameters(), lr=1e-2, moment_dtype=torch.bfloat16)
    oc2.load_state_dict(oc.state_dict())
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in oc2.state.values())



def test_fused_adamw_where_the_device_has_it():
    from dsv3.train.optim import build_optimizer
    opt = build_optimizer(torch.nn.Linear(8, 4), lr=1e-3)
    assert opt.defaults["fused"] is True  # CPUs (and CUDA) have torch's fused AdamW
    assert isinstance(build_optimizer(torch.nn.Linear(8, 4), lr=1e-3, bf16_moments=True), AdamW)


def test_bf16_autocast_choice(monkeypatch):
    """--autocast auto follows the measurement on a CPU, and a resumed run keeps the choice it made."""
    from dsv3.train import cpu
    from dsv3.train.train import bf16_autocast
    dev = torch.device("cpu")
    assert bf16_autocast("bf16", dev) and not bf16_autocast("off", dev, resumed=True)
    assert bf16_autocast("auto", dev, resumed=True) and not bf16_autocast("auto", dev, resumed=False)
    for pays in (True, False):
        monkeypatch.setattr(cpu, "bf16_autocast_pays", lambda pays=pays: (pays, 3.0 if pays else 0.5))
        assert bf16_autocast("auto", dev) is pays
    monkeypatch.undo()
    speedup = cpu.bf16_matmul_speedup(m=64, k=64, n=64, repeats=2)
    assert speedup > 0 and cpu.bf16_autocast_pays(min_speedup=float("inf"))[0] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_retain_freed_memory_reuses_pages():
    """After retain_freed_memory(), a large tensor freed and allocated again, step after step, reuses the
    process's pages (no page faults once the heap has grown); by default glibc hands blocks of 32 MiB and more
    back to the kernel, and each new one faults all its pages in. Run in a child process: the setting is
    process-wide."""
    code = """if True:
        import resource, torch
        from dsv3.train.cpu import retain_freed_memory
        applied = retain_freed_memory()
        def faults_of_a_fresh_tensor():
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = torch.ones(48 << 20 >> 2)  # 48 MiB, written through
            del t
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
        print(applied, *[faults_of_a_fresh_tensor() for _ in range(10)])"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    applied, *faults = r.stdout.split()
    if applied == "True":
        # the first rounds may still grow the heap (12,288 faults each time it grows by 48 MiB); then none
        assert all(int(f) < 1000 for f in faults[-3:]), faults


# ---- data ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tok():
    return train_bpe(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], vocab_size=300)


def test_fim_psm_form_and_packing(small_tok):
    docs = [Document(f"d{i}", f"def f{i}(x):\n    return x * {i}\n") for i in range(40)]
    ids = tokenize(docs, small_tok, fim_rate=0.5, seed=3)
    eos, fb, fh, fe = (small_tok.token_to_id(t) for t in (EOS, FIM_BEGIN, FIM_HOLE, FIM_END))
    pieces = np.split(ids, np.where(ids == eos)[0] + 1)[:-1]
    assert len(pieces) == 40  # BOS document EOS, every document
    n_fim = 0
    for doc, piece in zip(docs, pieces):
        assert piece[0] == small_tok.bos_token_id and piece[-1] == eos
        p = piece[1:-1].tolist()
        if p and p[0] == fb:
            n_fim += 1
            assert p.count(fh) == 1 and p.count(fe) == 1 and p.index(fh) < p.index(fe)
            pre, suf, mid = p[1:p.index(fh)], p[p.index(fh) + 1:p.index(fe)], p[p.index(fe) + 1:]
            assert small_tok.decode(pre) + small_tok.decode(mid) + small_tok.decode(suf) == doc.text
        else:
            assert small_tok.decode(p) == doc.text
    assert 10 <= n_fim <= 30
    assert np.array_equal(ids, tokenize(docs, small_tok, fim_rate=0.5, seed=3))  # deterministic


def test_packed_sequences_order_and_resume():
    tokens = np.arange(1001, dtype=np.int32)
    data = PackedSequences(tokens, seq_len=10, seed=1)
    assert data.num_sequences == 100
    first_epoch = [int(data.sequence(i)[0]) // 10 for i in range(100)]
    assert sorted(first_epoch) == list(range(100)) and first_epoch != list(range(100))  # a permutation
    assert first_epoch != [int(data.sequence(100 + i)[0]) // 10 for i in range(100)]  # a new one next epoch
    seq = data.sequence(5)
    assert len(seq) == 11 and np.array_equal(seq, np.arange(seq[0], seq[0] + 11))  # inputs and targets
    again = PackedSequences(tokens, seq_len=10, seed=1)
    assert torch.equal(data.batch(37, 4), again.batch(37, 4))  # the position is the whole state


def test_corpus_sources(tmp_path):
    docs = builtin_corpus()
    assert len(docs) > 100 and all(d.name.endswith(".py") for d in docs)
    assert docs == sorted(docs, key=lambda d: d.name)
    train, val = split(docs)
    assert 0 < len(val) < len(docs) // 20 and not {d.name for d in train} & {d.name for d in val}
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [d.text for d in load_corpus(str(tmp_path))] == ["hello", "one", "two", "world"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line must be an object with a string 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    assert unigram_entropy(np.array([0, 1, 0, 1])) == pytest.approx(math.log(2))


# ---- whole runs --------------------------------------------------------------------------------------------

def train_cmd(out, data, steps=8, extra=()):
    return [sys.executable, "-m", "dsv3", "train", "--preset", "micro", "--out", str(out), "--data", data,
            "--steps", str(steps), "--save-every", "2", "--eval-every", "4", "--eval-batches", "2", "--no-plots",
            "--keep", "10", *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run_dir):
    return [(r["step"], r["loss"], r.get("mtp_loss"), r["grad_norm"], r["maxvio"]) for r in
            read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(train_cmd(out, corpus_file, steps=8))
    return out


def test_run_directory(reference_run):
    out = reference_run
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "maxvio", "expert_load"):
        assert all(key in r for r in rows), key
    assert len(rows[0]["expert_load"]) == 2  # one dense + one MoE layer, and the MTP block's MoE
    assert "val_loss" in rows[3] and "val_bpb" in rows[7] and "maxvio_global" in rows[7]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "run.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    model = dsv3.load_pretrained(out)  # the run directory is a model directory
    assert model.mtp and model.config.num_nextn_predict_layers == 1


def test_run_directory_loads_in_transformers(reference_run, quiet):
    transformers = pytest.importorskip("transformers")
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ours = dsv3.load_pretrained(reference_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(reference_run, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) <= 1e-5


def test_resume_after_kills_is_bit_identical(reference_run, corpus_file, tmp_path):
    """SIGKILL at random moments (mid-step, mid-checkpoint), then the same command: every step's loss,
    gradient norm and MaxVio equal the uninterrupted run's, and every checkpoint left behind loads."""
    out = tmp_path / "run"
    rng = random.Random(0)
    for attempt in range(3):
        p = subprocess.Popen(train_cmd(out, corpus_file, steps=8), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.time() + 120
        # wait for some progress past the previous attempt, then kill at a random moment
        while time.time() < deadline and p.poll() is None:
            done = len(read_metrics(os.path.join(out, "metrics.jsonl")))
            if done >= 2 * (attempt + 1):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        for step in list_checkpoints(str(out)):  # nothing left half-written
            d = out / "checkpoints" / f"step_{step:08d}"
            assert sorted(os.listdir(d)) == ["model.safetensors", "optimizer.safetensors", "state.json"]
            json.loads((d / "state.json").read_text())
    run(train_cmd(out, corpus_file, steps=8))
    assert losses(out) == losses(reference_run)
    ours, ref = dsv3.load_pretrained(out), dsv3.load_pretrained(reference_run)
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_refuses_other_options(reference_run, corpus_file, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    r = subprocess.run(train_cmd(out, corpus_file, steps=10, extra=["--seed", "5"]), capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "seed: was 0, now 5" in r.stderr


def test_finished_run_run_again_reports_its_result(reference_run, corpus_file, tmp_path):
    """The same command on a finished run trains nothing, leaves the log as it was, and still returns the
    final losses (what `make demo` prints the second time)."""
    import argparse
    import shutil
    from dsv3.train.train import add_args, main
    out = tmp_path / "again"
    shutil.copytree(reference_run, out)
    before = (out / "metrics.jsonl").read_text()
    p = argparse.ArgumentParser()
    add_args(p)
    summary = main(p.parse_args(train_cmd(out, corpus_file, steps=8)[4:]))
    assert (out / "metrics.jsonl").read_text() == before
    last = read_metrics(os.path.join(out, "metrics.jsonl"))[-1]
    assert summary["steps"] == 8 and summary["val_loss"] == last["val_loss"] and summary["loss"] == last["loss"]


def test_balance_modes_and_nonfinite_guard(corpus_file, tmp_path):
    from dsv3.train.train import add_args, main
    import argparse
    p = argparse.ArgumentParser()
    add_args(p)
    base = ["--preset", "micro", "--data", corpus_file, "--steps", "3", "--save-every", "3", "--eval-every", "3",
            "--eval-batches", "1", "--no-plots"]
    s_none = main(p.parse_args(base + ["--out", str(tmp_path / "none"), "--balance", "none"]))
    rows = read_metrics(str(tmp_path / "none" / "metrics.jsonl"))
    assert all(r["balance_loss"] == 0 for r in rows)
    assert torch.equal(dsv3.load_pretrained(tmp_path / "none").layers[1].ffn.gate.bias, torch.zeros(8))
    main(p.parse_args(base + ["--out", str(tmp_path / "af"), "--balance", "aux-free", "--gamma", "0.01"]))
    bias = dsv3.load_pretrained(tmp_path / "af").layers[1].ffn.gate.bias
    assert bias.abs().max() > 0  # moved, in whole steps of gamma (three updates: +-0.01, +-0.03, ...)
    assert torch.allclose((bias / 0.01).round() * 0.01, bias, atol=1e-6)
    rows = read_metrics(str(tmp_path / "af" / "metrics.jsonl"))
    assert all(r["balance_loss"] > 0 for r in rows)
    # a learning rate that blows up: steps with non-finite loss or gradients are skipped and reported
    s = main(p.parse_args(base + ["--out", str(tmp_path / "nan"), "--lr", "1e30", "--steps", "4"]))
    assert s_none["skipped_steps"] == 0 and s["skipped_steps"] >= 1


def test_a_run_stopped_before_its_export_exports_its_checkpoint(reference_run, corpus_file, tmp_path, monkeypatch):
    """Stopped between its last checkpoint and that checkpoint's export (the run directory's model left at an
    earlier step), the same command exports the checkpoint; what a killed run left half-written (ours only) is
    removed, nothing else."""
    import argparse
    import shutil
    from dsv3.ckpt.state import exported_step
    from dsv3.train import train as train_mod
    out = tmp_path / "stopped"
    shutil.copytree(reference_run, out)
    assert exported_step(str(out)) == 8
    # the model there is step 6's, and the record says so (as a kill after checkpoint 8, before its export)
    shutil.copy(out / "checkpoints" / "step_00000006" / "model.safetensors", out / "model.safetensors")
    (out / "checkpoints" / "exported.json").write_text('{"step": 6}')
    # left by kills: a checkpoint's temp dir, a replaced checkpoint, an atomic write's and a staged shard's files
    (out / "checkpoints" / ".step_00000010.ab12cd34").mkdir()
    (out / "checkpoints" / "step_00000004.old").mkdir()
    (out / ".config.json.ab12cd34.tmp").write_text("{")
    (out / ".model.safetensors.staged").write_bytes(b"\0")
    (out / "notes.tmp").write_text("mine")  # not ours: stays
    (out / "checkpoints" / "mine").mkdir()
    p = argparse.ArgumentParser()
    train_mod.add_args(p)
    summary = train_mod.main(p.parse_args(train_cmd(out, corpus_file, steps=8)[4:]))
    assert summary["steps"] == 8 and exported_step(str(out)) == 8
    assert_exported(out, 8)
    left = set(os.listdir(out)) | {f"checkpoints/{d}" for d in os.listdir(out / "checkpoints")}
    assert not {".config.json.ab12cd34.tmp", ".model.safetensors.staged", "checkpoints/.step_00000010.ab12cd34",
                "checkpoints/step_00000004.old"} & left
    assert {"notes.tmp", "checkpoints/mine"} <= left
    # and a run stopped right after its final checkpoint, before exporting it, exports it on the rerun
    out2 = tmp_path / "killed"
    real_export = train_mod._export

    def stop_at_8(model, run_dir, tok, step):
        if step == 8:
            raise KeyboardInterrupt  # as a kill between checkpoint 8 and its export
        real_export(model, run_dir, tok, step)
    monkeypatch.setattr(train_mod, "_export", stop_at_8)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(p.parse_args(train_cmd(out2, corpus_file, steps=8)[4:]))
    assert list_checkpoints(str(out2))[-1] == 8 and exported_step(str(out2)) == 6
    monkeypatch.setattr(train_mod, "_export", real_export)
    train_mod.main(p.parse_args(train_cmd(out2, corpus_file, steps=8)[4:]))
    assert exported_step(str(out2)) == 8
    assert_exported(out2, 8)


def assert_exported(run_dir, step):
    """The run directory's model holds exactly checkpoint `step`'s weights."""
    from dsv3.ckpt.io import SafetensorsFile
    exported = dsv3.load_pretrained(run_dir).state_dict()
    with SafetensorsFile(os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "model.safetensors")) as ckpt:
        assert set(exported) == set(ckpt.keys())
        for k, v in exported.items():
            assert torch.equal(v, ckpt.read(k)), k


def test_a_directory_that_is_not_a_run_is_refused_as_out(corpus_file, tmp_path):
    """--out on someone's model directory (or any non-empty folder that is not a run) is refused with its
    files untouched: the trainer would write its tokenizer and model over them."""
    out = tmp_path / "a-model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    r = subprocess.run(train_cmd(out, corpus_file, steps=2), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "not a dsv3 run directory" in r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"weights"
