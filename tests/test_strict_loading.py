"""Loaders as strict as safetensors itself: a header whose tensors overlap, leave gaps, run past the file or
disagree with their dtype x shape; an index entry that points outside the model directory; a tokenizer.json
that does not parse. Each is refused before any weight is used, naming the file (and tensor or entry); the
valid layouts (our own files, the official library's, the Hugging Face cache's symlinks) still load."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv3
from dsv3.ckpt.io import CheckpointError, SafetensorsFile
from dsv3.ckpt.pretrained import INDEX
from dsv3.tokenizer import Tokenizer, train_bpe

from conftest import random_model, tiny_config

# ---- helpers -------------------------------------------------------------------------------------------


def safetensors_bytes(header: dict | bytes, data: bytes, n: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def read_header(path) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def write_header(path, header: dict, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_bytes(header, data))


def snapshot(path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def f32(*shape) -> dict:
    return {"dtype": "F32", "shape": list(shape)}


def at(info: dict, b: int, e: int) -> dict:
    return {**info, "data_offsets": [b, e]}


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def x():
    return torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref_logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def fp32_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32")
    dsv3.save_pretrained(model, d, dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def sharded_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    dsv3.save_pretrained(model, d, dtype=torch.float32, max_shard_size="200KB")
    assert os.path.isfile(d / INDEX)
    return d


def loads_exactly(d, x, ref_logits) -> None:
    with torch.no_grad():
        assert torch.equal(dsv3.load_pretrained(d)(x), ref_logits)


# ---- 1. safetensors headers ----------------------------------------------------------------------------

Z16 = b"\0" * 16
# case -> (header, data, words the message must hold besides the file's path, header length override)
BAD_HEADERS = {
    "overlap": ({"a": at(f32(2), 0, 8), "b": at(f32(2), 4, 12)}, Z16, ["'a'", "'b'", "overlap"], None),
    "same_range": ({"a": at(f32(2), 0, 8), "b": at(f32(2), 0, 8)}, b"\0" * 8, ["'a'", "'b'", "overlap"], None),
    "overlap_listed_backwards": ({"b": at(f32(2), 4, 12), "a": at(f32(4), 0, 16)}, Z16, ["'a'", "'b'", "overlap"],
                                 None),
    "gap": ({"a": at(f32(2), 0, 8), "b": at(f32(2), 12, 20)}, b"\0" * 20, ["'b'", "gap"], None),
    "not_from_zero": ({"a": at(f32(2), 8, 16)}, Z16, ["'a'", "gap"], None),
    "bytes_after_last_tensor": ({"a": at(f32(2), 0, 8)}, Z16, ["8 bytes", "after"], None),
    "empty_tensor_inside_another": ({"a": at(f32(2), 0, 8), "z": at(f32(0), 4, 4)}, b"\0" * 8, ["'z'"], None),
    "past_end_of_file": ({"a": at(f32(4), 0, 16)}, b"\0" * 8, ["'a'", "truncated"], None),
    "far_past_end_of_file": ({"a": at(f32(2), 1 << 40, (1 << 40) + 8)}, b"\0" * 8, ["'a'"], None),
    "length_not_dtype_times_shape": ({"a": at(f32(3), 0, 8)}, b"\0" * 8, ["'a'", "need 12"], None),
    "begin_after_end": ({"a": at(f32(0), 8, 0)}, b"\0" * 8, ["'a'"], None),
    "negative_dims": ({"a": at(f32(-1, -2), 0, 8)}, b"\0" * 8, ["'a'", "shape"], None),
    "float_offset": ({"a": at(f32(2), 0, 8.0)}, b"\0" * 8, ["'a'"], None),
    "string_offset": ({"a": at(f32(2), 0, "8")}, b"\0" * 8, ["'a'"], None),
    "bool_dim": ({"a": at(f32(True), 0, 4)}, b"\0" * 4, ["'a'"], None),
    "three_offsets": ({"a": at(f32(2), 0, 8) | {"data_offsets": [0, 4, 8]}}, b"\0" * 8, ["'a'"], None),
    "unknown_dtype": ({"a": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, ["'a'", "F13"], None),
    "entry_not_object": ({"a": [0, 8]}, b"\0" * 8, ["'a'"], None),
    "metadata_not_strings": ({"__metadata__": {"format": 1}, "a": at(f32(2), 0, 8)}, b"\0" * 8, ["__metadata__"],
                             None),
    "metadata_a_list": ({"__metadata__": [], "a": at(f32(2), 0, 8)}, b"\0" * 8, ["__metadata__"], None),
    "header_length_past_end": ({"a": at(f32(2), 0, 8)}, b"\0" * 8, ["header length"], 1 << 20),
    "header_length_huge": ({"a": at(f32(2), 0, 8)}, b"\0" * 8, ["header length"], (1 << 64) - 1),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_header_is_refused_as_safetensors_refuses_it(case, tmp_path):
    header, data, needles, n = BAD_HEADERS[case]
    p = tmp_path / "bad.safetensors"
    p.write_bytes(safetensors_bytes(header, data, n))
    with pytest.raises(Exception):  # the official library refuses every one of these too
        with safe_open(str(p), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(p)  # at open, before any tensor is read
    msg = str(e.value)
    for s in [str(p)] + needles:
        assert s in msg, f"{s!r} not in {msg!r}"
    assert "\n" not in msg


def test_duplicate_tensor_name_is_refused(tmp_path):
    # JSON lets a key repeat and json.loads keeps the last one silently: which bytes would be the tensor?
    p = tmp_path / "dup.safetensors"
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    p.write_bytes(safetensors_bytes(f'{{"a":{entry},"a":{entry}}}'.encode(), b"\0" * 8))
    with pytest.raises(CheckpointError, match="'a'.*more than once") as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


GOOD_HEADERS = {
    "listed_out_of_order": {"b": at(f32(2), 8, 16), "a": at(f32(2), 0, 8)},
    "empty_tensors_between": {"a": at(f32(2), 0, 8), "z": at(f32(0, 3), 8, 8), "b": at(f32(2), 8, 16)},
    "scalar_and_metadata": {"__metadata__": {"format": "pt"}, "s": at(f32(), 0, 4), "t": at(f32(3), 4, 16)},
    "null_metadata": {"__metadata__": None, "a": at(f32(4), 0, 16)},
    "no_tensors": {},
}


@pytest.mark.parametrize("case", list(GOOD_HEADERS))
def test_valid_headers_still_read_as_safetensors_reads_them(case, tmp_path):
    header = GOOD_HEADERS[case]
    size = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
    p = tmp_path / "ok.safetensors"
    p.write_bytes(safetensors_bytes(header, bytes(range(size))))
    with safe_open(str(p), framework="pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    with SafetensorsFile(p) as sf:
        got = {k: sf.read(k) for k in sf.keys()}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_files_the_official_library_writes_still_read(tmp_path):
    t = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "e": torch.empty(0, 4), "h": torch.ones(2).half()}
    save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "x.safetensors") as sf:
        assert all(torch.equal(sf.read(k), v) for k, v in t.items())


def _overlap_two_norms(path) -> tuple[str, str]:
    """Point one norm's bytes at another's (same size): a reader that does not check would load the wrong
    weights silently."""
    header, data = read_header(path)
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    write_header(path, header, data)
    return a, b


def test_overlapping_tensors_in_a_checkpoint_are_refused_before_loading(fp32_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    a, b = _overlap_two_norms(d / "model.safetensors")
    before = snapshot(d)
    with pytest.raises(CheckpointError) as e:
        dsv3.load_pretrained(d)
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg and a in msg and b in msg and "overlap" in msg
    assert snapshot(d) == before


def test_overlapping_tensors_in_one_shard_are_refused(sharded_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    shard = weight_map["model.layers.1.input_layernorm.weight"]
    header, data = read_header(d / shard)
    names = [n for n in header if n != "__metadata__"]
    first, second = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    header[second]["data_offsets"][0] -= 4  # starts inside the first (and is 4 bytes too long)
    header[second]["data_offsets"][1] -= 4
    write_header(d / shard, header, data)
    with pytest.raises(CheckpointError) as e:
        dsv3.load_pretrained(d)
    msg = str(e.value)
    assert str(d / shard) in msg and first in msg and second in msg


# ---- 2. index entries outside the model directory ------------------------------------------------------

def _shard_of(d, name="model.norm.weight") -> tuple[dict, str]:
    index = json.loads((d / INDEX).read_text())
    return index, index["weight_map"][name]


def _repoint(d, index: dict, shard: str, new: str) -> None:
    index["weight_map"] = {n: (new if f == shard else f) for n, f in index["weight_map"].items()}
    (d / INDEX).write_text(json.dumps(index))


def _outside_relative(d):
    index, shard = _shard_of(d)
    shutil.copy(d / shard, d.parent / "outside.safetensors")
    _repoint(d, index, shard, "../outside.safetensors")
    os.unlink(d / shard)
    return "../outside.safetensors"


def _outside_absolute(d):
    index, shard = _shard_of(d)
    target = str(d.parent / "elsewhere" / "weights.safetensors")
    os.makedirs(os.path.dirname(target))
    shutil.copy(d / shard, target)
    _repoint(d, index, shard, target)
    os.unlink(d / shard)
    return target


def _outside_through_subdir(d):
    index, shard = _shard_of(d)
    shutil.copy(d / shard, d.parent / "outside.safetensors")
    os.mkdir(d / "sub")
    entry = "sub/../../outside.safetensors"
    _repoint(d, index, shard, entry)
    os.unlink(d / shard)
    return entry


def _symlink_outside(d):
    index, shard = _shard_of(d)
    shutil.move(d / shard, d.parent / "outside.safetensors")
    os.symlink(d.parent / "outside.safetensors", d / shard)
    return shard


def _symlinked_subdir_outside(d):
    index, shard = _shard_of(d)
    os.mkdir(d.parent / "other")
    shutil.move(d / shard, d.parent / "other" / shard)
    os.symlink(d.parent / "other", d / "linked")
    entry = f"linked/{shard}"
    _repoint(d, index, shard, entry)
    return entry


def _entry_not_a_string(d):
    index, shard = _shard_of(d)
    index["weight_map"]["model.norm.weight"] = 3
    (d / INDEX).write_text(json.dumps(index))
    return "model.norm.weight"


OUTSIDE = {
    "dotdot": _outside_relative,
    "absolute": _outside_absolute,
    "dotdot_through_subdir": _outside_through_subdir,
    "not_a_string": _entry_not_a_string,
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_index_entry_outside_the_directory_is_refused(case, sharded_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    entry = OUTSIDE[case](d)
    before = snapshot(d)
    with pytest.raises(CheckpointError) as e:
        dsv3.load_pretrained(d)
    msg = str(e.value)
    for s in (str(d / INDEX), entry):
        assert s in msg, f"{s!r} not in {msg!r}"
    assert "\n" not in msg
    assert snapshot(d) == before


@pytest.mark.parametrize("layout", [_symlink_outside, _symlinked_subdir_outside])
def test_symbolic_links_placed_in_the_directory_are_followed(layout, sharded_dir, tmp_path, x, ref_logits):
    """A link in the directory is someone's deliberate layout (a shard on another disk, a shared store): it
    is followed; only an index entry whose text leads out is refused."""
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    layout(d)
    loads_exactly(d, x, ref_logits)


def test_model_safetensors_symlinked_elsewhere_loads(fp32_dir, tmp_path, x, ref_logits):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    shutil.move(d / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", d / "model.safetensors")
    loads_exactly(d, x, ref_logits)


def test_links_inside_the_directory_and_a_linked_directory_still_load(sharded_dir, tmp_path, x, ref_logits):
    d = tmp_path / "m"
    shutil.copytree(sharded_dir, d)
    index, shard = _shard_of(d)
    os.mkdir(d / "weights")
    shutil.move(d / shard, d / "weights" / shard)
    os.symlink(os.path.join("weights", shard), d / shard)  # a relative link that stays inside
    loads_exactly(d, x, ref_logits)
    _repoint(d, index, shard, f"./weights/{shard}")  # a subdirectory entry, spelled with ./
    loads_exactly(d, x, ref_logits)
    os.symlink(d, tmp_path / "alias")  # the directory itself reached through a link
    loads_exactly(tmp_path / "alias", x, ref_logits)


def test_hugging_face_cache_layout_still_loads(sharded_dir, tmp_path, x, ref_logits):
    """huggingface_hub keeps each file once in blobs/ and links it from snapshots/<revision>/."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    os.makedirs(repo / "blobs")
    os.makedirs(snap)
    for i, fn in enumerate(sorted(os.listdir(sharded_dir))):
        blob = f"blob{i:04d}"
        shutil.copy(sharded_dir / fn, repo / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / fn)
    loads_exactly(snap, x, ref_logits)
    sub = snap / "v3-tiny"  # a model in a subfolder of the repository
    os.makedirs(sub)
    for fn in os.listdir(sharded_dir):
        os.symlink(os.path.join("..", os.readlink(snap / fn)), sub / fn)
    loads_exactly(sub, x, ref_logits)


# ---- 3. tokenizer files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe(["hello world, hello tokens\n"] * 20, vocab_size=300).save_pretrained(d)
    return d


BAD_TOKENIZERS = {
    "garbage_bytes": ("tokenizer.json", b"\x00\xff\xfe garbage \x89PNG\r\n"),
    "truncated_json": ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": {'),
    "json_list": ("tokenizer.json", b"[1, 2, 3]"),
    "wrong_model": ("tokenizer.json", b'{"model": 3}'),
    "empty": ("tokenizer.json", b""),
    "config_not_utf8": ("tokenizer_config.json", b'{"bos_token": "\xff\xfe"}'),
    "config_a_list": ("tokenizer_config.json", b'["bos_token"]'),
    "config_bad_special_token": ("tokenizer_config.json", b'{"bos_token": 7}'),
    "config_bad_template_list": ("tokenizer_config.json", b'{"chat_template": ["x"]}'),
    "template_not_utf8": ("chat_template.jinja", b"{{ bos_token }}\xff\xfe"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_unreadable_tokenizer_file_is_named(case, tok_dir, tmp_path):
    fn, content = BAD_TOKENIZERS[case]
    d = tmp_path / "tok"
    shutil.copytree(tok_dir, d)
    if fn == "chat_template.jinja":  # read only when tokenizer_config.json has no template
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / fn).write_bytes(content)
    with pytest.raises(ValueError) as e:
        Tokenizer.from_dir(d)
    msg = str(e.value)
    assert str(d / fn) in msg, msg
    assert "\n" not in msg


def test_bad_tokenizer_in_a_model_directory_names_it(fp32_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    (d / "tokenizer.json").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError) as e:
        dsv3.LLM(d)
    assert str(d / "tokenizer.json") in str(e.value)


def test_a_bad_tokenizer_is_reported_before_the_weights_load(fp32_dir, tmp_path, monkeypatch):
    import dsv3.infer.engine as engine
    d = tmp_path / "m"
    shutil.copytree(fp32_dir, d)
    (d / "tokenizer.json").write_bytes(b"\x00garbage")

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the tokenizer was read")
    monkeypatch.setattr(engine, "load_pretrained", no_load)
    with pytest.raises(ValueError, match="tokenizer.json"):
        dsv3.LLM(d)


def test_valid_tokenizer_still_loads(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.decode(tok.encode("hello world")) == "hello world"
