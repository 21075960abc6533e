"""The writer discipline of every model output (ckpt/output.py), through the commands that use it: an output
is the old model or the new one after a kill at any moment, never a mix; a directory that is not ours is
replaced only with --overwrite; files we did not write are never deleted; an output that is its input (or
inside it, or holds it) is refused."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import dsv3
from dsv3.ckpt.convert import fp8_cast, quantize_fp8
from dsv3.ckpt.output import RECORD, OutputError, model_output, read_record

from conftest import random_model, tiny_config

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two bf16 model directories with different weights (A, B)."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (1, 2):
        d = root / f"m{seed}"
        dsv3.save_pretrained(random_model(tiny_config(), seed=seed), d, dtype=torch.bfloat16)
        out.append(str(d))
    return out


def leftovers(parent) -> list[str]:
    """Hidden entries beside an output, but the writers' lock files."""
    return [d for d in os.listdir(parent) if d.startswith(".") and not d.endswith(".lock")]


def head(path) -> torch.Tensor:
    return dsv3.load_pretrained(path, dtype=torch.float32).head.weight.detach().clone()


def test_an_output_that_is_its_input_or_inside_it_is_refused(models, tmp_path):
    a = models[0]
    link = tmp_path / "link"
    link.symlink_to(a)
    for out in (a, a + "/./", str(link), os.path.join(a, "sub")):
        with pytest.raises(OutputError, match="the input"):
            quantize_fp8(a, out)
    with pytest.raises(OutputError, match="contains the input"):
        quantize_fp8(a, os.path.dirname(a))
    assert sorted(os.listdir(a)) == sorted(["config.json", "generation_config.json", "model.safetensors"])


def test_a_directory_not_ours_is_replaced_only_with_overwrite_and_its_other_files_stay(models, tmp_path):
    a, b = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"lora")  # a LoRA adapter
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")  # an old model's
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="not written by dsv3.*--overwrite"):
        quantize_fp8(a, out)
    assert sorted(os.listdir(out)) == ["adapter_model.safetensors", "config.json", "model-00001-of-00002.safetensors",
                                       "notes.txt"]
    quantize_fp8(a, out, overwrite=True)
    names = set(os.listdir(out))
    assert {"adapter_model.safetensors", "notes.txt", "model.safetensors", RECORD} <= names
    assert "model-00001-of-00002.safetensors" not in names  # the replaced model's weights go
    assert (out / "adapter_model.safetensors").read_bytes() == b"lora" and (out / "notes.txt").read_text() == "mine"
    assert read_record(out)["writer"] == "quantize-fp8"
    assert torch.allclose(head(out), head(a))
    # ours now: written again without --overwrite (another model), the user's files still there
    (out / "added_later.txt").write_text("x")
    fp8_cast(out, tmp_path / "bf16")
    quantize_fp8(b, out)
    assert torch.allclose(head(out), head(b)) and not torch.allclose(head(out), head(a))
    assert {"adapter_model.safetensors", "notes.txt", "added_later.txt"} <= set(os.listdir(out))
    # nothing of ours left beside it
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_output(models, tmp_path):
    a, _ = models
    out = tmp_path / "out"
    quantize_fp8(a, out)
    before = sorted(os.listdir(out))
    with pytest.raises(RuntimeError, match="disk full"):
        with model_output(out, inputs=[a]) as tmp:
            (open(os.path.join(tmp, "model.safetensors"), "wb")).write(b"half")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(out)) == before and torch.allclose(head(out), head(a))
    assert leftovers(tmp_path) == []


def test_kill_at_any_moment_leaves_the_old_model_or_the_new_one(models, tmp_path):
    """SIGKILL at random moments of `dsv3 quantize-fp8` over an existing output: it always loads, as model A
    (the old output) or model B (the new one), never a mix or nothing; the next run cleans up."""
    a, b = models
    out = tmp_path / "out"
    quantize_fp8(a, out)
    want = {"A": head(out)}
    quantize_fp8(b, tmp_path / "ref_b")
    want["B"] = head(tmp_path / "ref_b")
    cmd = [sys.executable, "-m", "dsv3", "quantize-fp8", "--input", b, "--output", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)  # how long a whole run takes here
    full = time.perf_counter() - t
    quantize_fp8(a, out)  # back to A
    rng = random.Random(0)
    seen = set()
    for i in range(10):
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.95) * full)
        p.send_signal(signal.SIGKILL)
        p.wait()
        got = head(out)
        which = [k for k, w in want.items() if torch.equal(got, w)]
        assert len(which) == 1, f"kill {i}: the output is neither model"
        seen.add(which[0])
        if which[0] == "B":
            quantize_fp8(a, out)
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    assert torch.equal(head(out), want["B"])
    assert leftovers(tmp_path) == []


def test_without_an_atomic_exchange_a_kill_between_the_renames_is_undone(models, tmp_path, monkeypatch):
    """Where the kernel has no RENAME_EXCHANGE the old output is renamed aside, then the new one in: a kill
    between the two leaves no output, and the next writer puts the old one back before it writes."""
    import dsv3.ckpt.output as output
    a, b = models
    out = tmp_path / "out"
    quantize_fp8(a, out)
    monkeypatch.setattr(output, "_exchange", lambda x, y: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new output's rename into place: the process dies here
            raise KeyboardInterrupt
        real_rename(src, dst)
    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        quantize_fp8(b, out)
    monkeypatch.setattr(output.os, "rename", real_rename)
    assert not out.exists() and any(d.startswith(".out.old.") for d in os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="stop"):
        with model_output(out, inputs=[a]) as tmp:  # the next writer puts A back first (then fails here)
            assert torch.allclose(head(out), head(a))
            raise RuntimeError("stop")
    assert torch.allclose(head(out), head(a)) and not os.path.exists(tmp)
    assert leftovers(tmp_path) == []


def test_convert_refuses_its_input_and_foreign_outputs_through_the_command_line(models, tmp_path, capsys):
    from dsv3.cli import main
    a, b = models
    assert main(["convert", "--input", a, "--output", a + "/./", "--dtype", "float32"]) == 2
    assert "is the input" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's")
    (out / "adapter_model.safetensors").write_bytes(b"lora")
    assert main(["convert", "--input", a, "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"someone else's"
    assert main(["convert", "--input", a, "--output", str(out), "--overwrite", "--dtype", "float32"]) == 0
    assert torch.allclose(head(out), head(a)) and (out / "adapter_model.safetensors").read_bytes() == b"lora"
    assert main(["convert", "--input", b, "--output", str(out), "--dtype", "float32"]) == 0  # ours now
    assert torch.allclose(head(out), head(b)) and read_record(out)["writer"] == "convert"


def test_the_output_is_the_path_the_check_resolved(models, tmp_path):
    """`work/link/../m` with link -> elsewhere/sub is elsewhere/m: the output is written there, and the
    input at work/m (which the text `work/link/../m` seems to name) is left alone."""
    import shutil
    a, b = models
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    (elsewhere / "sub").mkdir(parents=True)
    (work / "link").symlink_to(elsewhere / "sub")
    quantize_fp8(a, work / "m")  # the input: a dsv3 output itself (it holds the record)
    before = head(work / "m")
    quantize_fp8(b, str(work / "link" / ".." / "m"))
    assert torch.equal(head(work / "m"), before)
    assert torch.allclose(head(elsewhere / "m"), head(b))


def test_a_second_writer_of_the_same_output_is_refused_while_the_first_writes(models, tmp_path):
    a, b = models
    out = tmp_path / "out"
    quantize_fp8(a, out)
    with model_output(out, inputs=[a]) as tmp:
        with pytest.raises(OutputError, match="another process is writing"):
            quantize_fp8(b, out)
        assert os.path.isdir(tmp)  # the first writer's directory is still there
        for f in os.listdir(out):
            if f != RECORD:
                os.link(os.path.join(out, f), os.path.join(tmp, f))
    assert torch.allclose(head(out), head(a)) and leftovers(tmp_path) == []


def test_saving_over_a_model_keeps_other_safetensors_files(tmp_path):
    """save_pretrained (the trainer's export) replaces a model's weight files, not an adapter beside them."""
    out = tmp_path / "run"
    dsv3.save_pretrained(random_model(tiny_config(), seed=1), out, dtype=torch.bfloat16, max_shard_size="200KB")
    assert len([f for f in os.listdir(out) if f.startswith("model-")]) > 1
    (out / "adapter_model.safetensors").write_bytes(b"lora")
    dsv3.save_pretrained(random_model(tiny_config(), seed=2), out, dtype=torch.bfloat16)
    names = set(os.listdir(out))
    assert "model.safetensors" in names and not any(f.startswith("model-") for f in names)
    assert (out / "adapter_model.safetensors").read_bytes() == b"lora"


def test_a_mount_point_as_output_is_refused_before_anything_is_written(models, tmp_path, monkeypatch):
    import dsv3.ckpt.output as output
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(output.os.path, "ismount", lambda p: os.fspath(p) == str(out))
    with pytest.raises(OutputError, match="mount point"):
        quantize_fp8(models[0], out)
    assert os.listdir(out) == [] and leftovers(tmp_path) == []
