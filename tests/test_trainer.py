"""The Trainer's seams: expert loads and balance losses returned by the forward (RoutingStats), runs started
from a model directory (--init-from), and --precision. The loop's own behaviour (resume to the bit, metrics,
refusals) is held by test_train.py."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.data.dataset import PackedSequences
from dsv3.model import RoutingStats, moe_layers
from dsv3.model.moe import balance_loss
from dsv3.train import trainer as trainer_mod
from dsv3.train.metrics import read_metrics
from dsv3.train.train import add_args, main
from dsv3.train.trainer import TrainConfig

from conftest import random_model, rel_err, tiny_config


# ---- RoutingStats: loads and balance losses, returned ----------------------------------------------------------

def _gate_records(model):
    """Hooks on every MoE gate: what it chose, call by call (the reference the collector is held to)."""
    calls = {m: [] for m in moe_layers(model)}
    handles = [m.gate.register_forward_hook(lambda mod, inp, out, m=m: calls[m].append(out)) for m in calls]
    return calls, handles


@pytest.mark.parametrize("kind", ["sequence", "batch"])
def test_stats_hold_the_gates_choice_and_the_balance_loss(kind):
    model = random_model(tiny_config()).train()
    x = torch.randint(0, 300, (3, 17))
    calls, handles = _gate_records(model)
    stats = RoutingStats(kind)
    logits, mtp_logits = model.forward_with_mtp(x, stats=stats)
    for h in handles:
        h.remove()
    layers = moe_layers(model)
    assert len(layers) == 3  # two main MoE blocks and the MTP block's
    want_loads, want_loss = [], 0
    for m in layers:
        (weights, experts, scores), = calls[m]
        want_loads.append(torch.bincount(experts.flatten(), minlength=8))
        B = 1 if kind == "batch" else 3
        want_loss = want_loss + balance_loss(scores.view(B, -1, 8), experts.view(B, -1, 3), 8)
    assert torch.equal(stats.loads(layers), torch.stack(want_loads))
    assert stats.loads(layers).sum(-1).tolist() == [3 * 17 * 3, 3 * 17 * 3, 3 * 16 * 3]  # K per token
    # the same float32 ops on the same tensors, summed in another order: reassociation
    assert stats.balance_loss_sum().item() == pytest.approx(want_loss.item(), rel=1e-6)
    # without a collector: the same logits (the same ops: a collector only reads the gate's outputs)
    assert torch.equal(model.forward_with_mtp(x)[0], logits)
    assert RoutingStats().balance_loss_sum() is None


def test_stats_leave_out_what_did_not_run_and_refuse_unknown_kinds():
    model = random_model(tiny_config())
    stats = RoutingStats()
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 9)), stats=stats)  # the main model only: the MTP block routes nothing
    loads = stats.loads(moe_layers(model))
    assert loads[:2].sum(-1).tolist() == [2 * 9 * 3] * 2 and loads[2].sum() == 0
    assert stats.balance_loss_sum() is None  # none asked for
    with pytest.raises(ValueError, match="balance_loss='seq'"):
        RoutingStats("seq")


def test_recompute_does_not_count_twice():
    """With model.recompute each block runs again in backward; its second record is dropped: loads and the
    balance loss are those of one forward, and the gradients equal the plain forward's."""
    x = torch.randint(0, 300, (2, 13))
    results = []
    for recompute in (False, True):
        model = random_model(tiny_config()).train()
        model.recompute = recompute
        calls, handles = _gate_records(model)
        stats = RoutingStats("sequence")
        logits, mtp_logits = model.forward_with_mtp(x, stats=stats)
        loss = logits.square().mean() + mtp_logits[0].square().mean() + stats.balance_loss_sum()
        loss.backward()
        for h in handles:
            h.remove()
        gate_calls = sum(len(c) for c in calls.values())
        results.append((stats.loads(moe_layers(model)), stats.balance_loss_sum().detach(), gate_calls,
                        [p.grad.clone() for p in model.parameters()]))
    (loads0, bal0, calls0, grads0), (loads1, bal1, calls1, grads1) = results
    assert calls0 == 3 and calls1 == 6  # the recomputation ran every gate again ...
    assert torch.equal(loads0, loads1) and torch.equal(bal0, bal1)  # ... and counted nothing twice
    for g0, g1 in zip(grads0, grads1):  # the same ops replayed: equal up to float32 reassociation
        assert rel_err(g1, g0) <= 1e-5


# ---- TrainConfig and --precision ---------------------------------------------------------------------------

def _parse(argv):
    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args(argv)


def test_config_from_the_command_line():
    c = TrainConfig.from_args(_parse(["--out", "x"]))
    assert c.preset == "tiny" and c.precision == "auto" and c.init_from is None
    d = c.with_defaults()
    assert (d.seq_len, d.batch_size, d.micro_batch_size, d.lr, d.alpha) == (256, 16, 16, 2e-3, 1e-4)
    for autocast, precision in (("auto", "auto"), ("bf16", "bf16"), ("off", "fp32")):  # the deprecated alias
        assert TrainConfig.from_args(_parse(["--out", "x", "--autocast", autocast])).precision == precision
    assert TrainConfig.from_args(_parse(["--out", "x", "--autocast", "off", "--precision", "fp32"])).precision == "fp32"
    with pytest.raises(ValueError, match="contradicts --precision bf16"):
        TrainConfig.from_args(_parse(["--out", "x", "--autocast", "off", "--precision", "bf16"]))
    with pytest.raises(ValueError, match="leave out --preset"):
        TrainConfig.from_args(_parse(["--out", "x", "--init-from", "m", "--preset", "micro"]))
    c = TrainConfig.from_args(_parse(["--out", "x", "--init-from", "m", "--rope-scaling", '{"type": "yarn", "factor": 2}']))
    assert c.preset is None and c.rope_scaling == {"type": "yarn", "factor": 2}
    assert c.with_defaults(max_positions=512).seq_len == 512  # at most the model's context, unless told
    with pytest.raises(ValueError, match="expected 'yarn' or a JSON object"):
        TrainConfig.from_args(_parse(["--out", "x", "--rope-scaling", "{yarn"]))
    with pytest.raises(ValueError, match="multiple of --micro-batch-size"):
        TrainConfig(out="x", batch_size=8, micro_batch_size=3).with_defaults()


def test_fp8_without_its_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dsv3.quant.training", None)  # as an installation without it
    with pytest.raises(RuntimeError, match="--precision fp8 needs dsv3.quant.training"):
        trainer_mod.convert_to_fp8(random_model(tiny_config()))


# ---- whole runs ----------------------------------------------------------------------------------------------

def micro(out, data, steps, *extra):
    return _parse(["--preset", "micro", "--out", str(out), "--data", data, "--steps", str(steps), "--save-every",
                   "2", "--eval-every", "4", "--eval-batches", "2", "--no-plots", "--precision", "fp32", *extra])


def from_dir(src, out, data, steps, *extra):
    """A run from `src` with the micro run's shape of batches (the defaults for another model differ)."""
    return _parse(["--init-from", str(src), "--out", str(out), "--data", data, "--steps", str(steps),
                   "--seq-len", "64", "--batch-size", "8", "--save-every", "2", "--eval-every", "4",
                   "--eval-batches", "2", "--no-plots", "--precision", "fp32", *extra])


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("src") / "run"
    main(micro(out, corpus_file, 8))
    return out


def first_batch_loss(model_dir, corpus_run):
    """The next-token loss of model_dir's model on the first training batch of corpus_run (seed 0)."""
    import numpy as np
    model = dsv3.load_pretrained(model_dir, dtype=torch.float32)
    data = PackedSequences(np.load(os.path.join(corpus_run, "data", "train.npy")), 64, seed=0)
    b = data.batch(0, 8)
    with torch.no_grad():
        return F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).item()


def test_init_from_continues_the_source_runs_loss(source_run, corpus_file, tmp_path):
    """A new run from a finished run's directory starts where the source ended: its first step's loss is the
    source model's loss on that batch (the same weights and data), near the source's last loss and far below a
    fresh run's first; it keeps the MTP module and the balancing biases; it runs as a run of its own."""
    src_rows = read_metrics(os.path.join(source_run, "metrics.jsonl"))
    fresh_first, src_last = src_rows[0]["loss"], src_rows[-1]["loss"]
    out = tmp_path / "cont"
    main(from_dir(source_run, out, corpus_file, 2))
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]["loss"]
    # the step's loss is the model's loss on the batch, computed again here: the same float32 sums
    assert first == pytest.approx(first_batch_loss(source_run, out), rel=1e-5)
    gap = fresh_first - src_last
    assert gap > 0.3 and abs(first - src_last) < 0.25 * gap  # continues, not from scratch
    assert rows[0]["mtp_loss"] < src_rows[0]["mtp_loss"] - 0.5 * gap  # the MTP module came along too
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["args"]["init_from"] == str(source_run) and run_json["precision"] == "fp32"
    cont = dsv3.load_pretrained(out)
    assert cont.config.num_nextn_predict_layers == 1 and os.path.isfile(out / "tokenizer.json")
    # resumed, it reads its own checkpoint, not the source again (moved away here)
    moved = tmp_path / "moved"
    shutil.move(str(source_run), moved)
    try:
        main(from_dir(source_run, out, corpus_file, 4))
        assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]
        with pytest.raises(ValueError, match="init_from: was"):  # another source is another run
            main(from_dir(moved, out, corpus_file, 6))
    finally:
        shutil.move(str(moved), source_run)


def test_init_from_overrides_and_refusals(source_run, corpus_file, tmp_path):
    """Longer sequences raise the context, YaRN is read as config.json's rope_scaling, a deeper MTP adds
    initialised modules; fewer MTP modules than the source's, --preset, and --out = --init-from are refused."""
    out = tmp_path / "long"
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    main(_parse(["--init-from", str(source_run), "--out", str(out), "--data", corpus_file, "--steps", "1",
                 "--seq-len", "600", "--batch-size", "2", "--mtp-depth", "2", "--rope-scaling", json.dumps(yarn),
                 "--eval-batches", "1", "--no-plots", "--precision", "fp32"]))
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["num_nextn_predict_layers"] == 2  # factor x original
    assert config["rope_scaling"] == yarn
    model = dsv3.load_pretrained(out)
    src = dsv3.load_pretrained(source_run)
    assert model.config.rope_type == "yarn" and len(model.mtp) == 2
    assert rel_err(model.mtp[0].eh_proj.weight, src.mtp[0].eh_proj.weight) < 0.5  # the source's, one step on
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    with pytest.raises(ValueError, match="--mtp-depth 0: .* has 1 MTP module"):
        main(from_dir(source_run, tmp_path / "shallow", corpus_file, 1, "--mtp-depth", "0"))
    with pytest.raises(ValueError, match="leave out --preset"):
        main(from_dir(source_run, tmp_path / "p", corpus_file, 1, "--preset", "micro"))
    with pytest.raises(ValueError, match="same directory"):
        main(from_dir(source_run, source_run, corpus_file, 1))


def test_init_from_a_transformers_directory(source_run, corpus_file, tmp_path, quiet):
    """transformers' save_pretrained of the same model (no MTP weights there): the run starts from its
    weights, with the main model's loss of the source."""
    transformers = pytest.importorskip("transformers")
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_dir = tmp_path / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(source_run, dtype=torch.float32)
    hf.save_pretrained(hf_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source_run / f, hf_dir / f)
    out = tmp_path / "from-hf"
    main(from_dir(hf_dir, out, corpus_file, 1))
    first = read_metrics(os.path.join(out, "metrics.jsonl"))[0]["loss"]
    assert first == pytest.approx(first_batch_loss(source_run, out), rel=1e-5)


def test_init_from_an_fp8_checkpoint(source_run, corpus_file, tmp_path):
    """The official layout (e4m3 weights with 128x128 block scales): dequantised to float32 at load, trained
    from there, and written back without the quantization_config."""
    fp8_dir = tmp_path / "fp8"
    dsv3.save_pretrained(dsv3.load_pretrained(source_run), fp8_dir, fp8=True, tokenizer=str(source_run))
    assert "quantization_config" in json.loads((fp8_dir / "config.json").read_text())
    out = tmp_path / "from-fp8"
    main(from_dir(fp8_dir, out, corpus_file, 1))
    first = read_metrics(os.path.join(out, "metrics.jsonl"))[0]["loss"]
    assert first == pytest.approx(first_batch_loss(fp8_dir, out), rel=1e-5)  # the same dequantised weights
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_resume_keeps_its_precision_and_refuses_another(corpus_file, tmp_path):
    out = tmp_path / "bf16"
    base = ["--preset", "micro", "--out", str(out), "--data", corpus_file, "--save-every", "1", "--eval-every",
            "9", "--eval-batches", "1", "--no-plots"]
    main(_parse(base + ["--steps", "1", "--precision", "bf16"]))
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
    main(_parse(base + ["--steps", "2"]))  # auto: the run's own precision
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
    assert [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    for other in (["--precision", "fp32"], ["--autocast", "off"], ["--precision", "fp8"]):
        with pytest.raises(ValueError, match="precision: was 'bf16', now"):
            main(_parse(base + ["--steps", "3", *other]))
    main(_parse(base + ["--steps", "3", "--autocast", "bf16"]))  # the same precision through the old flag
    assert len(read_metrics(os.path.join(out, "metrics.jsonl"))) == 3
