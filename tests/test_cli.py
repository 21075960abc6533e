"""`dsv3 fp8-cast-bf16`, `dsv3 quantize-fp8`, `dsv3 convert`: run in-process through `dsv3.cli.main` and as
`python -m dsv3` in a subprocess; outputs checked tensor by tensor and by the logits they load to."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import dsv3
from dsv3.cli import main
from dsv3.ckpt.pretrained import INDEX
from dsv3.quant import fp8 as fp8q

from conftest import random_model, rel_err, tiny_config

OFFICIAL_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128]}
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n',
             "tokenizer_config.json": '{"bos_token": "<|begin|>", "eos_token": "<|end|>"}\n'}


# ---- helpers -------------------------------------------------------------------------------------------

def run_cli(args: list[str], mode: str, capsys=None, cwd=None) -> tuple[int, str, str]:
    """-> (exit code, stdout, stderr) of `dsv3 ARGS`, in-process ("main") or as `python -m dsv3`."""
    args = [str(a) for a in args]
    if mode == "main":
        capsys.readouterr()
        rc = main(args)
        out, err = capsys.readouterr()
        return rc, out, err
    p = subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def tensors_of(path) -> dict[str, torch.Tensor]:
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in f.keys():
                    assert k not in out
                    out[k] = f.get_tensor(k)
    return out


def config_of(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def snapshot(path) -> dict[str, str]:
    snap = {}
    for root, _, files in os.walk(path):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return snap


def logits(model, x):
    with torch.no_grad():
        return model(x)


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        u, v = sa[k], sb[k]
        if u.dtype != v.dtype or u.shape != v.shape:
            return False
        if u.dtype == fp8q.FP8:
            u, v = u.view(torch.uint8), v.view(torch.uint8)
        if not torch.equal(u, v):
            return False
    return True


def add_tokenizer(d) -> None:
    for fn, text in TOKENIZER.items():
        with open(os.path.join(d, fn), "w") as f:
            f.write(text)


def assert_tokenizer_copied(d) -> None:
    for fn, text in TOKENIZER.items():
        with open(os.path.join(d, fn)) as f:
            assert f.read() == text, fn


# ---- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=11)


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def fp8_dir(model, tmp_path_factory):
    """An FP8 checkpoint as released: e4m3 projections with block scales, everything else BF16."""
    d = tmp_path_factory.mktemp("fp8")
    dsv3.save_pretrained(model, d, dtype=torch.bfloat16, fp8=True)
    add_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def bf16_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    dsv3.save_pretrained(model, d, dtype=torch.bfloat16)
    add_tokenizer(d)
    return d


# ---- fp8-cast-bf16 -------------------------------------------------------------------------------------

def _check_cast_output(out, fp8_dir, x):
    tensors = tensors_of(out)
    src = tensors_of(fp8_dir)
    assert set(tensors) == {n for n in src if not n.endswith("_scale_inv")}
    assert not any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in tensors.values())
    for n, t in tensors.items():
        want = torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, (n, t.dtype)
        if src[n].dtype == fp8q.FP8:  # the dequantised weight, exactly
            assert torch.equal(t, fp8q.weight_dequant(src[n], src[n + "_scale_inv"], torch.bfloat16)), n
        else:
            assert torch.equal(t, src[n]), n
    config = config_of(out)
    assert "quantization_config" not in config
    assert config["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")} == \
           {k: v for k, v in config_of(fp8_dir).items() if k not in ("quantization_config", "torch_dtype")}
    assert_tokenizer_copied(out)
    assert os.path.isfile(os.path.join(out, "generation_config.json"))

    cast = dsv3.load_pretrained(out)
    ref = dsv3.load_pretrained(fp8_dir, dtype=torch.bfloat16, fp8=False)
    assert cast.dtype == torch.bfloat16 and not cast.layers[0].attn.wo.is_fp8
    assert same_state(cast, ref)
    assert torch.equal(logits(cast, x), logits(ref, x))


def test_fp8_cast_bf16(fp8_dir, x, tmp_path, capsys):
    out = tmp_path / "bf16"
    before = snapshot(fp8_dir)
    rc, stdout, stderr = run_cli(["fp8-cast-bf16", "--input", fp8_dir, "--output", out], "main", capsys)
    assert rc == 0, stderr
    assert f"wrote {out}" in stdout
    assert sorted(os.listdir(out)) == [".dsv3-output.json", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    _check_cast_output(out, fp8_dir, x)
    assert snapshot(fp8_dir) == before  # the input is only read


def test_fp8_cast_bf16_subprocess_sharded_with_official_flag_names(model, x, tmp_path):
    src, out = tmp_path / "fp8", tmp_path / "bf16"
    dsv3.save_pretrained(model, src, dtype=torch.bfloat16, fp8=True, max_shard_size="100KB")
    add_tokenizer(src)
    rc, stdout, stderr = run_cli(["fp8-cast-bf16", "--input-fp8-hf-path", src, "--output-bf16-hf-path", out],
                                 "subprocess", cwd=tmp_path)
    assert rc == 0, stderr
    assert "wrote" in stdout
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    assert len(shards) > 2 and sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    src_map = json.loads((src / INDEX).read_text())["weight_map"]
    out_index = json.loads((out / INDEX).read_text())
    assert out_index["weight_map"] == {n: f for n, f in src_map.items() if not n.endswith("_scale_inv")}
    tensors = tensors_of(out)
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    _check_cast_output(out, src, x)


# ---- quantize-fp8 --------------------------------------------------------------------------------------

def _check_fp8_layout(tensors: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    scales = {n for n in tensors if n.endswith("_scale_inv")}
    assert set(tensors) - scales == set(plain)
    for n in plain:
        if n + "_scale_inv" in scales:
            w, s = tensors[n], tensors[n + "_scale_inv"]
            assert w.dtype == fp8q.FP8 and s.dtype == torch.float32, n
            assert s.shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), n
            assert rel_err(fp8q.weight_dequant(w, s, torch.float32), plain[n].float()) < 0.07, n
        else:
            assert torch.equal(tensors[n], plain[n]), n
    quantised = {n.removesuffix("_scale_inv") for n in scales}
    assert "model.layers.0.self_attn.q_a_proj.weight" in quantised
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in quantised
    assert "model.layers.3.mlp.shared_experts.up_proj.weight" in quantised  # the MTP block too
    for n in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.3.eh_proj.weight",
              "model.layers.3.shared_head.head.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]:
        assert n not in quantised, n


@pytest.mark.parametrize("mode", ["main", "subprocess"])
def test_quantize_fp8(bf16_dir, x, mode, tmp_path, capsys):
    out = tmp_path / "fp8"
    rc, stdout, stderr = run_cli(["quantize-fp8", "--input", bf16_dir, "--output", out], mode, capsys, cwd=tmp_path)
    assert rc == 0, stderr
    assert "wrote" in stdout
    _check_fp8_layout(tensors_of(out), tensors_of(bf16_dir))
    config = config_of(out)
    assert config["quantization_config"] == OFFICIAL_QUANT
    assert config["torch_dtype"] == "bfloat16"
    assert_tokenizer_copied(out)
    quantised = dsv3.load_pretrained(out)
    at_load = dsv3.load_pretrained(bf16_dir, fp8=True)
    assert quantised.layers[1].ffn.experts.is_fp8 and not quantised.mtp[0].eh_proj.is_fp8
    assert same_state(quantised, at_load)
    assert torch.equal(logits(quantised, x), logits(at_load, x))


def test_quantize_fp8_is_the_way_back_from_fp8_cast(fp8_dir, tmp_path, capsys):
    cast, back = tmp_path / "bf16", tmp_path / "fp8"
    assert run_cli(["fp8-cast-bf16", "--input", fp8_dir, "--output", cast], "main", capsys)[0] == 0
    assert run_cli(["quantize-fp8", "--input", cast, "--output", back], "main", capsys)[0] == 0
    original, again = tensors_of(fp8_dir), tensors_of(back)
    assert {n: (t.dtype, t.shape) for n, t in again.items()} == {n: (t.dtype, t.shape) for n, t in original.items()}
    assert config_of(back)["quantization_config"] == config_of(fp8_dir)["quantization_config"] == OFFICIAL_QUANT
    for n, t in original.items():
        if t.dtype == fp8q.FP8:
            a = fp8q.weight_dequant(again[n], again[n + "_scale_inv"], torch.float32)
            b = fp8q.weight_dequant(t, original[n + "_scale_inv"], torch.float32)
            assert rel_err(a, b) < 0.07, n
        elif not n.endswith("_scale_inv"):
            assert torch.equal(again[n], t), n


def test_quantize_fp8_ue8m0_scales_are_powers_of_two(bf16_dir, x, tmp_path, capsys):
    out = tmp_path / "fp8"
    rc, _, stderr = run_cli(["quantize-fp8", "--input", bf16_dir, "--output", out, "--scale-fmt", "ue8m0"],
                            "main", capsys)
    assert rc == 0, stderr
    tensors = tensors_of(out)
    _check_fp8_layout(tensors, tensors_of(bf16_dir))
    scales = [t for n, t in tensors.items() if n.endswith("_scale_inv")]
    assert len(scales) == (5 + 3) + 3 * (5 + 8 * 3 + 3)
    for s in scales:
        mantissa, _ = torch.frexp(s)
        assert (s > 0).all() and (mantissa == 0.5).all()
    assert config_of(out)["quantization_config"] == {**OFFICIAL_QUANT, "scale_fmt": "ue8m0"}
    loaded = dsv3.load_pretrained(out)
    assert loaded.layers[0].attn.wq_b.is_fp8
    # bf16, the FP8 experts run per expert and the dequantised ones grouped: the same weights (test_ckpt checks
    # dequantisation at load exactly), but an elementwise op over other slices may round an element one float32
    # ulp apart and so flip a bf16 rounding (2^-8): a few bf16 ulps of the logits, not bit-equality
    assert rel_err(logits(loaded, x), logits(dsv3.load_pretrained(out, fp8=False), x)) <= 2e-2


# ---- convert -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["main", "subprocess"])
def test_convert_to_float32(bf16_dir, x, mode, tmp_path, capsys):
    out = tmp_path / "fp32"
    rc, stdout, stderr = run_cli(["convert", "--input", bf16_dir, "--output", out, "--dtype", "float32"],
                                 mode, capsys, cwd=tmp_path)
    assert rc == 0, stderr
    assert "wrote" in stdout
    tensors, src = tensors_of(out), tensors_of(bf16_dir)
    assert set(tensors) == set(src)
    for n, t in tensors.items():
        assert t.dtype == torch.float32, n
        assert torch.equal(t, src[n].float()), n  # bf16 -> fp32 is exact
    assert config_of(out)["torch_dtype"] == "float32"
    assert_tokenizer_copied(out)
    converted = dsv3.load_pretrained(out)
    ref = dsv3.load_pretrained(bf16_dir, dtype=torch.float32)
    assert converted.dtype == torch.float32
    assert same_state(converted, ref)
    assert torch.equal(logits(converted, x), logits(ref, x))


def test_convert_fp8_checkpoint_to_float32_dequantises(fp8_dir, x, tmp_path, capsys):
    out = tmp_path / "fp32"
    rc, _, stderr = run_cli(["convert", "--input", fp8_dir, "--output", out, "--dtype", "float32"], "main", capsys)
    assert rc == 0, stderr
    tensors = tensors_of(out)
    assert not any(n.endswith("_scale_inv") for n in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert "quantization_config" not in config_of(out)
    ref = dsv3.load_pretrained(fp8_dir, dtype=torch.float32, fp8=False)
    assert torch.equal(logits(dsv3.load_pretrained(out), x), logits(ref, x))


def test_convert_to_sharded_fp8(bf16_dir, x, tmp_path, capsys):
    out = tmp_path / "fp8"
    rc, _, stderr = run_cli(["convert", "--input", bf16_dir, "--output", out, "--fp8", "--scale-fmt", "ue8m0",
                             "--max-shard-size", "150KB"], "main", capsys)
    assert rc == 0, stderr
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2 and "model.safetensors" not in os.listdir(out)
    _check_fp8_layout(tensors_of(out), tensors_of(bf16_dir))
    assert config_of(out)["quantization_config"] == {**OFFICIAL_QUANT, "scale_fmt": "ue8m0"}
    assert_tokenizer_copied(out)
    assert torch.isfinite(logits(dsv3.load_pretrained(out), x)).all()


# ---- bad input -----------------------------------------------------------------------------------------

def _truncate(d):
    p = d / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 64)


def _config_not_json(d):
    (d / "config.json").write_text("{ this is not json")


def _drop_tensor(d):
    from safetensors.torch import load_file, save_file
    t = load_file(d / "model.safetensors")
    t.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


# case -> (command, source ("bf16" / "fp8" / None: a path that does not exist), corruption, extra args,
#          substrings the error must hold (IN stands for the input directory))
BAD = {
    "cast_missing_dir": ("fp8-cast-bf16", None, None, [], ["IN", "does not exist"]),
    "quantize_missing_dir": ("quantize-fp8", None, None, [], ["IN", "does not exist"]),
    "convert_missing_dir": ("convert", None, None, [], ["IN", "does not exist"]),
    "cast_not_fp8": ("fp8-cast-bf16", "bf16", None, [], ["IN", "no FP8 weights"]),
    "quantize_already_fp8": ("quantize-fp8", "fp8", None, [], ["already has a quantization_config"]),
    "cast_output_is_input": ("fp8-cast-bf16", "fp8", None, ["--output", "IN"], ["is the input"]),
    "cast_config_not_json": ("fp8-cast-bf16", "fp8", _config_not_json, [], ["config.json", "not valid JSON"]),
    "convert_config_not_json": ("convert", "bf16", _config_not_json, [], ["config.json", "not valid JSON"]),
    "convert_truncated": ("convert", "bf16", _truncate, [], ["model.safetensors", "truncated"]),
    "cast_truncated": ("fp8-cast-bf16", "fp8", _truncate, [], ["model.safetensors", "truncated"]),
    "quantize_truncated": ("quantize-fp8", "bf16", _truncate, [], ["model.safetensors", "truncated"]),
    "convert_missing_tensor": ("convert", "bf16", _drop_tensor, [],
                               ["missing", "model.layers.1.self_attn.o_proj.weight"]),
    "convert_bad_dtype": ("convert", "bf16", None, ["--dtype", "int8"], ["'int8'", "bfloat16"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, bf16_dir, fp8_dir, tmp_path, capsys):
    cmd, source, corrupt, extra, needles = BAD[case]
    d = tmp_path / "in"
    if source is not None:
        shutil.copytree(bf16_dir if source == "bf16" else fp8_dir, d)
        if corrupt:
            corrupt(d)
    before = snapshot(d) if source else None
    args = [cmd, "--input", d, *[d if a == "IN" else a for a in extra]]
    if "--output" not in extra:
        args += ["--output", tmp_path / "out"]
    rc, stdout, stderr = run_cli(args, "main", capsys)
    assert rc == 2
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"dsv3 {cmd}: error: ")
    for s in needles:
        s = str(d) if s == "IN" else s
        assert s in stderr, f"{s!r} not in {stderr!r}"
    assert "Traceback" not in stderr
    if source:
        assert snapshot(d) == before  # the input is untouched
    else:
        assert not d.exists()
    if (tmp_path / "out").exists():  # nothing half-written
        assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "out"))


def test_bad_input_subprocess_exits_2_with_one_line(bf16_dir, tmp_path):
    d = tmp_path / "in"
    shutil.copytree(bf16_dir, d)
    _truncate(d)
    rc, stdout, stderr = run_cli(["convert", "--input", d, "--output", tmp_path / "out"], "subprocess",
                                 cwd=tmp_path)
    assert rc == 2
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dsv3 convert: error: ") and "truncated" in lines[0] and "model.safetensors" in lines[0]


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize-fp8", "--input", "somewhere"])
    assert e.value.code == 2
    assert "--output" in capsys.readouterr().err


# ---- help ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [None, "convert", "fp8-cast-bf16", "quantize-fp8"])
def test_help_exits_0(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(([cmd] if cmd else []) + ["--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    if cmd is None:
        assert out.startswith("usage: dsv3") and all(c in out for c in ("convert", "fp8-cast-bf16", "quantize-fp8"))
    else:
        assert out.startswith(f"usage: dsv3 {cmd}") and "--input" in out and "--output" in out


def test_help_subprocess(tmp_path):
    rc, stdout, stderr = run_cli(["fp8-cast-bf16", "--help"], "subprocess", cwd=tmp_path)
    assert rc == 0, stderr
    assert stdout.startswith("usage: dsv3 fp8-cast-bf16") and "--input-fp8-hf-path" in stdout


# ---- regressions: bugs found by these tests, now fixed ------------------------------------------------

@pytest.mark.parametrize("cmd", ["fp8-cast-bf16", "quantize-fp8"])
def test_streaming_tools_replace_an_older_checkpoint_in_the_output(cmd, bf16_dir, fp8_dir, x, tmp_path, capsys):
    out = tmp_path / "out"
    dsv3.save_pretrained(random_model(tiny_config(), seed=99), out, dtype=torch.bfloat16, max_shard_size="200KB")
    src = fp8_dir if cmd == "fp8-cast-bf16" else bf16_dir
    rc, _, stderr = run_cli([cmd, "--input", src, "--output", out], "main", capsys)  # not ours: refused
    assert rc == 2 and "not written by dsv3" in stderr and "--overwrite" in stderr
    assert run_cli([cmd, "--input", src, "--output", out, "--overwrite"], "main", capsys)[0] == 0
    ref = (dsv3.load_pretrained(fp8_dir, dtype=torch.bfloat16, fp8=False) if cmd == "fp8-cast-bf16"
           else dsv3.load_pretrained(bf16_dir, fp8=True))
    assert torch.equal(logits(dsv3.load_pretrained(out), x), logits(ref, x))
