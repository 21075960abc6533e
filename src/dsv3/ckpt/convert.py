"""Directory-to-directory checkpoint tools that stream tensor by tensor (memory: one tensor at a time):

- `fp8_cast`: FP8 (block-scaled e4m3) -> BF16/FP32, what the official `fp8_cast_bf16.py` does, but on CPU as
  well as GPU, writing a config.json without `quantization_config` (or transformers and vLLM would try to
  treat the BF16 weights as FP8) and carrying the tokenizer and other files along.
- `quantize_fp8`: the way back, BF16/FP32 -> the official FP8 layout (optionally with power-of-two
  `ue8m0` scales, as DeepSeek-V3.1).
- `convert` (not streaming: the whole model in memory): another dtype, FP8, other shard sizes.
- `convert_model_parallel` (streaming: one tensor at a time): the official demo's per-rank layout,
  `model{i}-mp{N}.safetensors` (model_parallel.py).

The first two keep shard names, so a sharded checkpoint stays sharded the same way. All write their output
through `output.model_output`: whole or not at all, an existing output that is not ours only with `overwrite`.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from ..quant import fp8 as fp8q
from .hf import is_quantizable
from .io import CheckpointError, PendingTensor, atomic_write_json
from .output import RECORD, check_paths, model_output
from .pretrained import (INDEX, CheckpointDir, commit_weights, copy_files, dtype_name, fp8_pair, resolve_dtype,
                         stage_weights)

FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}


def _read_config(path: str) -> dict:
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def _check_input(src: str) -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"input directory {src!r} does not exist")


def _rewrite(ckpt: CheckpointDir, dst: str, per_file, config: dict, desc: str, progress: bool | None) -> None:
    """Write each input shard's replacement entries to a shard of the same name, then index and config, and
    copy every other file of the input directory."""
    names = list(ckpt.files)
    shards: list[list[PendingTensor]] = [per_file(sf) for sf in ckpt.files.values()]
    disable = (not progress) if progress is not None else None
    os.makedirs(dst, exist_ok=True)
    with tqdm(total=ckpt.total_bytes(), unit="B", unit_scale=True, desc=desc, disable=disable) as bar:
        staged = stage_weights(dst, names, shards,
                               lambda group: bar.update(sum(p.nbytes for p in group)))
    index = None
    if len(names) > 1 or os.path.isfile(os.path.join(ckpt.path, INDEX)):
        index = {"metadata": {"total_size": sum(p.nbytes for g in shards for p in g)},
                 "weight_map": {p.name: fn for fn, g in zip(names, shards) for p in g}}
    commit_weights(dst, staged, index)
    atomic_write_json(os.path.join(dst, "config.json"), config)
    skip = set(ckpt.files) | {INDEX, "config.json", RECORD}  # (the record of what is written comes last)
    copy_files(ckpt.path, dst, [f for f in sorted(os.listdir(ckpt.path))
                                if f not in skip and os.path.isfile(os.path.join(ckpt.path, f))
                                and not f.endswith(".safetensors")])


def fp8_cast(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
             device: str | None = None, progress: bool | None = None, overwrite: bool = False) -> None:
    """Dequantise every FP8 weight of `src` (e4m3 x its 128x128 block `weight_scale_inv`) into `dtype`."""
    src, dst = os.fspath(src), os.fspath(dst)
    _check_input(src)
    dtype = resolve_dtype(dtype)
    config = _read_config(src)
    ckpt = CheckpointDir(src)
    try:
        fp8_names = [n for n in ckpt.where if ckpt.info(n).dtype == fp8q.FP8]
        if not fp8_names:
            raise CheckpointError(f"{src} holds no FP8 weights: nothing to cast")
        for n in fp8_names:
            if n + "_scale_inv" not in ckpt.where:
                raise CheckpointError(f"{ckpt.where[n].path}: FP8 tensor {n!r} has no {n + '_scale_inv'!r}")

        def per_file(sf) -> list[PendingTensor]:
            out = []
            for n in sorted(sf.keys(), key=lambda n: sf.info(n).begin):
                info = sf.info(n)
                if n.endswith("_scale_inv") and n.removesuffix("_scale_inv") in ckpt.where:
                    continue
                if info.dtype == fp8q.FP8:
                    def deq(n=n):
                        w, s = ckpt.read(n), ckpt.read(n + "_scale_inv")
                        if device:
                            w, s = w.to(device), s.to(device)
                        return fp8q.weight_dequant(w, s, dtype)
                    out.append(PendingTensor(n, dtype, info.shape, deq))
                else:
                    out.append(PendingTensor(n, info.dtype, info.shape, lambda n=n: ckpt.read(n)))
            return out

        config.pop("quantization_config", None)
        config["torch_dtype"] = dtype_name(dtype)
        config.pop("dtype", None)
        with model_output(dst, inputs=[src], overwrite=overwrite, writer="fp8-cast-bf16") as tmp:
            _rewrite(ckpt, tmp, per_file, config, "fp8 -> " + dtype_name(dtype), progress)
    finally:
        ckpt.close()


def quantize_fp8(src: str | os.PathLike, dst: str | os.PathLike, scale_fmt: str | None = None,
                 device: str | None = None, progress: bool | None = None, overwrite: bool = False) -> None:
    """Quantise every projection weight of `src` (attention and MLPs; not embeddings, head, norms, gate or
    the MTP eh_proj, as the official release) to FP8 e4m3 with 128x128 block scales."""
    src, dst = os.fspath(src), os.fspath(dst)
    _check_input(src)
    config = _read_config(src)
    if config.get("quantization_config"):
        raise CheckpointError(f"{src}/config.json already has a quantization_config: the checkpoint is quantised")
    ckpt = CheckpointDir(src)
    try:
        def per_file(sf) -> list[PendingTensor]:
            out = []
            for n in sorted(sf.keys(), key=lambda n: sf.info(n).begin):
                info = sf.info(n)
                if is_quantizable(n) and info.dtype.is_floating_point and info.dtype != fp8q.FP8:
                    def get(n=n):
                        w = ckpt.read(n)
                        return w.to(device) if device else w
                    out.extend(fp8_pair(n, info.shape, get, scale_fmt))
                else:
                    out.append(PendingTensor(n, info.dtype, info.shape, lambda n=n: ckpt.read(n)))
            return out

        config["quantization_config"] = dict(FP8_QUANT_CONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {}))
        with model_output(dst, inputs=[src], overwrite=overwrite, writer="quantize-fp8") as tmp:
            _rewrite(ckpt, tmp, per_file, config, "-> fp8", progress)
    finally:
        ckpt.close()


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
            fp8: bool = False, scale_fmt: str | None = None, max_shard_size: int | str = "5GB",
            overwrite: bool = False) -> None:
    """`dsv3 convert`: load `src` whole and write it again in `dtype` (FP8 projections with fp8=True),
    sharded at max_shard_size, with its tokenizer files: through `model_output`, like the streaming tools."""
    from .pretrained import TOKENIZER_FILES, load_pretrained, save_pretrained
    src, dst = os.fspath(src), os.fspath(dst)
    _check_input(src)
    check_paths(dst, [src])  # before the load, which can take minutes (model_output checks again)
    model = load_pretrained(src, dtype=dtype)
    with model_output(dst, inputs=[src], overwrite=overwrite, writer="convert") as tmp:
        save_pretrained(model, tmp, dtype=dtype, fp8=fp8, scale_fmt=scale_fmt, max_shard_size=max_shard_size)
        copy_files(src, tmp, [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))])


def convert_model_parallel(src: str | os.PathLike, dst: str | os.PathLike, n: int, progress: bool | None = None,
                           overwrite: bool = False) -> list[str]:
    """`dsv3 convert --model-parallel N`: write `src` (an HF directory, or one in this layout for another N) as the
    official demo's files for n ranks, every tensor in its stored dtype, with config.json, `model_args.json` (the
    demo's --config) and the input's other files. -> the FP8 weights written dequantised in float32, because their
    slices would cut 128x128 scale blocks (see model_parallel.py)."""
    from ..config import ModelConfig
    from .model_parallel import Layout, model_args, open_checkpoint, write_model_parallel
    src, dst = os.fspath(src), os.fspath(dst)
    _check_input(src)
    raw = _read_config(src)
    layout = Layout(ModelConfig.from_hf(src), n)
    ckpt = open_checkpoint(src, layout.config)
    try:
        with model_output(dst, inputs=[src], overwrite=overwrite, writer="convert-model-parallel") as tmp:
            dequantised = write_model_parallel(ckpt, layout, tmp, progress)
            atomic_write_json(os.path.join(tmp, "config.json"), raw)
            atomic_write_json(os.path.join(tmp, "model_args.json"), model_args(layout.config))
            skip = {INDEX, "config.json", "model_args.json", RECORD}
            copy_files(src, tmp, [f for f in sorted(os.listdir(src)) if f not in skip and not f.endswith(".safetensors")
                                  and os.path.isfile(os.path.join(src, f))])
    finally:
        ckpt.close()
    return dequantised
