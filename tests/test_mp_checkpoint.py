"""The official demo's model-parallel layout (ckpt/model_parallel.py, `dsv3 convert --model-parallel N`): the files hold
the names, shapes and slices the demo's convert.py rules give (restated below from its source), a rank's shard read from
its own file alone equals the shard `Sharding` cuts from the HF directory, the files put together are the original
model, `torchrun -m dsv3 generate --tp 2 --ep 2` on them gives one process's greedy tokens, and what cannot work is
refused by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv3
from dsv3.ckpt import model_parallel as mp
from dsv3.ckpt.convert import convert_model_parallel
from dsv3.ckpt.io import CheckpointError
from dsv3.ckpt.pretrained import load_pretrained
from dsv3.cli import main
from dsv3.parallel.inference import Sharding, initial_placement
from dsv3.quant import fp8 as fp8q
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config
from multiproc import torchrun

CORPUS = ["the cat sat on the mat. the dog ate the bone! hello world " * 20]
PROMPTS = ["hello world", "the cat sat", "dog"]
KINDS = ("micro-bf16", "micro-fp8", "bench-small-fp8")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """HF directories and their --model-parallel 2 conversions. micro: widths under 128, so every split FP8
    projection cuts its blocks (written dequantised); bench-small: wkv_b, wo and the MLPs split on 128-blocks (kept
    FP8, scales sliced), wq_b's 384 rows into 192 do not."""
    root = tmp_path_factory.mktemp("mp-ckpt")
    tok = train_bpe(CORPUS, vocab_size=300)
    out = {}
    for kind in KINDS:
        preset, fmt = kind.rsplit("-", 1)
        hf, mpdir = root / kind, root / f"{kind}-mp2"
        dsv3.save_pretrained(random_model(dsv3.ModelConfig.preset(preset), std=0.2 if preset == "micro" else 0.1), hf,
                             dtype=torch.bfloat16, fp8=fmt == "fp8", tokenizer=tok)
        assert main(["convert", "--input", str(hf), "--output", str(mpdir), "--model-parallel", "2"]) == 0
        out[kind] = (hf, mpdir)
    return out


# ---- the demo's rules, restated from inference/convert.py ----------------------------------------------------------

OFFICIAL = {  # the module's HF name -> (demo name, split dim)
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None), "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None), "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1), "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0),
    "norm": ("norm", None), "lm_head": ("head", 0), "scale": ("scale", None),
}


def official(hf_name: str) -> tuple[str, int | None]:
    """The demo's name and split dimension of an HF tensor (MTP's own modules, which it never sees, kept whole)."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    for a, b in (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"),
                 ("e_score_correction_bias", "bias")):
        name = name.replace(a, b)
    key = name.split(".")[-2]
    new, dim = OFFICIAL.get(key, (key, None))
    return name.replace(key, new), dim


def expected_files(hf_dir, n: int, L: int, E: int) -> dict[str, dict[str, torch.Tensor]]:
    """file name -> {tensor name: tensor} by the demo's rules: layer L (MTP) in the -mtp files, without its copies of
    the embedding and head; an FP8 weight whose slices cut 128-blocks as float32 values, without a scale."""
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    files = {mp.rank_file(i, n, mtp): {} for i in range(n) for mtp in (False, True)}
    for name, t in hf.items():
        is_mtp = name.startswith(f"model.layers.{L}.")
        if is_mtp and name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            continue
        new, dim = official(name)
        routed = "experts" in new and "shared_experts" not in new  # (whole, in their rank's file: before any split)
        weight = name.removesuffix("_scale_inv")
        if weight + "_scale_inv" in hf and not routed and dim is not None and (hf[weight].shape[dim] // n) % 128:
            if name != weight:
                continue
            t = fp8q.weight_dequant(t, hf[weight + "_scale_inv"], torch.float32)
        for i in range(n):
            if routed and int(new.split(".")[-3]) // (E // n) != i:
                continue
            part = t if routed or dim is None else t.narrow(dim, i * (t.shape[dim] // n), t.shape[dim] // n)
            files[mp.rank_file(i, n, is_mtp)][new] = part
    return files


@pytest.mark.parametrize("kind", KINDS)
def test_files_hold_the_official_names_shapes_and_slices(dirs, kind):
    hf, mpdir = dirs[kind]
    config = dsv3.ModelConfig.from_hf(hf)
    want = expected_files(hf, 2, config.num_hidden_layers, config.n_routed_experts)
    weights = sorted(f for f in os.listdir(mpdir) if f.endswith(".safetensors"))
    assert weights == sorted(want)
    for fn, tensors in want.items():
        with safe_open(os.path.join(mpdir, fn), "pt") as f:  # (the safetensors library reads them)
            assert sorted(f.keys()) == sorted(tensors), fn
            for name, t in tensors.items():
                got = f.get_tensor(name)
                assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), (fn, name)
    names = set().union(*want.values())
    assert {"embed.weight", "head.weight", "norm.weight", "layers.0.attn.wq_b.weight", "layers.1.ffn.gate.bias",
            "layers.1.ffn.experts.0.w1.weight", "layers.1.ffn.shared_experts.w2.weight"} <= names
    if kind == "bench-small-fp8":  # split on block boundaries: FP8 slices with their slices of the scales
        assert {"layers.1.attn.wkv_b.scale", "layers.1.attn.wo.scale", "layers.1.ffn.experts.3.w2.scale"} <= names
        assert want["model0-mp2.safetensors"]["layers.1.attn.wkv_b.weight"].dtype == torch.float8_e4m3fn
        assert want["model0-mp2.safetensors"]["layers.1.attn.wq_b.weight"].dtype == torch.float32  # 192 rows cut
    assert json.loads((mpdir / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert (mpdir / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert json.loads((mpdir / "model_args.json").read_text())["n_routed_experts"] == config.n_routed_experts


class Opened(mp.SafetensorsFile):
    paths: list[str] = []

    def __init__(self, path):
        Opened.paths.append(os.path.basename(path))
        super().__init__(path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_a_rank_reads_only_its_file_and_holds_what_sharding_cuts(dirs, kind, dtype, monkeypatch):
    """Every tensor (name, dtype, values) of rank r's shard from model{r}-mp2 equals the shard `Sharding` reads from the
    HF directory: FP8 kept where the slices fall on 128-blocks, dequantised alike where they do not."""
    hf, mpdir = dirs[kind]
    config = dsv3.ModelConfig.from_hf(hf)
    monkeypatch.setattr(mp, "SafetensorsFile", Opened)
    for r in (0, 1):
        Opened.paths = []
        got = load_pretrained(mpdir, dtype, shard=Sharding(config, r, 2, 2, 2)).state_dict()
        assert sorted(Opened.paths) == [f"model{r}-mp2-mtp.safetensors", f"model{r}-mp2.safetensors"]
        want = load_pretrained(hf, dtype, shard=Sharding(config, r, 2, 2, 2)).state_dict()
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (kind, r, name)
        assert any(t.dtype == torch.float8_e4m3fn for t in got.values()) == kind.endswith("fp8")


@pytest.mark.parametrize("kind", KINDS)
def test_the_files_put_together_are_the_original_model(dirs, kind):
    hf, mpdir = dirs[kind]
    for fp8 in (None, False):  # (fp8=False: every FP8 weight dequantised at load, as the cut ones were when written)
        got, want = load_pretrained(mpdir, fp8=fp8).state_dict(), load_pretrained(hf, fp8=fp8).state_dict()
        assert got.keys() >= {k for k in want if not k.endswith("_scale_inv")}
        for name, t in want.items():
            if name in got and got[name].dtype == t.dtype:
                assert torch.equal(got[name], t), (kind, name)
            else:  # a cut FP8 projection: its values, dequantised
                assert fp8 is None and t.dtype in (torch.float8_e4m3fn, torch.float32), name
                if t.dtype == torch.float8_e4m3fn:
                    assert torch.equal(got[name], fp8q.weight_dequant(t, want[name + "_scale_inv"], got[name].dtype))


def test_convert_again_from_the_files(dirs, tmp_path):
    """A model-parallel directory is an input like any: to another N (here 1), and back to the HF layout."""
    hf, mpdir = dirs["micro-fp8"]
    assert main(["convert", "--input", str(mpdir), "--output", str(tmp_path / "mp1"), "--model-parallel", "1"]) == 0
    assert sorted(f for f in os.listdir(tmp_path / "mp1") if f.endswith(".safetensors")) == \
        ["model0-mp1-mtp.safetensors", "model0-mp1.safetensors"]
    assert main(["convert", "--input", str(mpdir), "--output", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    want = load_pretrained(hf, torch.float32, fp8=False).state_dict()
    for d in ("mp1", "hf"):
        got = load_pretrained(tmp_path / d, torch.float32, fp8=False).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], t) for k, t in want.items()), d


def test_model_args_are_the_demos_config_of_v3():
    """For DeepSeek-V3's config, model_args.json is the demo's configs/config_671B.json, plus its YaRN defaults."""
    config_671b = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                   "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                   "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                   "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                   "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
    yarn_defaults = {"original_seq_len": 4096, "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0}
    assert mp.model_args(dsv3.ModelConfig.preset("671B")) == {**config_671b, **yarn_defaults}


def test_deepseek_v3_keeps_every_fp8_slice_up_to_16_processes():
    """DeepSeek-V3's own shapes (46,183 weights, as released) split on 128-blocks over N = 1..16: its FP8 files are
    the demo's exactly; over 32 the dense and shared MLPs' slices (576 and 64 wide) would cut blocks."""
    from dsv3.ckpt.hf import is_quantizable

    config = dsv3.ModelConfig.preset("671B")
    shapes = mp.expected_shapes(config)
    assert len(shapes) == 46183
    for n in (1, 2, 4, 8, 16, 32):
        layout = mp.Layout(config, n)
        cut = {h.split(".")[-2] for h, shape in shapes.items()
               if is_quantizable(h) and mp.cuts_blocks(shape, layout.split_dim(h), n)}
        assert cut == (set() if n <= 16 else {"gate_proj", "up_proj", "down_proj"}), n


# ---- torchrun ----------------------------------------------------------------------------------------------------

def generate(args, tmp_path, name, nproc=None):
    """`dsv3 generate` on the prompts, greedy -> token ids per prompt (in-process, or under torchrun)."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / f"{name}.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cmd = ["generate", "--input-file", str(prompts), "--raw", "--temperature", "0", "--max-new-tokens", "12",
           "--output-file", str(out), *args]
    if nproc is None:
        assert main(cmd) == 0
    else:
        torchrun(["-m", "dsv3", *cmd], nproc=nproc)
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]


# In float32 (as tests/test_model_parallel.py): the split sums differ from one process's only by float32 reordering.
@pytest.mark.parametrize("kind, spec", [
    ("micro-fp8", ["--speculative", "mtp", "--speculative-policy", "always"]),
    ("bench-small-fp8", []),
])
def test_torchrun_generate_on_the_files_equals_one_process(dirs, tmp_path, quiet, kind, spec):
    hf, mpdir = dirs[kind]
    one = generate(["--model", str(hf), "--dtype", "float32", *spec], tmp_path, "one")
    assert generate(["--model", str(mpdir), "--dtype", "float32", *spec], tmp_path, "whole") == one
    assert generate(["--model", str(mpdir), "--dtype", "float32", "--tp", "2", "--ep", "2", *spec], tmp_path, "two",
                    nproc=2) == one


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_layouts_that_do_not_split_are_refused(dirs, tmp_path, capsys):
    hf, _ = dirs["micro-bf16"]
    assert main(["convert", "--input", str(hf), "--output", str(tmp_path / "a"), "--model-parallel", "4"]) == 2
    assert "--model-parallel 4 needs num_attention_heads=2 divisible by 4" in capsys.readouterr().err
    odd = tmp_path / "odd"  # 135 intermediate rows: heads, vocabulary and experts split over 2, the dense MLP not
    dsv3.save_pretrained(random_model(tiny_config(num_attention_heads=2, intermediate_size=135)), odd)
    with pytest.raises(CheckpointError, match=r"mlp.down_proj.weight' has 135 columns, which do not split over "
                                              r"--model-parallel 2"):
        convert_model_parallel(odd, tmp_path / "b", 2)
    dense = tmp_path / "dense"
    dsv3.save_pretrained(random_model(tiny_config(num_attention_heads=2, n_routed_experts=None)), dense)
    with pytest.raises(ValueError, match="divides the routed experts over the ranks, and this model has none"):
        convert_model_parallel(dense, tmp_path / "c", 2)
    assert main(["convert", "--input", str(hf), "--output", str(tmp_path / "d"), "--model-parallel", "2",
                 "--fp8"]) == 2
    assert "does not take --fp8" in capsys.readouterr().err
    assert not any(p.name in ("a", "b", "c", "d") for p in tmp_path.iterdir())  # (nothing written)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["convert", "--input", str(hf), "--output", str(foreign), "--model-parallel", "2"]) == 2
    assert "not written by dsv3" in capsys.readouterr().err
    shutil.copy(dirs["micro-bf16"][1] / "model0-mp2.safetensors", foreign / "model0-mp4.safetensors")
    assert main(["convert", "--input", str(hf), "--output", str(foreign), "--model-parallel", "2", "--overwrite"]) == 0
    assert (foreign / "notes.txt").read_text() == "mine"  # its own file carried along; the old model's weights not
    assert not (foreign / "model0-mp4.safetensors").exists() and mp.layout_size(str(foreign)) == 2


def test_loading_for_another_layout_is_refused(dirs):
    hf, mpdir = dirs["micro-bf16"]
    config = dsv3.ModelConfig.from_hf(hf)
    with pytest.raises(CheckpointError, match=r"converted for 2 processes .* not 1: run --nproc-per-node 2 --tp 2"):
        load_pretrained(mpdir, shard=Sharding(config, 0, 1, 1, 1))
    with pytest.raises(CheckpointError, match=r"pass --tp 2 --ep 2 \(not --tp 2 --ep 1\)"):
        load_pretrained(mpdir, shard=Sharding(config, 0, 2, 2, 1))
    with pytest.raises(CheckpointError, match="redundant or re-placed experts"):
        load_pretrained(mpdir, shard=Sharding(config, 0, 2, 2, 2, initial_placement(config, 2, 2)))


def test_damaged_directories_are_refused_by_name(dirs, tmp_path):
    hf, mpdir = dirs["micro-fp8"]
    config = dsv3.ModelConfig.from_hf(hf)

    def copy(name):
        d = tmp_path / name
        shutil.copytree(mpdir, d)
        return d

    gone = copy("gone")  # a rank's file missing: the whole model cannot be read, rank 0's shard can
    os.unlink(gone / "model1-mp2.safetensors")
    with pytest.raises(CheckpointError, match="model1-mp2.safetensors is missing"):
        load_pretrained(gone)
    load_pretrained(gone, shard=Sharding(config, 0, 2, 2, 2))
    two = copy("two")  # files for two sizes
    shutil.copy(two / "model0-mp2.safetensors", two / "model0-mp4.safetensors")
    with pytest.raises(CheckpointError, match=r"model-parallel files for 2 sizes \(model0-mp2, model0-mp4\)"):
        load_pretrained(two)
    swapped = copy("swapped")  # rank 0's file under rank 1's name: its experts belong to rank 0
    shutil.copy(swapped / "model0-mp2.safetensors", swapped / "model1-mp2.safetensors")
    with pytest.raises(CheckpointError, match=r"model1-mp2.safetensors: tensor 'layers.1.ffn.experts.0.w\d.weight': "
                                              r"expert 0 belongs to the file of rank 0"):
        load_pretrained(swapped)

    def rewrite(d, change, rank=0):
        path = str(d / f"model{rank}-mp2.safetensors")
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        change(tensors)
        save_file(tensors, path)

    bogus = copy("bogus")
    rewrite(bogus, lambda t: t.update({"layers.0.attn.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="'layers.0.attn.bogus.weight' is not a name of the model-parallel"):
        load_pretrained(bogus)
    cut = copy("cut")  # what the demo's script gives when a slice cuts 128-blocks: FP8 with a scale of its own

    def fp8_slice(t):
        q, s = fp8q.weight_quant(t["layers.0.attn.wq_b.weight"])
        t.update({"layers.0.attn.wq_b.weight": q, "layers.0.attn.wq_b.scale": s})

    rewrite(cut, fp8_slice)
    with pytest.raises(CheckpointError, match="'layers.0.attn.wq_b.weight' is an FP8 slice of 24 rows, which cuts"):
        load_pretrained(cut, shard=Sharding(config, 0, 2, 2, 2))
    short = copy("short")  # a tensor missing from a rank's file: named, as for HF directories
    rewrite(short, lambda t: t.pop("layers.0.attn.wo.weight"))
    with pytest.raises(CheckpointError, match=r"model0-mp2.safetensors: missing tensor\(s\): "
                                              r"model.layers.0.self_attn.o_proj.weight"):
        load_pretrained(short, shard=Sharding(config, 0, 2, 2, 2))
    uneven = copy("uneven")  # ranks that disagree: the whole model cannot be put together
    rewrite(uneven, lambda t: t.pop("norm.weight"), rank=1)
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in the file.s. of rank 0 but not in those of "
                                              "rank 1"):
        load_pretrained(uneven)
