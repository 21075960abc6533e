"""The official DeepSeek-V3 demo's model-parallel checkpoint layout: one file per rank, `model{i}-mp{N}.safetensors`,
as its inference/convert.py writes it and its generate.py reads it under torchrun (rank i opens only file i).

Names, from the HF ones: `model.` dropped, self_attn -> attn, mlp -> ffn, weight_scale_inv -> scale,
e_score_correction_bias -> bias, and the tensor's module (the name's second-to-last part) renamed by `_MODULES`:

    model.layers.3.mlp.experts.5.gate_proj.weight_scale_inv   ->   layers.3.ffn.experts.5.w1.scale

Splits over the N ranks (the demo's ParallelEmbedding, Column- and RowParallelLinear; `Sharding`'s with tp = ep = N):
    rows (dim 0)       embed, head, wq or wq_b, wkv_b, w1 and w3 (dense MLP and shared experts)
    columns (dim 1)    wo, w2 (dense MLP and shared experts)
    routed experts     whole, expert e in the file of rank e // (E/N)
    the rest           whole in every file: norms, wq_a, wkv_a, the gate and its bias
An FP8 weight's `scale` (one per 128x128 block) is split with its weight.

Where dsv3 departs from the demo's script, and why:
- MTP. The demo drops layer num_hidden_layers (its model has no MTP module). dsv3 writes it beside, to
  `model{i}-mp{N}-mtp.safetensors`, named and split the same way (its enorm, hnorm, eh_proj and shared_head.norm
  whole; its copies of the embedding and head left out: they are the main model's), so the whole model comes back and
  MTP speculation works. The demo never opens those files.
- FP8 slices that would cut 128x128 blocks (a slice width not a multiple of 128): no per-rank scale tensor can
  describe them (the demo's script asserts, or silently gives a rank the scales of other blocks). dsv3 writes such a
  weight's slices dequantised in float32, without a scale: the values every load dtype rounds from, as `Sharding`
  holds them when it shards an HF directory. dsv3 reads those files; the demo cannot.
- Streaming: each input tensor is read once and its slices written to every rank's file as it passes (the demo holds
  the whole model in memory).
- Beside the weights: config.json and the input's other files (tokenizer, generation_config.json), and
  `model_args.json`, the demo's ModelArgs for its generate.py --config.

Reading (load_pretrained, through `open_model_parallel`): with a Sharding(config, rank, N, tp=N, ep=N) only rank's
own files are opened, and they hold exactly its slices; without one, the N files are put together into the whole
model's tensors (`AssembledFiles`, which also lets a model-parallel directory be the input of a conversion).
"""

from __future__ import annotations

import json
import os
import re
import struct

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..quant import fp8 as fp8q
from .hf import _LAYER_HF, hf_to_ours
from .io import DTYPE_NAMES, CheckpointError, SafetensorsFile, TensorInfo

# the demo's renames of a tensor's module; modules only MTP has (enorm, hnorm, eh_proj) keep their names
_MODULES = {
    "embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    "gate": "gate", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "norm": "norm", "lm_head": "head",
}
_MODULES_REV = {v: k for k, v in _MODULES.items()}
_PARTS = {"self_attn": "attn", "mlp": "ffn", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}

MP_FILE = re.compile(r"^model(\d+)-mp(\d+)(-mtp)?\.safetensors$")


def rank_file(rank: int, n: int, mtp: bool = False) -> str:
    return f"model{rank}-mp{n}{'-mtp' if mtp else ''}.safetensors"


def demo_name(hf: str) -> str:
    """An HF tensor name -> the demo's (`model.layers.0.self_attn.q_b_proj.weight` -> `layers.0.attn.wq_b.weight`)."""
    parts = [_PARTS.get(p, p) for p in hf.removeprefix("model.").split(".")]
    parts[-2] = _MODULES.get(parts[-2], parts[-2])
    return ".".join(parts)


def hf_name(demo: str) -> str:
    """The inverse of `demo_name` (for a name it produces)."""
    *path, module, leaf = demo.split(".")
    leaf = {"scale": "weight_scale_inv"}.get(leaf, leaf)
    if module == "gate" and leaf == "bias":
        leaf = "e_score_correction_bias"
    path = [{"attn": "self_attn", "ffn": "mlp"}.get(p, p) for p in path]
    name = ".".join(path + [_MODULES_REV.get(module, module), leaf])
    return name if name == "lm_head.weight" else "model." + name


def layout_size(path: str) -> int | None:
    """N of the `model{i}-mp{N}.safetensors` files in a directory; None when it has none."""
    sizes = sorted({int(m.group(2)) for f in os.listdir(path) if (m := MP_FILE.match(f))})
    if len(sizes) > 1:
        raise CheckpointError(f"{path} holds model-parallel files for {len(sizes)} sizes (" +
                              ", ".join(f"model0-mp{n}" for n in sizes) + "): keep the files of one")
    return sizes[0] if sizes else None


def is_model_parallel(path: str) -> bool:
    """A directory in this layout: model{i}-mp{N} files, and no HF weights (an index or model.safetensors win)."""
    from .pretrained import INDEX
    return (not any(os.path.isfile(os.path.join(path, f)) for f in (INDEX, "model.safetensors"))
            and layout_size(path) is not None)


def check_model_parallel(config: ModelConfig, n: int) -> None:
    """Raise ValueError unless the model splits over n ranks (parallel/inference.py's check_layout with
    tp = ep = n: every rank holds 1/n of the heads, of the vocabulary and of the routed experts)."""
    if n < 1:
        raise ValueError(f"--model-parallel {n}: expected a number of processes >= 1")
    if n == 1:
        return
    if not config.n_routed_experts:
        raise ValueError(f"--model-parallel {n}: the layout divides the routed experts over the ranks, and this model "
                         "has none (n_routed_experts is null); shard a dense model at load time with --tp instead")
    bad = [f"{k}={v}" for k, v in (("num_attention_heads", config.num_attention_heads),
                                    ("vocab_size", config.vocab_size),
                                    ("n_routed_experts", config.n_routed_experts)) if v % n]
    if bad:
        raise ValueError(f"--model-parallel {n} needs {', '.join(bad)} divisible by {n}")


class Layout:
    """Where each tensor of a model goes over n ranks."""

    def __init__(self, config: ModelConfig, n: int):
        from ..parallel.inference import Sharding
        check_model_parallel(config, n)
        self.config, self.n, self.L = config, n, config.num_hidden_layers
        self.experts_per_rank = (config.n_routed_experts or 0) // n
        self._dims = Sharding(config, 0, n, n, n)  # (its split_dim: the rule the loader shards by)

    def ours(self, hf: str) -> tuple[str, int | None]:
        """Our parameter name and expert index; an MTP module's copy of the embedding or head as the original.
        KeyError for a name that is no tensor of a DeepSeek-V3 checkpoint."""
        mapped = hf_to_ours(hf, self.L)
        if mapped is None:
            return ("embed.weight" if hf.endswith("embed_tokens.weight") else "head.weight"), None
        return mapped

    def split_dim(self, hf: str) -> int | None:
        """The dimension split over the ranks; None for a tensor held whole (by every rank, or an expert's by one)."""
        ours, e = self.ours(hf)
        return None if e is not None else self._dims.split_dim(ours)

    def ranks(self, hf: str) -> list[int]:
        """The ranks whose files hold (a slice of) the tensor."""
        e = self.ours(hf)[1]
        return list(range(self.n)) if e is None else [e // self.experts_per_rank]

    def is_mtp(self, hf: str) -> bool:
        m = _LAYER_HF.match(hf)
        return m is not None and int(m.group(1)) >= self.L


def cuts_blocks(shape, dim: int | None, n: int) -> bool:
    """Whether 1/n of an FP8 weight along dim cuts its 128x128 scale blocks."""
    return dim is not None and (shape[dim] // n) % fp8q.BLOCK != 0


# ---- writing ----------------------------------------------------------------------------------------------------

class _Piece:
    """One input tensor's share of the output: written to `ranks` (a slice along `dim` each, or the whole)."""

    def __init__(self, hf: str, dtype: torch.dtype, shape: tuple, dim: int | None, ranks: list[int], mtp: bool,
                 dequantise: bool, n: int):
        self.hf, self.dtype, self.dim, self.ranks, self.mtp, self.dequantise = hf, dtype, dim, ranks, mtp, dequantise
        self.local = tuple(s // n if d == dim else s for d, s in enumerate(shape))


def _plan(ckpt, layout: Layout) -> list[_Piece]:
    """Each tensor of an HF-named checkpoint view, checked against the config (names, shapes, FP8 scales, sizes that
    split), and where it goes; in the checkpoint's order. Nothing is read but the headers."""
    want = expected_shapes(layout.config)
    names = ckpt.names()
    present = set(names)
    has_mtp = any(layout.is_mtp(hf) for hf in names)
    fp8 = {hf for hf in names if ckpt.info(hf).dtype == fp8q.FP8}
    pieces = []
    for hf in names:
        info = ckpt.info(hf)
        where = f"{ckpt.where[hf].path}: tensor {hf!r}"
        weight = hf.removesuffix("_scale_inv")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{where} has dtype {info.dtype}; model weights are floating point")
        if weight not in want:
            raise CheckpointError(f"{where} is not part of the model that config.json describes")
        if hf != weight and weight not in fp8:
            raise CheckpointError(f"{where} is a block scale, but {weight!r} is not an FP8 weight")
        shape = fp8q.scale_shape(want[weight]) if hf != weight else want[weight]
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{where} has shape {list(info.shape)}, but config.json implies {list(shape)}")
        if hf in fp8 and hf + "_scale_inv" not in present:
            raise CheckpointError(f"{where} is FP8 but {hf + '_scale_inv'!r} is missing")
        if layout.ours(weight)[0] in ("embed.weight", "head.weight") and layout.is_mtp(hf):
            continue  # an MTP module's copy of the embedding or head: the main model's
        dim = layout.split_dim(hf)
        dequantise = weight in fp8 and cuts_blocks(want[weight], dim, layout.n)
        if dequantise and hf != weight:
            continue  # (its weight is written dequantised)
        if dim is not None and info.shape[dim] % layout.n:
            raise CheckpointError(f"{where} has {info.shape[dim]} {'rows' if dim == 0 else 'columns'}, which do not "
                                  f"split over --model-parallel {layout.n}")
        pieces.append(_Piece(hf, torch.float32 if dequantise else info.dtype, info.shape, dim, layout.ranks(hf),
                             layout.is_mtp(hf), dequantise, layout.n))
    missing = [hf for hf in want if hf not in present and (has_mtp or not layout.is_mtp(hf))
               and not (layout.is_mtp(hf) and layout.ours(hf)[0] in ("embed.weight", "head.weight"))]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{ckpt.path}: missing tensor(s): {shown}")
    return pieces


def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """HF name -> shape of every weight of the model (no scales), MTP modules' copies of embedding and head included."""
    from ..model.model import DeepSeekV3
    from .pretrained import checkpoint_entries
    with torch.device("meta"):
        model = DeepSeekV3(config)
    return {p.name: tuple(p.shape) for p in checkpoint_entries(model, torch.bfloat16, fp8=False)}


class _StreamWriter:
    """A safetensors file written as a stream: the header declares every entry, then their bytes follow in order."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
        self.path, self._next = path, iter(entries)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, x: torch.Tensor) -> None:
        want = next(self._next)
        assert want == (name, x.dtype, tuple(x.shape)), f"{self.path}: {want=} {name=} {x.dtype=} {tuple(x.shape)=}"
        x = x.detach().to("cpu").contiguous()
        if x.numel():
            self._f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))

    def finish(self) -> None:
        """Every declared entry written: flush it to disk and close."""
        assert next(self._next, None) is None, f"{self.path}: entries left unwritten"
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def close(self) -> None:
        self._f.close()


def write_model_parallel(ckpt, layout: Layout, out: str, progress: bool | None = None) -> list[str]:
    """Write the layout's files for every rank into the directory `out`, reading each tensor of `ckpt` (an HF-named
    view: CheckpointDir or AssembledFiles) once. -> the HF names of the FP8 weights written dequantised."""
    pieces = _plan(ckpt, layout)
    files: dict[tuple[int, bool], list[_Piece]] = {}
    for p in pieces:
        for r in p.ranks:
            files.setdefault((r, p.mtp), []).append(p)
    writers: dict[tuple[int, bool], _StreamWriter] = {}
    disable = (not progress) if progress is not None else (ckpt.total_bytes() < 2**30 or None)
    try:
        for (r, mtp), group in sorted(files.items()):
            writers[r, mtp] = _StreamWriter(os.path.join(out, rank_file(r, layout.n, mtp)),
                                            [(demo_name(p.hf), p.dtype, p.local) for p in group])
        with tqdm(total=sum(ckpt.info(p.hf).nbytes for p in pieces), unit="B", unit_scale=True,
                  desc=f"model parallel {layout.n}", disable=disable) as bar:
            for p in pieces:
                t = ckpt.read(p.hf)
                if p.dequantise:
                    t = fp8q.weight_dequant(t, ckpt.read(p.hf + "_scale_inv"), torch.float32)
                for r in p.ranks:
                    part = t if p.dim is None else t.narrow(p.dim, r * p.local[p.dim], p.local[p.dim])
                    writers[r, p.mtp].write(demo_name(p.hf), part)
                bar.update(ckpt.info(p.hf).nbytes)
        for w in writers.values():
            w.finish()
    finally:  # (on an error the files are left incomplete: model_output discards the directory)
        for w in writers.values():
            w.close()
    return [p.hf for p in pieces if p.dequantise]


def model_args(config: ModelConfig) -> dict:
    """The demo's ModelArgs for this model (its generate.py --config): the same sizes under its names."""
    qc = config.quantization_config or {}
    yarn = config.rope_type == "yarn"
    args = {
        "vocab_size": config.vocab_size, "dim": config.hidden_size, "inter_dim": config.intermediate_size,
        "moe_inter_dim": config.moe_intermediate_size, "n_layers": config.num_hidden_layers,
        "n_dense_layers": config.first_k_dense_replace if config.n_routed_experts else config.num_hidden_layers,
        "n_heads": config.num_attention_heads, "n_routed_experts": config.n_routed_experts or 0,
        "n_shared_experts": config.n_shared_experts, "n_activated_experts": config.num_experts_per_tok,
        "n_expert_groups": config.n_group, "n_limited_groups": config.topk_group,
        "route_scale": config.routed_scaling_factor, "score_func": config.scoring_func,
        "q_lora_rank": config.q_lora_rank or 0, "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim, "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim, "dtype": "fp8" if qc else "bf16",
        # the demo applies YaRN whenever its max_seq_len exceeds original_seq_len: a factor of 1 leaves RoPE as it is
        "original_seq_len": config.original_max_position_embeddings if yarn else config.max_position_embeddings,
        "rope_theta": config.rope_theta, "rope_factor": config.rope_factor if yarn else 1.0,
        "beta_fast": config.beta_fast, "beta_slow": config.beta_slow, "mscale": config.mscale_all_dim,
    }
    if qc.get("scale_fmt"):
        args["scale_fmt"] = qc["scale_fmt"]
    return args


# ---- reading ----------------------------------------------------------------------------------------------------

class RankFiles:
    """One rank's files (`model{r}-mp{N}.safetensors` and its -mtp file) under HF names: the interface of
    pretrained.CheckpointDir, with this rank's slices as the tensors."""

    def __init__(self, path: str, layout: Layout, rank: int):
        self.layout, self.rank = layout, rank
        self.path = os.path.join(path, rank_file(rank, layout.n))
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{path} holds the layout of {layout.n} processes, but {rank_file(rank, layout.n)} "
                                  "is missing")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        self._demo: dict[str, str] = {}
        try:
            for mtp in (False, True):
                fn = rank_file(rank, layout.n, mtp)
                if os.path.isfile(os.path.join(path, fn)):
                    self._add(SafetensorsFile(os.path.join(path, fn)))
        except BaseException:
            self.close()
            raise

    def _add(self, sf: SafetensorsFile) -> None:
        self.files[os.path.basename(sf.path)] = sf
        n = self.layout.n
        for demo in sf.keys():
            hf = hf_name(demo)
            where = f"{sf.path}: tensor {demo!r}"
            try:
                if demo_name(hf) != demo:
                    raise KeyError(demo)
                dim, ranks = self.layout.split_dim(hf), self.layout.ranks(hf)
            except KeyError:
                raise CheckpointError(f"{where} is not a name of the model-parallel layout of this model") from None
            if hf in self.where:
                raise CheckpointError(f"{where} appears in both {self.where[hf].path} and {sf.path}")
            e = self.layout.ours(hf)[1]
            if e is not None and e >= (self.layout.config.n_routed_experts or 0):
                raise CheckpointError(f"{where}: expert {e}, but the model has {self.layout.config.n_routed_experts}")
            if self.rank not in ranks:
                raise CheckpointError(f"{where}: expert {e} belongs to the file of rank {ranks[0]} "
                                      f"({self.layout.experts_per_rank} experts per rank), not rank {self.rank}'s")
            info = sf.info(demo)
            if info.dtype == fp8q.FP8 and dim is not None and info.shape[dim] % fp8q.BLOCK:
                raise CheckpointError(
                    f"{where} is an FP8 slice of {info.shape[dim]} {'rows' if dim == 0 else 'columns'}, which cuts "
                    f"its 128x128 scale blocks: no scale tensor of its own can be right (the official convert.py "
                    f"splits scales regardless). Convert the HF directory with `dsv3 convert --model-parallel {n}`, "
                    "which writes such slices dequantised, or load the HF directory with --tp/--ep")
            self.where[hf], self._demo[hf] = sf, demo

    def names(self) -> list[str]:
        """HF names, in file and offset order."""
        order = {sf.path: i for i, sf in enumerate(self.files.values())}
        return sorted(self.where, key=lambda hf: (order[self.where[hf].path], self.info(hf).begin))

    def info(self, hf: str) -> TensorInfo:
        return self.where[hf].info(self._demo[hf])

    def read(self, hf: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.where[hf].read(self._demo[hf], out, rows)

    def total_bytes(self) -> int:
        return sum(self.info(hf).nbytes for hf in self.where)

    def close(self) -> None:
        for sf in self.files.values():
            sf.close()


class AssembledFiles:
    """Every rank's files put together: each tensor whole under its HF name (split ones concatenated along their
    dimension, each expert from its rank's file); the interface of pretrained.CheckpointDir."""

    def __init__(self, path: str, layout: Layout):
        self.path, self.layout = path, layout
        self.ranks: list[RankFiles] = []
        try:
            for r in range(layout.n):
                self.ranks.append(RankFiles(path, layout, r))
            self._check()
        except BaseException:
            self.close()
            raise
        self.where = {hf: self.ranks[layout.ranks(hf)[0]].where[hf] for rf in self.ranks for hf in rf.where}

    def _check(self) -> None:
        """Every rank holds the same tensors (but experts), of one dtype and local shape."""
        first = self.ranks[0]
        shared = {hf for hf in first.where if len(self.layout.ranks(hf)) > 1}
        for rf in self.ranks[1:]:
            mine = {hf for hf in rf.where if len(self.layout.ranks(hf)) > 1}
            if mine != shared:
                odd = sorted(mine ^ shared)[0]
                has, lacks = (0, rf.rank) if odd in shared else (rf.rank, 0)
                raise CheckpointError(f"{self.path}: {odd!r} is in the file(s) of rank {has} but not in those of "
                                      f"rank {lacks}")
            for hf in shared:
                a, b = first.info(hf), rf.info(hf)
                if (a.dtype, a.shape) != (b.dtype, b.shape):
                    raise CheckpointError(f"{rf.where[hf].path}: tensor {rf._demo[hf]!r} is {b.dtype} {list(b.shape)}, "
                                          f"but rank 0's slice is {a.dtype} {list(a.shape)}")

    def _parts(self, hf: str) -> list[RankFiles]:
        return [self.ranks[r] for r in self.layout.ranks(hf)]

    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for rf in self.ranks:
            seen.update((hf, None) for hf in rf.names())
        return list(seen)

    def info(self, hf: str) -> TensorInfo:
        parts, dim = self._parts(hf), self.layout.split_dim(hf)
        local = parts[0].info(hf)
        if len(parts) == 1 or dim is None:
            return local
        shape = tuple(s * len(parts) if d == dim else s for d, s in enumerate(local.shape))
        return TensorInfo(local.dtype, shape, local.begin, local.nbytes * len(parts))

    def read(self, hf: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        parts, dim = self._parts(hf), self.layout.split_dim(hf)
        if len(parts) == 1 or dim is None:
            return parts[0].read(hf, out, rows)
        if dim == 0:  # the rows [lo, hi) from the ranks whose slices hold them
            n = parts[0].info(hf).shape[0]
            lo, hi = rows if rows is not None else (0, n * len(parts))
            pieces = [rf.read(hf, rows=(max(lo, r * n) - r * n, min(hi, (r + 1) * n) - r * n))
                      for r, rf in enumerate(parts) if max(lo, r * n) < min(hi, (r + 1) * n)]
        else:
            pieces = [rf.read(hf, rows=rows) for rf in parts]
        whole = torch.cat(pieces, dim)
        return whole if out is None else out.copy_(whole.view(out.shape))

    def total_bytes(self) -> int:
        return sum(self.info(hf).nbytes for hf in self.where)

    def close(self) -> None:
        for rf in self.ranks:
            rf.close()


class _Presliced:
    """A Sharding for a rank's own file of this layout: its tensors are already this rank's slices, so nothing is cut
    and a slice's shape is the one the file holds (load_pretrained checks shapes against the local ones)."""

    def __init__(self, shard):
        self._shard = shard

    def cut(self, name: str) -> None:
        return None

    def full_size(self, name: str, local: int) -> int:
        return local

    def __getattr__(self, name):
        return getattr(self._shard, name)


def open_model_parallel(path: str, config: ModelConfig, shard=None):
    """A directory in this layout, for load_pretrained -> (an HF-named checkpoint view, the shard to load with): with
    shard (a Sharding with tp = ep = N) only its rank's files, else every rank's put together."""
    n = layout_size(path)
    try:
        layout = Layout(config, n)
    except ValueError as e:
        raise CheckpointError(f"{path} holds the layout of {n} processes (model0-mp{n}.safetensors ...), but its "
                              f"config.json does not split that way: {e}") from None
    if shard is None:
        return AssembledFiles(path, layout), None
    if shard.world != n:
        raise CheckpointError(
            f"{path} was converted for {n} processes (model0-mp{n}.safetensors ...), not {shard.world}: run "
            f"--nproc-per-node {n} --tp {n} --ep {n}, convert again with --model-parallel {shard.world}, or load the "
            "HF directory, which shards at load time for any number of processes")
    if (shard.tp, shard.ep) != (n, n):
        raise CheckpointError(f"{path}: each model{{i}}-mp{n} file holds 1/{n} of the heads, vocabulary and experts: "
                              f"pass --tp {n} --ep {n} (not --tp {shard.tp} --ep {shard.ep})")
    E = config.n_routed_experts or 0
    if shard.placement.shape[1] != E or not torch.equal(shard.placement.cpu().long(),
                                                        torch.arange(E).expand_as(shard.placement)):
        raise CheckpointError(f"{path}: each rank's file holds its own {E // n} experts; redundant or re-placed "
                              "experts (--num-redundant-experts, --expert-loads) read experts of other ranks: load "
                              "the HF directory for those")
    return RankFiles(path, layout, shard.rank), _Presliced(shard)


def open_checkpoint(path: str, config: ModelConfig):
    """The HF-named tensors of a model directory in either layout: pretrained.CheckpointDir, or AssembledFiles."""
    if is_model_parallel(path):
        return open_model_parallel(path, config)[0]
    from .pretrained import CheckpointDir
    return CheckpointDir(path)
