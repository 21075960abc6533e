"""Checkpoint I/O: save -> load is exact, the files are what the official release and `safetensors` read
(sharded, MTP, FP8 with 128x128 block scales), bad input fails naming the thing at fault without touching the
directory, and every write is atomic."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.ckpt import pretrained
from dsv3.ckpt.io import CheckpointError, PendingTensor, SafetensorsFile, write_safetensors
from dsv3.ckpt.pretrained import INDEX

from conftest import random_model, rel_err, tiny_config

OFFICIAL_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128]}
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors$")
# The projections the official FP8 release stores in e4m3 (attention and every MLP, MTP block included).
PROJ_RE = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                     r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


# ---- helpers -------------------------------------------------------------------------------------------

def logits(model, x):
    with torch.no_grad():
        return model(x)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality, dtype and shape included (FP8 compared as bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not same(sa[k], sb[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def file_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (all shards), read with the official safetensors reader."""
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), framework="pt") as f:
                for k in f.keys():
                    assert k not in out, f"{k} in two files"
                    out[k] = f.get_tensor(k)
    return out


def snapshot(path) -> dict[str, str]:
    """name -> sha256 of every file under path (to show nothing was modified, added or lost)."""
    snap = {}
    for root, _, files in os.walk(path):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return snap


def rewrite(path, edit) -> None:
    """Load a .safetensors file with the official library, edit the dict in place, write it back."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(d, edit) -> None:
    p = os.path.join(d, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(p, "w") as f:
        json.dump(cfg, f)


# ---- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref_logits(model, x):
    return logits(model, x)


@pytest.fixture(scope="module")
def fp32_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32")
    dsv3.save_pretrained(model, d, dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def sharded_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    dsv3.save_pretrained(model, d, dtype=torch.float32, max_shard_size="200KB")
    return d


@pytest.fixture(scope="module")
def fp8_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    dsv3.save_pretrained(model, d, dtype=torch.float32, fp8=True)
    return d


# ---- round trips ---------------------------------------------------------------------------------------

def test_float32_save_load_is_exact(model, fp32_dir, x, ref_logits):
    assert sorted(os.listdir(fp32_dir)) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = dsv3.load_pretrained(fp32_dir)
    assert loaded.dtype == torch.float32
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded, x), ref_logits)


def test_bfloat16_load_of_float32_save_matches_cast(model, fp32_dir, x):
    cast = copy.deepcopy(model).to(torch.bfloat16)
    loaded = dsv3.load_pretrained(fp32_dir, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    # the balancing bias stays float32 in both
    assert loaded.layers[1].ffn.gate.bias.dtype == cast.layers[1].ffn.gate.bias.dtype == torch.float32
    assert_same_state(loaded, cast)
    assert torch.equal(logits(loaded, x), logits(cast, x))


def test_bfloat16_save_load_is_exact(model, x, tmp_path):
    dsv3.save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    tensors = file_tensors(tmp_path)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = dsv3.load_pretrained(tmp_path)  # config.json's torch_dtype: bfloat16
    cast = copy.deepcopy(model).to(torch.bfloat16)
    assert_same_state(loaded, cast)
    assert torch.equal(logits(loaded, x), logits(cast, x))


def test_sharded_save_load_and_unsharded_resave(model, fp32_dir, sharded_dir, x, ref_logits, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert "model.safetensors" not in files
    matches = [SHARD_RE.match(f) for f in files]
    assert all(matches), files
    n = int(matches[0].group(2))
    assert n > 1 and {int(m.group(2)) for m in matches} == {n}
    assert [int(m.group(1)) for m in matches] == list(range(1, n + 1))

    index = json.loads((d / INDEX).read_text())
    weight_map = index["weight_map"]
    every = file_tensors(d)
    assert set(weight_map) == set(every) == set(file_tensors(fp32_dir))  # same tensors as the unsharded save
    assert set(weight_map.values()) == set(files)
    for name, fn in weight_map.items():
        with safe_open(str(d / fn), framework="pt") as f:
            assert name in f.keys(), (name, fn)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in every.values())

    loaded = dsv3.load_pretrained(d)
    assert_same_state(loaded, model)
    assert torch.equal(logits(loaded, x), ref_logits)

    dsv3.save_pretrained(model, d, dtype=torch.float32)  # unsharded, into the same directory
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert torch.equal(logits(dsv3.load_pretrained(d), x), ref_logits)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "fp8", "fp8-sharded"])
def test_files_are_read_identically_by_official_safetensors(model, kind, tmp_path):
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    dsv3.save_pretrained(model, tmp_path, dtype=dtype, fp8=kind.startswith("fp8"),
                         max_shard_size="100KB" if kind == "fp8-sharded" else "5GB")
    n = 0
    for fn in sorted(os.listdir(tmp_path)):
        if not fn.endswith(".safetensors"):
            continue
        with safe_open(str(tmp_path / fn), framework="pt") as f, SafetensorsFile(tmp_path / fn) as ours:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == sorted(ours.keys())
            for k in f.keys():
                assert same(f.get_tensor(k), ours.read(k)), (fn, k)
                n += 1
    assert n == len(file_tensors(tmp_path)) > 100
    if kind.startswith("fp8"):
        assert file_tensors(tmp_path)["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_weights_round_trip(depth, tmp_path):
    config = tiny_config(num_nextn_predict_layers=depth)
    model = random_model(config, seed=3)
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float32)
    tensors = file_tensors(tmp_path)
    L = config.num_hidden_layers
    # the MoE block of the main model, as a template for each MTP module's full block
    block = {k.removeprefix("model.layers.1.") for k in tensors if k.startswith("model.layers.1.")}
    assert "mlp.experts.7.down_proj.weight" in block and "self_attn.kv_b_proj.weight" in block
    for k in range(depth):
        p = f"model.layers.{L + k}."
        mtp = model.mtp[k]
        assert torch.equal(tensors[p + "enorm.weight"], mtp.enorm.weight)
        assert torch.equal(tensors[p + "hnorm.weight"], mtp.hnorm.weight)
        assert torch.equal(tensors[p + "eh_proj.weight"], mtp.eh_proj.weight)
        assert tensors[p + "eh_proj.weight"].shape == (200, 400)
        assert torch.equal(tensors[p + "shared_head.norm.weight"], mtp.norm.weight)
        assert torch.equal(tensors[p + "shared_head.head.weight"], model.head.weight)
        assert torch.equal(tensors[p + "embed_tokens.weight"], model.embed.weight)
        for name in block:
            assert p + name in tensors, p + name
        assert torch.equal(tensors[p + "self_attn.q_b_proj.weight"], mtp.block.attn.wq_b.weight)
        assert torch.equal(tensors[p + "mlp.experts.5.up_proj.weight"], mtp.block.ffn.experts.w3[5])
    assert not any(k.startswith(f"model.layers.{L + depth}.") for k in tensors)

    loaded = dsv3.load_pretrained(tmp_path)
    assert len(loaded.mtp) == depth
    for k in range(depth):
        got, want = dict(loaded.mtp[k].named_parameters()), dict(model.mtp[k].named_parameters())
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)
    x = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (a, mtp_a), (b, mtp_b) = loaded.forward_with_mtp(x), model.forward_with_mtp(x)
    assert torch.equal(a, b)
    assert len(mtp_a) == depth and all(torch.equal(u, v) for u, v in zip(mtp_a, mtp_b))


# ---- FP8 -----------------------------------------------------------------------------------------------

def test_fp8_save_layout(model, fp8_dir, tmp_path):
    tensors = file_tensors(fp8_dir)
    state = model.state_dict()
    projections = [n for n in tensors if PROJ_RE.match(n)]
    assert len(projections) == (5 + 3) + 3 * (5 + 8 * 3 + 3)  # a dense layer, two MoE layers, the MTP block
    for n in projections:
        w, s = tensors[n], tensors[n + "_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn, n
        assert s.dtype == torch.float32, n
        assert s.shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), (n, w.shape, s.shape)
    # the tiny widths (200, 72, 40, 136) leave partial edge blocks
    assert tensors["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].shape == (1, 2)  # (72, 200)
    assert tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape == (2, 1)  # (200, 72)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 2)  # (136, 200)
    assert tensors["model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"].shape == (2, 1)  # (200, 40)
    # dequantised, each projection is the original within e4m3's precision
    w = pretrained.fp8q.weight_dequant(tensors["model.layers.0.self_attn.o_proj.weight"],
                                       tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"], torch.float32)
    assert 0 < rel_err(w, state["layers.0.attn.wo.weight"]) < 0.07

    scales = {n for n in tensors if n.endswith("_scale_inv")}
    assert scales == {n + "_scale_inv" for n in projections}
    kept = [n for n in tensors if n not in scales and n not in projections]
    for n in kept:
        assert tensors[n].dtype == torch.float32, n
    must_keep = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                 "model.layers.1.self_attn.q_a_layernorm.weight", "model.layers.1.self_attn.kv_a_layernorm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.3.mlp.gate.weight", "model.layers.3.mlp.gate.e_score_correction_bias",
                 "model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight",
                 "model.layers.3.shared_head.norm.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.3.embed_tokens.weight"]
    for n in must_keep:
        assert n in kept, n
    assert torch.equal(tensors["model.layers.3.eh_proj.weight"], state["mtp.0.eh_proj.weight"])
    assert torch.equal(tensors["model.layers.1.mlp.gate.e_score_correction_bias"], state["layers.1.ffn.gate.bias"])

    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == OFFICIAL_QUANT
    assert config["torch_dtype"] == "float32"
    assert dsv3.ModelConfig.from_hf(fp8_dir).is_fp8

    # as released: FP8 projections, everything else BF16 but the float32 balancing bias
    dsv3.save_pretrained(model, tmp_path, dtype=torch.bfloat16, fp8=True)
    released = file_tensors(tmp_path)
    assert {n: (t.dtype, t.shape) for n, t in released.items() if n in projections or n in scales} == \
           {n: (t.dtype, t.shape) for n, t in tensors.items() if n in projections or n in scales}
    for n in kept:
        want = torch.float32 if n.endswith("e_score_correction_bias") else torch.bfloat16
        assert released[n].dtype == want, n
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == OFFICIAL_QUANT


def test_fp8_sharded_keeps_each_weight_with_its_scale(model, fp8_dir, x, tmp_path):
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float32, fp8=True, max_shard_size="60KB")
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3
    assert set(weight_map) == set(file_tensors(fp8_dir))
    for n, fn in weight_map.items():
        if n.endswith("_scale_inv"):
            assert weight_map[n.removesuffix("_scale_inv")] == fn, n
    assert torch.equal(logits(dsv3.load_pretrained(tmp_path), x), logits(dsv3.load_pretrained(fp8_dir), x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_at_load_equals_fp8_saved(model, dtype, x, tmp_path):
    plain, quant = tmp_path / "plain", tmp_path / "fp8"
    dsv3.save_pretrained(model, plain, dtype=dtype)
    source = dsv3.load_pretrained(plain, dtype=torch.float32)  # the weights as the plain checkpoint holds them
    dsv3.save_pretrained(source, quant, dtype=dtype, fp8=True)

    at_load = dsv3.load_pretrained(plain, fp8=True)
    saved = dsv3.load_pretrained(quant)
    assert at_load.dtype == saved.dtype == dtype
    assert at_load.layers[0].attn.wq_a.is_fp8 and at_load.layers[1].ffn.experts.is_fp8
    assert at_load.mtp[0].block.attn.wo.is_fp8 and at_load.mtp[0].block.ffn.shared_experts.w1.is_fp8
    assert not at_load.mtp[0].eh_proj.is_fp8 and not at_load.head.is_fp8
    assert at_load.layers[1].ffn.experts.w2.dtype == torch.float8_e4m3fn
    assert_same_state(at_load, saved)
    a = logits(at_load, x)
    assert torch.equal(a, logits(saved, x))
    assert not torch.equal(a.float(), logits(source.to(dtype), x).float())  # quantised: not the original


def test_fp8_checkpoint_dequantised_at_load(fp8_dir, x):
    kept = dsv3.load_pretrained(fp8_dir)  # FP8 as stored, dequantised per layer at run time
    deq = dsv3.load_pretrained(fp8_dir, fp8=False)
    assert kept.layers[0].attn.wo.is_fp8 and not deq.layers[0].attn.wo.is_fp8
    assert deq.layers[0].attn.wo.weight.dtype == torch.float32
    assert torch.equal(deq.layers[0].attn.wo.weight, kept.layers[0].attn.wo.dense_weight(torch.float32))
    # the same weights; only the expert GEMMs differ (grouped for plain weights, per expert for FP8)
    assert rel_err(logits(deq, x), logits(kept, x)) <= 1e-5  # float32 reassociation


# ---- bad input -----------------------------------------------------------------------------------------

def _drop(name):
    def edit(d):
        rewrite(d / "model.safetensors", lambda t: t.pop(name))
    return edit


def _reshape(name, shape):
    def edit(d):
        rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(shape)))
    return edit


def _add(name, tensor):
    def edit(d):
        rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, tensor))
    return edit


def _last_tensor(path) -> str:
    with SafetensorsFile(path) as f:
        return max(f.keys(), key=lambda n: f.info(n).begin)


def _truncate(d):
    p = d / "model.safetensors"
    last = _last_tensor(p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    return [last]


def _not_safetensors(d):
    (d / "model.safetensors").write_bytes(b"this is a text file, not safetensors\n" * 20)


def _bad_header_json(d):
    raw = b"{this is not json}"
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


def _int_tensor(d):
    name = "model.layers.0.input_layernorm.weight"
    rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, torch.ones(200, dtype=torch.int32)))


def _drop_hidden_size(d):
    edit_config(d, lambda c: c.pop("hidden_size"))


def _config_not_json(d):
    (d / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": 200,')


def _wrong_model_type(d):
    edit_config(d, lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]))


def _shard_missing(d):
    files = sorted(f for f in os.listdir(d) if SHARD_RE.match(f))
    os.unlink(d / files[1])
    return [files[1]]


def _index_lists_unknown_shard(d):
    index = json.loads((d / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (d / INDEX).write_text(json.dumps(index))


def _index_misplaces_tensor(d):
    index = json.loads((d / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    wrong = next(f for f in files if f != index["weight_map"]["model.norm.weight"])
    index["weight_map"]["model.norm.weight"] = wrong
    (d / INDEX).write_text(json.dumps(index))
    return [wrong]


def _index_not_json(d):
    (d / INDEX).write_text("{ nope")


def _fp8_scale_missing(d):
    rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.experts.4.gate_proj.weight_scale_inv"))


def _fp8_scale_wrong_shape(d):
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, torch.ones(1, 1)))


def _pickle_only(d):
    os.unlink(d / "model.safetensors")
    canary = str(d.parent / f"{d.name}-UNPICKLED")

    class Canary:  # unpickling this would create the canary directory
        def __reduce__(self):
            return os.mkdir, (canary,)

    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Canary()}))


def _pickle_only_no_config(d):
    _pickle_only(d)
    os.unlink(d / "config.json")
    os.unlink(d / "generation_config.json")


# case -> (source directory, corruption, exception type, substrings the message must hold)
BAD = {
    "missing_tensor": ("fp32", _drop("model.layers.2.self_attn.kv_b_proj.weight"), CheckpointError,
                       ["missing", "model.layers.2.self_attn.kv_b_proj.weight"]),
    "missing_expert": ("fp32", _drop("model.layers.1.mlp.experts.5.up_proj.weight"), CheckpointError,
                       ["missing", "model.layers.1.mlp.experts.5.up_proj.weight"]),
    "missing_mtp_enorm": ("fp32", _drop("model.layers.3.enorm.weight"), CheckpointError,
                          ["missing", "model.layers.3.enorm.weight"]),
    "missing_head": ("fp32", _drop("lm_head.weight"), CheckpointError, ["missing", "lm_head.weight"]),
    "wrong_shape": ("fp32", _reshape("model.layers.0.self_attn.o_proj.weight", (200, 71)), CheckpointError,
                    ["model.layers.0.self_attn.o_proj.weight", "[200, 71]", "[200, 72]", "model.safetensors"]),
    "wrong_shape_expert": ("fp32", _reshape("model.layers.2.mlp.experts.0.down_proj.weight", (40, 200)),
                           CheckpointError, ["model.layers.2.mlp.experts.0.down_proj.weight", "[40, 200]"]),
    "wrong_shape_mtp_copy": ("fp32", _reshape("model.layers.3.embed_tokens.weight", (299, 200)), CheckpointError,
                             ["model.layers.3.embed_tokens.weight", "[299, 200]"]),
    "unexpected_tensor": ("fp32", _add("model.layers.0.self_attn.extra_proj.weight", torch.zeros(3, 3)),
                          CheckpointError, ["model.layers.0.self_attn.extra_proj.weight", "not part of the model"]),
    "unexpected_layer": ("fp32", _add("model.layers.7.input_layernorm.weight", torch.ones(200)), CheckpointError,
                         ["model.layers.7.input_layernorm.weight"]),
    "integer_tensor": ("fp32", _int_tensor, CheckpointError, ["model.layers.0.input_layernorm.weight", "int32"]),
    "truncated": ("fp32", _truncate, CheckpointError, ["model.safetensors", "truncated"]),
    "not_safetensors": ("fp32", _not_safetensors, CheckpointError, ["model.safetensors", "not a safetensors"]),
    "header_not_json": ("fp32", _bad_header_json, CheckpointError, ["model.safetensors", "not valid JSON"]),
    "config_missing_field": ("fp32", _drop_hidden_size, ValueError, ["config.json", "hidden_size", "missing"]),
    "config_not_json": ("fp32", _config_not_json, ValueError, ["config.json", "not valid JSON"]),
    "config_wrong_model_type": ("fp32", _wrong_model_type, ValueError, ["config.json", "model_type", "'llama'"]),
    "index_shard_deleted": ("sharded", _shard_missing, CheckpointError, [INDEX]),
    "index_unknown_shard": ("sharded", _index_lists_unknown_shard, CheckpointError,
                            [INDEX, "model-00099-of-00099.safetensors"]),
    "index_misplaces_tensor": ("sharded", _index_misplaces_tensor, CheckpointError, [INDEX, "model.norm.weight"]),
    "index_not_json": ("sharded", _index_not_json, CheckpointError, [INDEX, "weight_map"]),
    "fp8_scale_missing": ("fp8", _fp8_scale_missing, CheckpointError,
                          ["model.layers.2.mlp.experts.4.gate_proj.weight_scale_inv"]),
    "fp8_scale_wrong_shape": ("fp8", _fp8_scale_wrong_shape, CheckpointError,
                              ["model.layers.0.self_attn.o_proj.weight_scale_inv", "[1, 1]", "[2, 1]"]),
    "pickle_only": ("fp32", _pickle_only, CheckpointError, ["no *.safetensors", "pickled", "never loads", "unpickl"]),
    "pickle_only_no_config": ("fp32", _pickle_only_no_config, FileNotFoundError, ["config.json"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_reported_and_left_untouched(case, fp32_dir, sharded_dir, fp8_dir, tmp_path):
    source, corrupt, exc, needles = BAD[case]
    d = tmp_path / "m"
    shutil.copytree({"fp32": fp32_dir, "sharded": sharded_dir, "fp8": fp8_dir}[source], d)
    needles = needles + (corrupt(d) or [])
    before = snapshot(d)
    with pytest.raises(exc) as e:
        dsv3.load_pretrained(d)
    msg = str(e.value)
    for s in needles:
        assert s in msg, f"{s!r} not in {msg!r}"
    assert "\n" not in msg
    assert snapshot(d) == before  # nothing modified, added or lost
    assert sorted(os.listdir(tmp_path)) == ["m"]  # nothing written beside it either (and nothing unpickled)


def test_missing_tensors_are_all_named_once_listed(fp32_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    gone = [f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(8)] + ["model.norm.weight"]
    rewrite(d / "model.safetensors", lambda t: [t.pop(n) for n in gone])
    with pytest.raises(CheckpointError, match="missing") as e:
        dsv3.load_pretrained(d)
    msg = str(e.value)
    assert sum(n in msg for n in gone) == 8 and "and 1 more" in msg


def test_nonexistent_directory(tmp_path):
    d = tmp_path / "no" / "such-model"
    with pytest.raises(FileNotFoundError, match="such-model"):
        dsv3.load_pretrained(d)
    assert os.listdir(tmp_path) == []  # not created


def test_directory_without_config(fp32_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    os.unlink(d / "config.json")
    before = snapshot(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        dsv3.load_pretrained(d)
    assert snapshot(d) == before


def test_mtp_config_without_mtp_weights_warns_and_loads(model, fp32_dir, x, ref_logits, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    rewrite(d / "model.safetensors",
            lambda t: [t.pop(n) for n in [k for k in t if k.startswith("model.layers.3.")]])
    with pytest.warns(UserWarning, match=r"num_nextn_predict_layers=1.*model\.layers\.3"):
        loaded = dsv3.load_pretrained(d)
    assert len(loaded.mtp) == 0
    assert torch.equal(logits(loaded, x), ref_logits)


# ---- atomic writes -------------------------------------------------------------------------------------

def _entries(tensors: dict[str, torch.Tensor], fail_at: str | None = None, exc=RuntimeError):
    def produce(name):
        def f():
            if name == fail_at:
                raise exc(f"producer of {name} failed")
            return tensors[name]
        return f
    return [PendingTensor(n, t.dtype, tuple(t.shape), produce(n)) for n, t in tensors.items()]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, MemoryError])
def test_write_safetensors_failure_keeps_old_file(exc, tmp_path):
    g = torch.Generator().manual_seed(0)
    old = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
           "c": torch.arange(10, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _entries(old))
    good = path.read_bytes()

    new = {k: v + 1 for k, v in old.items()} | {"d": torch.zeros(1000)}
    with pytest.raises(exc, match="producer of b failed"):
        write_safetensors(path, _entries(new, fail_at="b", exc=exc))
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b", "c"]
        assert all(same(f.get_tensor(k), old[k]) for k in old)


def test_write_safetensors_bad_producer_shape_names_tensor(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, _entries({"a": torch.ones(3)}))
    good = path.read_bytes()
    bad = [PendingTensor("first", torch.float32, (2,), lambda: torch.ones(2)),
           PendingTensor("layer.weight", torch.float32, (4, 4), lambda: torch.ones(4, 5))]
    with pytest.raises(ValueError, match=r"layer\.weight.*\(4, 5\)"):
        write_safetensors(path, bad)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["w.safetensors"]
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        write_safetensors(path, _entries({"a": torch.ones(1)}) * 2)
    assert path.read_bytes() == good


def test_failed_save_pretrained_keeps_previous_checkpoint(model, fp32_dir, x, ref_logits, tmp_path, monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    before = snapshot(d)
    calls = []

    def failing_quant(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory while quantising")
        return real(*args, **kwargs)

    real = pretrained.fp8q.weight_quant
    monkeypatch.setattr(pretrained.fp8q, "weight_quant", failing_quant)
    other = random_model(tiny_config(), seed=9)
    with pytest.raises(RuntimeError, match="out of memory"):
        dsv3.save_pretrained(other, d, dtype=torch.float32, fp8=True)
    assert snapshot(d) == before
    assert torch.equal(logits(dsv3.load_pretrained(d), x), ref_logits)


# ---- regressions: bugs found by these tests, now fixed ------------------------------------------------

def test_saved_files_honour_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        dsv3.save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    finally:
        os.umask(old)
    modes = {fn: oct(os.stat(tmp_path / fn).st_mode & 0o777) for fn in os.listdir(tmp_path)}
    assert set(modes.values()) == {oct(0o644)}, modes


def test_interrupted_unsharded_resave_leaves_a_loadable_checkpoint(model, sharded_dir, x, ref_logits, tmp_path,
                                                                    monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    other = random_model(tiny_config(), seed=5)
    real_unlink = os.unlink

    def killed_after_first_delete(p, *a, **k):
        real_unlink(p, *a, **k)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "unlink", killed_after_first_delete)
    with pytest.raises(KeyboardInterrupt):
        dsv3.save_pretrained(other, d, dtype=torch.float32)
    monkeypatch.setattr(os, "unlink", real_unlink)
    got = logits(dsv3.load_pretrained(d), x)
    assert torch.equal(got, ref_logits) or torch.equal(got, logits(other, x))


def test_failed_sharded_resave_does_not_mix_checkpoints(model, sharded_dir, x, ref_logits, tmp_path, monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    other = random_model(tiny_config(), seed=5)
    real = pretrained.write_safetensors
    calls = []

    def disk_full_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrained, "write_safetensors", disk_full_on_third_shard)
    with pytest.raises(OSError, match="No space left"):
        dsv3.save_pretrained(other, d, dtype=torch.float32, max_shard_size="200KB")
    monkeypatch.undo()
    got = logits(dsv3.load_pretrained(d), x)  # loads (every name and shape is right) ...
    assert torch.equal(got, ref_logits) or torch.equal(got, logits(other, x))  # ... but which model is it?
