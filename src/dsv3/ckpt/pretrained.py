"""`load_pretrained` and `save_pretrained`: HF-layout model directories (config.json, one or many
*.safetensors with model.safetensors.index.json), BF16/FP32 or FP8 with 128x128 block scales.

Loading streams: the model is built on the meta device, given uninitialised memory in its final dtype and
device, and every tensor is read from disk straight into its parameter (converted on the way when the
dtypes differ), so peak memory stays near the model's own size. Every name and shape is checked against
the config; what is missing, unexpected or misshapen is reported by name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..model.layers import Linear
from ..model.model import DeepSeekV3, rope_inv_freq
from ..model.moe import Experts
from ..quant import fp8 as fp8q
from .hf import _LAYER_HF, hf_to_ours, is_quantizable, mtp_shared_names, ours_to_hf
from .io import (CheckpointError, PendingTensor, SafetensorsFile, atomic_open, atomic_write_json, fsync_dir,
                 write_safetensors)

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

_DTYPE_ALIASES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: torch.dtype | str | None, default: str = "bfloat16") -> torch.dtype:
    if dtype is None:
        dtype = default
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of bfloat16, float16, float32")
    return _DTYPE_ALIASES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- reading a checkpoint directory --------------------------------------------------------------------

class CheckpointDir:
    """The safetensors files of a model directory and where each tensor lives."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
            by_file: dict[str, list[str]] = {}
            for name, fn in weight_map.items():
                if not isinstance(fn, str) or not fn:
                    raise CheckpointError(f"{index_path}: weight_map entry {name!r} is {fn!r}, not a file name")
                by_file.setdefault(fn, []).append(name)
            for fn, names in by_file.items():
                where = f"places {names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                _check_inside(path, fn, f"{index_path} {where} in {fn!r}")
            files = sorted(by_file)
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{index_path} lists shard(s) that are not in {path}: {', '.join(missing)}")
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map, files = None, ["model.safetensors"]
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
            weight_map = None
            if not files:
                bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
                hint = (" It has pickled PyTorch weights, which dsv3 never loads (unpickling runs code); "
                        "convert them to safetensors first.") if bins else ""
                raise CheckpointError(f"no *.safetensors weights in {path}.{hint}")
        if weight_map is None:
            for fn in files:
                _check_inside(path, fn, os.path.join(path, fn))
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        try:
            for fn in files:
                sf = SafetensorsFile(os.path.join(path, fn))
                self.files[fn] = sf
                for name in sf.keys():
                    if name in self.where:
                        raise CheckpointError(f"tensor {name!r} appears in both {self.where[name].path} and {sf.path}")
                    self.where[name] = sf
            if weight_map is not None:
                for name, fn in weight_map.items():
                    if name not in self.files[fn]:
                        raise CheckpointError(f"{index_path} places {name!r} in {fn}, which does not hold it")
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        """All tensor names, in file and offset order (sequential reads)."""
        return [n for sf in self.files.values() for n in sorted(sf.keys(), key=lambda n: sf.info(n).begin)]

    def info(self, name: str):
        return self.where[name].info(name)

    def read(self, name: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.where[name].read(name, out, rows)

    def total_bytes(self) -> int:
        return sum(sf.info(n).nbytes for sf in self.files.values() for n in sf.keys())

    def close(self) -> None:
        for sf in self.files.values():
            sf.close()


def _check_inside(path: str, fn: str, what: str) -> None:
    """An index entry (or a file name) names a file of the model directory: one that leads elsewhere by its
    text ("../x", "/abs/x", "sub/../../x") is refused, naming `what`. Symbolic links in the directory are
    followed: someone placed them there on purpose (the Hugging Face cache links snapshots to blobs, a
    local_dir or a shared-storage layout links to files elsewhere); a text in a JSON file is no such choice."""
    if os.path.isabs(fn) or os.path.normpath(fn).split(os.sep)[0] == os.pardir:
        raise CheckpointError(f"{what}: a path outside the model directory {path}; weights are read only "
                              "from files inside it")


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, *, fp8: bool | None = None,
                    progress: bool | None = None, shard=None) -> DeepSeekV3:
    """Load a DeepSeek-V3/V2 model directory.

    dtype: of every non-FP8 tensor (default: config.json's `torch_dtype`); the gate's balancing bias stays
        float32. device: where the weights go (default CPU).
    fp8: None keeps FP8 weights as they are stored (dequantised per layer at run time); False dequantises
        them to `dtype` at load; True also quantises a BF16/FP32 checkpoint's projections to FP8.
    shard: this process's part of a model-parallel model (parallel/inference.py's `Sharding`): the split
        tensors get their local shapes and only this process's slices are read (its experts, its rows).

    A directory in the official demo's model-parallel layout (`model{i}-mp{N}.safetensors`, written by
    `dsv3 convert --model-parallel N`) loads whole, or with a shard of tp = ep = N from its rank's files alone.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    config = ModelConfig.from_hf(path)
    dtype = resolve_dtype(dtype, config.torch_dtype)
    device = torch.device(device or "cpu")
    from .model_parallel import is_model_parallel, open_model_parallel
    if is_model_parallel(path):  # the official demo's model{i}-mp{N} files (ckpt/model_parallel.py)
        ckpt, shard = open_model_parallel(path, config, shard)
    else:
        ckpt = CheckpointDir(path)
    try:
        model = _load(ckpt, config, dtype, device, fp8, progress, shard)
    finally:
        ckpt.close()
    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        try:
            with open(gen, encoding="utf-8") as f:
                model.generation_config = json.load(f)
        except json.JSONDecodeError as e:
            warnings.warn(f"{gen} is not valid JSON and was ignored: {e}")
    return model.eval()


def _load(ckpt: CheckpointDir, config: ModelConfig, dtype: torch.dtype, device: torch.device,
          fp8: bool | None, progress: bool | None, shard=None) -> DeepSeekV3:
    L, D = config.num_hidden_layers, config.num_nextn_predict_layers
    names = ckpt.names()
    layer_ids = {int(m.group(1)) for n in names if (m := _LAYER_HF.match(n))}
    if D and not any(L <= i < L + D for i in layer_ids):
        warnings.warn(f"{ckpt.path}: config.json has num_nextn_predict_layers={D} but the checkpoint holds no "
                      f"MTP weights (model.layers.{L}.*); loading without MTP modules")
        config = config.replace(num_nextn_predict_layers=0)
        D = 0
    if fp8 is not None and not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be None, True or False, not {fp8!r}")

    with torch.device("meta"):
        model = DeepSeekV3(config)
    model.to(dtype)
    for name, mod in model.named_modules():  # decide FP8 storage per projection, from the checkpoint
        if isinstance(mod, Linear):
            hf = ours_to_hf(f"{name}.weight", L)[0][0]
        elif isinstance(mod, Experts):  # (the first expert stored: a model-parallel rank's file holds its own)
            template = ours_to_hf(f"{name}.w1", L)[0][0]
            hf = next((h for e in range(mod.n_experts) if (h := template.format(e=e)) in ckpt.where),
                      template.format(e=0))
        else:
            continue
        stored_fp8 = hf in ckpt.where and ckpt.info(hf).dtype == fp8q.FP8
        if (fp8 is None and stored_fp8) or (fp8 is True and is_quantizable(hf)):
            mod.to_fp8()
    if shard is not None:
        shard.shrink(model)  # the split tensors take their local shapes
    model.to_empty(device=device)
    with torch.no_grad():
        model.rope.inv_freq.copy_(rope_inv_freq(config))  # not in checkpoints: computed

    state = model.state_dict(keep_vars=True)
    expected = set()
    for ours, t in state.items():
        if ours == "head.weight" and config.tie_word_embeddings:
            continue
        experts = (shard.experts_of(ours) if shard is not None else range(t.shape[0])) if ".experts.w" in ours else [None]
        expected.update((ours, e) for e in experts)
    shared_copies = dict(mtp_shared_names(L, D))
    loaded, consumed, unexpected = set(), set(), []
    disable = (not progress) if progress is not None else (ckpt.total_bytes() < 2**30 or None)
    bar = tqdm(total=ckpt.total_bytes(), unit="B", unit_scale=True, desc="loading weights", disable=disable)

    def where(hf: str) -> str:
        return f"{ckpt.where[hf].path}: tensor {hf!r}"

    def dest_index(ours: str, e: int) -> int:
        return e if shard is None else shard.local_expert(ours, e)

    def cut(ours: str):  # (dim, lo, hi) of this process's slice of a split tensor, else None
        return None if shard is None else shard.cut(ours)

    def read(hf: str, ours: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or this process's slice of it: rows by a ranged read, columns cut from the whole."""
        c = cut(ours)
        if c is None:
            return ckpt.read(hf, out)
        dim, lo, hi = c
        if dim == 0:
            return ckpt.read(hf, out, rows=(lo, hi))
        part = ckpt.read(hf).narrow(dim, lo, hi - lo)
        return part if out is None else out.copy_(part)

    def full_shape(ours: str, shape) -> list[int]:
        """A local shape as the whole tensor's (the split dimension's size times the processes)."""
        shape, c = list(shape), cut(ours)
        if c is not None:
            shape[c[0]] = shard.full_size(ours, shape[c[0]])
        return shape

    def check_shape(hf: str, want: torch.Size | tuple, ours: str | None = None) -> None:
        got = ckpt.info(hf).shape
        if ours is not None:
            want = full_shape(ours, want)
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{where(hf)} has shape {list(got)}, but config.json implies {list(want)} "
                                  "(does the checkpoint belong to this config?)")

    with torch.no_grad():
        for hf in names:
            info = ckpt.info(hf)
            bar.update(info.nbytes)
            if hf in consumed:
                continue
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{where(hf)} has dtype {info.dtype}; model weights are floating point")
            if hf in shared_copies:  # the MTP module's copy of the embedding or head: shared, not stored twice
                check_shape(hf, state[shared_copies[hf]].shape, shared_copies[hf])
                continue
            try:
                mapped = hf_to_ours(hf, L)
            except KeyError:
                unexpected.append(hf)
                continue
            if mapped is None or mapped[0] not in state:
                if mapped is not None and mapped[0].endswith("_scale_inv") and hf[:-len("_scale_inv")] in ckpt.where:
                    continue  # the scale of a weight we dequantise: read together with its weight
                unexpected.append(hf)
                continue
            ours, e = mapped
            if e is not None and shard is not None and e not in shard.experts_of(ours):
                continue  # another process's expert: not read
            dest = state[ours] if e is None else state[ours][dest_index(ours, e)]
            if info.dtype == fp8q.FP8 and dest.dtype != fp8q.FP8:  # dequantise at load
                scale_name = hf + "_scale_inv"
                if scale_name not in ckpt.where:
                    raise CheckpointError(f"{where(hf)} is FP8 but {scale_name!r} is missing")
                check_shape(hf, dest.shape, ours)
                check_shape(scale_name, fp8q.scale_shape(full_shape(ours, dest.shape)))
                w = fp8q.weight_dequant(ckpt.read(hf), ckpt.read(scale_name), torch.float32)
                c = cut(ours)
                dest.copy_(w if c is None else w.narrow(c[0], c[1], c[2] - c[1]))
                consumed.add(scale_name)
            elif dest.dtype == fp8q.FP8 and info.dtype != fp8q.FP8 and not hf.endswith("_scale_inv"):
                check_shape(hf, dest.shape, ours)  # quantise at load (this process's slice: see Sharding.cut)
                q, s = fp8q.weight_quant(read(hf, ours))
                dest.copy_(q)
                scale_ours = ours + "_scale_inv" if e is not None else ours.removesuffix("weight") + "weight_scale_inv"
                (state[scale_ours] if e is None else state[scale_ours][dest_index(ours, e)]).copy_(s)
                loaded.add((scale_ours, e))
            else:
                check_shape(hf, dest.shape, ours)
                read(hf, ours, out=dest)
            loaded.add((ours, e))
    bar.close()

    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise CheckpointError(f"{ckpt.path}: tensor(s) not part of the model that config.json describes: {shown}")
    missing = expected - loaded
    if shard is not None and not missing:
        with torch.no_grad():
            shard.fill_replicas(model)  # an expert held twice here was read once
    if missing:
        hf_missing = sorted(_hf_name(o, e, L) for o, e in missing)
        shown = ", ".join(hf_missing[:8]) + (f" and {len(hf_missing) - 8} more" if len(hf_missing) > 8 else "")
        raise CheckpointError(f"{ckpt.path}: missing tensor(s): {shown}")
    return model


def _hf_name(ours: str, e: int | None, num_layers: int) -> str:
    name = ours_to_hf(ours, num_layers)[0][0]
    return name.format(e=e) if e is not None else name


# ---- writing -------------------------------------------------------------------------------------------

def _scale_of(ours: str, state: dict) -> torch.Tensor | None:
    key = ours + "_scale_inv" if ".experts.w" in ours else ours.removesuffix("weight") + "weight_scale_inv"
    return state.get(key)


def _layer_order(hf: str) -> tuple:
    m = _LAYER_HF.match(hf)
    return (0, -1, hf) if hf.startswith("model.embed") else (1, int(m.group(1)), hf) if m else (2, 0, hf)


def checkpoint_entries(model: DeepSeekV3, dtype: torch.dtype, fp8: bool,
                       scale_fmt: str | None = None) -> list[PendingTensor]:
    """The tensors of the HF checkpoint of `model`, each produced on demand, in layer order."""
    config, L = model.config, model.config.num_hidden_layers
    state = model.state_dict()
    entries: list[PendingTensor] = []

    def add(hf: str, src: torch.Tensor, src_scale: torch.Tensor | None) -> None:
        if fp8 and is_quantizable(hf):
            if src_scale is not None and scale_fmt is None:  # already FP8: written as it is
                entries.append(PendingTensor(hf, fp8q.FP8, tuple(src.shape), lambda: src))
                entries.append(PendingTensor(hf + "_scale_inv", torch.float32, tuple(src_scale.shape),
                                             lambda: src_scale))
                return
            entries.extend(fp8_pair(hf, tuple(src.shape), lambda: src if src_scale is None else
                                    fp8q.weight_dequant(src, src_scale, torch.float32), scale_fmt))
            return
        out = torch.float32 if hf.endswith("e_score_correction_bias") else dtype
        if src_scale is not None:
            entries.append(PendingTensor(hf, out, tuple(src.shape), lambda: fp8q.weight_dequant(src, src_scale, out)))
        else:
            entries.append(PendingTensor(hf, out, tuple(src.shape), lambda: src))

    for ours, t in state.items():
        if ours.endswith("_scale_inv") or (ours == "head.weight" and config.tie_word_embeddings):
            continue
        scale = _scale_of(ours, state)
        for hf, expert in ours_to_hf(ours, L):
            if expert is None:
                add(hf, t, scale)
            else:
                for e in range(t.shape[0]):
                    add(hf.format(e=e), t[e], None if scale is None else scale[e])
    for hf, ours in mtp_shared_names(L, config.num_nextn_predict_layers):
        add(hf, state[ours], None)
    # keep each weight next to its scale: sort by layer, then by name with the scale right after the weight
    entries.sort(key=lambda p: _layer_order(p.name.removesuffix("_scale_inv")) + (p.name.endswith("_scale_inv"),))
    return entries


def fp8_pair(hf: str, shape: tuple[int, ...], get_weight, scale_fmt: str | None = None) -> list[PendingTensor]:
    """The two entries of a weight written in FP8: `hf` (e4m3) then `hf_scale_inv` (float32 block scales).
    The weight is quantised once, when the first is written; the scale is handed to the second."""
    stash = {}

    def weight() -> torch.Tensor:
        stash["q"], stash["s"] = fp8q.weight_quant(get_weight(), scale_fmt=scale_fmt)
        return stash.pop("q")

    return [PendingTensor(hf, fp8q.FP8, shape, weight),
            PendingTensor(hf + "_scale_inv", torch.float32, fp8q.scale_shape(shape), lambda: stash.pop("s"))]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def shard(entries: list[PendingTensor], max_shard_size: int) -> list[list[PendingTensor]]:
    """Cut the entries into consecutive shards of at most max_shard_size bytes (a larger tensor alone);
    a weight and its scale stay in one shard."""
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for i, p in enumerate(entries):
        follows_weight = p.name.endswith("_scale_inv")
        if shards[-1] and not follows_weight and size + p.nbytes + _scale_bytes(entries, i) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def _scale_bytes(entries: list[PendingTensor], i: int) -> int:
    nxt = entries[i + 1] if i + 1 < len(entries) else None
    return nxt.nbytes if nxt is not None and nxt.name == entries[i].name + "_scale_inv" else 0


def write_checkpoint(path: str, entries: list[PendingTensor], max_shard_size: int | str = "5GB",
                     progress: bool | None = None) -> list[str]:
    """Write entries as model.safetensors, or as model-0000i-of-0000n.safetensors + the index when they do
    not fit one shard. -> the file names. See `commit_weights` for what a failure or a kill leaves."""
    shards = shard(entries, _parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(p.nbytes for p in entries)
    disable = (not progress) if progress is not None else (total < 2**30 or None)
    os.makedirs(path, exist_ok=True)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=disable) as bar:
        staged = stage_weights(path, names, shards, lambda group: bar.update(sum(p.nbytes for p in group)))
    index = None
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {p.name: fn for fn, group in zip(names, shards) for p in group}}
    commit_weights(path, staged, index)
    return names


def stage_weights(path: str, names: list[str], shards: list[list[PendingTensor]], done=None) -> list[tuple[str, str]]:
    """Write each shard under a hidden staging name beside its final one. -> [(staged path, final name)].
    If any shard fails, the staged ones are removed and nothing else in `path` has changed."""
    staged: list[tuple[str, str]] = []
    try:
        for fn, group in zip(names, shards):
            tmp = os.path.join(path, f".{fn}.staged")
            write_safetensors(tmp, group)
            staged.append((tmp, fn))
            if done is not None:
                done(group)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return staged


# a model's weight files (what a new save replaces; an adapter's .safetensors is not one), the model-parallel
# layout's (model{i}-mp{N}[-mtp]) included
MODEL_WEIGHTS = re.compile(r"^model(-\d+-of-\d+|\d+-mp\d+(-mtp)?)?\.safetensors$")


def commit_weights(path: str, staged: list[tuple[str, str]], index: dict | None) -> None:
    """Put staged shards in place, in an order that keeps the directory loadable after a kill at any point:
    (1) remove the old index (the loader then reads model.safetensors, else every shard: still the old
    model); (2) rename the new shards in (a new model.safetensors wins over stale shards); (3) write the new
    index; (4) delete weight files that are not part of the new checkpoint. One window remains: a sharded
    save over a sharded checkpoint with the same shard names, killed between two renames of step 2."""
    index_path = os.path.join(path, INDEX)
    if os.path.exists(index_path):
        os.unlink(index_path)
    for tmp, fn in staged:
        os.replace(tmp, os.path.join(path, fn))
    fsync_dir(path)
    if index is not None:
        atomic_write_json(index_path, index)
    keep = {fn for _, fn in staged}
    for stale in glob.glob(os.path.join(path, "model*.safetensors")):  # an old model's weights; not an adapter's
        if os.path.basename(stale) not in keep and MODEL_WEIGHTS.match(os.path.basename(stale)):
            os.unlink(stale)


def save_pretrained(model: DeepSeekV3, path: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
                    fp8: bool = False, tokenizer=None, *, max_shard_size: int | str = "5GB",
                    scale_fmt: str | None = None, progress: bool | None = None) -> None:
    """Write `model` as an HF model directory that transformers and `load_pretrained` both read: weights
    (MTP modules included) in `dtype`, or with fp8=True every projection in FP8 e4m3 with 128x128 block
    scales as the official release; config.json, generation_config.json and, given `tokenizer` (a directory
    or an object with `save_pretrained(dir)`), the tokenizer files. Every file is written atomically."""
    path = os.fspath(path)
    dtype = resolve_dtype(dtype)
    entries = checkpoint_entries(model, dtype, fp8, scale_fmt)
    write_checkpoint(path, entries, max_shard_size, progress)
    config = model.config.replace(torch_dtype=dtype_name(dtype), quantization_config=None)
    if fp8:
        config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
        if scale_fmt:
            config.quantization_config["scale_fmt"] = scale_fmt
    config.save(os.path.join(path, "config.json"))
    gen = dict(getattr(model, "generation_config", None) or {})
    gen.update(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    atomic_write_json(os.path.join(path, "generation_config.json"), gen)
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def save_tokenizer(tokenizer, path: str) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
        return
    src = os.fspath(tokenizer)
    if not os.path.isdir(src):
        raise ValueError(f"tokenizer must be a directory or have save_pretrained(); got {tokenizer!r}")
    copy_files(src, path, [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))])


def copy_files(src: str, dst: str, names: Iterable[str]) -> None:
    """Copy files atomically (skipping a file onto itself)."""
    for fn in names:
        s, d = os.path.join(src, fn), os.path.join(dst, fn)
        if os.path.exists(d) and os.path.samefile(s, d):
            continue
        with open(s, "rb") as fin, atomic_open(d, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (each shared tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["load_pretrained", "save_pretrained", "CheckpointError", "model_bytes", "resolve_dtype"]
