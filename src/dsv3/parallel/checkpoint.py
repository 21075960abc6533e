"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own shards,
and a checkpoint loads at another world size or layout (2 ranks -> 1, 1 -> 4, ep=2 -> dp=2), since DCP
records every tensor's global shape and each shard's place in it.

    DIR/checkpoints/step_00000100/
        dcp/            .metadata and one __R_0.distcp file per rank: model and optimizer state, keyed by
                        parameter name (torch.distributed.checkpoint.state_dict's layout-free form)
        state.json      as a one-process checkpoint's (ckpt/state.py), plus "format": "dcp" and the layout

Atomic as a one-process checkpoint: every rank writes into the same hidden temporary directory, and rank 0
renames it into place after all have finished (a kill leaves the previous checkpoints whole and a temporary
directory that the next start removes). One-process checkpoints (model.safetensors, optimizer.safetensors)
load into a distributed run, and these into a one-process run (`load`, which needs no process group).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..ckpt.io import SafetensorsFile, atomic_write_json
from ..ckpt.state import checkpoint_dir, commit_checkpoint, prune_checkpoints, rng_state, set_rng_state

FORMAT = "dcp"


def is_sharded(run_dir: str, step: int) -> bool:
    return os.path.isdir(os.path.join(checkpoint_dir(run_dir, step), "dcp"))


def save(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         keep: int | None, layout: dict) -> str:
    """Write checkpoint `step` from every rank (a collective: all ranks call it). -> its directory."""
    root = os.path.join(run_dir, "checkpoints")
    final = checkpoint_dir(run_dir, step)
    name = [None]
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=root)
    dist.broadcast_object_list(name, src=0)
    tmp = name[0]
    ok = True
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
    except BaseException:
        ok = False
        raise
    finally:
        flags = torch.tensor([int(ok)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank learns whether all wrote their shards
        if dist.get_rank() == 0:
            if flags.item():
                full_state = dict(state, step=step, rng=rng_state(), format=FORMAT, layout=layout)
                atomic_write_json(os.path.join(tmp, "state.json"), full_state)
                commit_checkpoint(tmp, final)
                prune_checkpoints(run_dir, keep)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
    return final


def load(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         whole: nn.Module | None = None) -> dict:
    """Restore model and optimizer in place from checkpoint `step`, sharded or not, into this process's layout
    (under torchrun every rank calls it; on one process no process group is needed). Under pipeline
    parallelism `model` holds this rank's stages and `whole` is the whole model (whose parameter order a
    one-process checkpoint's optimizer state follows). -> its state.json."""
    d = checkpoint_dir(run_dir, step)
    with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if is_sharded(run_dir, step):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=os.path.join(d, "dcp"), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        _load_full(d, state, model, optimizer, whole or model)
    set_rng_state(state["rng"])
    return state


def _load_full(d: str, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, whole: nn.Module) -> None:
    """A one-process checkpoint (whole tensors; optimizer state by parameter index, in the order of the whole
    model's `param_groups`) into a distributed model: every rank reads the whole and keeps its shards."""
    from ..train.optim import param_groups
    names = {id(p): n for n, p in whole.named_parameters()}
    order = [names[id(p)] for g in param_groups(whole, 0.0) for p in g["params"]]
    own = get_model_state_dict(model)
    with SafetensorsFile(os.path.join(d, "model.safetensors")) as sf:
        missing, mismatched = set(own) - set(sf.keys()), set(whole.state_dict()) ^ set(sf.keys())
        model_sd = {k: sf.read(k) for k in sf.keys() if k in own}
    if missing or mismatched:
        raise ValueError(f"{d}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                         f"not in both {sorted(mismatched)[:5]}): was it made with other options?")
    opt = state["optimizer"]
    if opt["num_params"] != len(order):
        raise ValueError(f"{d}: the optimizer state is for another set of parameters")
    mine = {n for n, _ in model.named_parameters()}
    per_param: dict[str, dict] = {}
    with SafetensorsFile(os.path.join(d, "optimizer.safetensors")) as sf:
        for k in sf.keys():
            _, idx, name = k.split(".", 2)
            if order[int(idx)] in mine:
                per_param.setdefault(order[int(idx)], {})[name] = sf.read(k)
    for k, v in opt["scalars"].items():
        idx, name = k.split(".", 1)
        if order[int(idx)] in mine:
            per_param.setdefault(order[int(idx)], {})[name] = v
    groups, start = [], 0
    for saved in opt["param_groups"]:
        n = saved["num_params"]
        groups.append({**{k: v for k, v in saved.items() if k != "num_params"},
                       "params": [p for p in order[start:start + n] if p in mine]})
        start += n
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict={"state": per_param,
                                                                                   "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))


def full_model_state(model: nn.Module, pp_group=None) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on rank 0, gathered from every rank's shards (a collective; under pipeline
    parallelism each pipeline rank's stages, gathered over `pp_group`); None on the other ranks."""
    # cpu_offload keeps the gathered tensors on global rank 0 only: the other pipeline ranks need theirs
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=pp_group is None))
    if pp_group is not None:  # the stages of global rank 0's pipeline, gathered there
        if 0 in dist.get_process_group_ranks(pp_group):
            parts = [None] * dist.get_world_size(pp_group) if dist.get_rank() == 0 else None
            dist.gather_object({k: v.cpu() for k, v in sd.items()}, parts, dst=0, group=pp_group)
            if dist.get_rank() == 0:
                sd = {k: v for part in parts for k, v in part.items()}
    return sd if dist.get_rank() == 0 else None
