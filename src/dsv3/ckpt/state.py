"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    DIR/checkpoints/step_00000100/
        model.safetensors      every parameter and persistent buffer (the balancing biases included), as trained
        optimizer.safetensors  the optimizer's tensors (moments, step counts)
        state.json             step, data position, RNG state, schedule inputs, the optimizer's hyperparameters

A checkpoint is written into a hidden temporary directory beside its final name and renamed into place
when complete, so a kill at any moment leaves either the previous checkpoints alone or the new one whole.
What a kill leaves behind (those temporary directories and files) is ours to remove (`remove_stale`).

The run directory is also a model directory (the trainer exports each checkpoint's weights there);
`checkpoints/exported.json` records which step it holds, written once an export is complete, so that a run
killed between a checkpoint and its export exports it when it starts again.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile

import torch
from torch import nn

from .io import PendingTensor, SafetensorsFile, atomic_write_json, fsync_dir, write_safetensors

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_STALE_DIR = re.compile(r"^(\.step_\d{8}\.[A-Za-z0-9_]+|step_\d{8}\.old)$")  # a checkpoint's temp or replaced dir
# atomic writes' temporary files (io.atomic_open), and weight shards staged by an export (pretrained.stage_weights)
_STALE_FILE = re.compile(r"^\.(.+\.[A-Za-z0-9_]{8}\.tmp|model(-\d{5}-of-\d{5})?\.safetensors\.staged)$")
EXPORTED = "exported.json"


def _pending(tensors: dict[str, torch.Tensor]) -> list[PendingTensor]:
    return [PendingTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def save_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int | None = None) -> str:
    """Write checkpoint `step` atomically; keep only the newest `keep`. -> its directory."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=root)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), _pending(model.state_dict()))
        opt = optimizer.state_dict()
        params_by_id = [p for g in optimizer.param_groups for p in g["params"]]
        tensors, scalars = {}, {}
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"state.{idx}.{k}"] = v.detach().cpu()
                else:
                    scalars[f"{idx}.{k}"] = v
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"), _pending(tensors))
        groups = [{k: v for k, v in g.items() if k != "params"} | {"num_params": len(g["params"])}
                  for g in opt["param_groups"]]
        full_state = dict(state, step=step, rng=rng_state(), optimizer={"param_groups": groups, "scalars": scalars,
                                                                        "num_params": len(params_by_id)})
        atomic_write_json(os.path.join(tmp, "state.json"), full_state)
        commit_checkpoint(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def commit_checkpoint(tmp: str, final: str) -> None:
    """Put a complete checkpoint directory `tmp` in place as `final` (replacing a checkpoint of the same step
    whole), durably."""
    os.chmod(tmp, 0o755)
    if os.path.exists(final):  # the same step saved again (a resumed run): replace it whole
        old = final + ".old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def prune_checkpoints(run_dir: str, keep: int | None) -> None:
    """Keep only the newest `keep` checkpoints (all when None)."""
    if keep is not None:
        for old_step in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(os.path.join(run_dir, "checkpoints", f"step_{old_step:08d}"), ignore_errors=True)


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def list_checkpoints(run_dir: str) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := _STEP_DIR.match(d)))


def load_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer in place from checkpoint `step`; -> its state.json (RNG restored too)."""
    d = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    with open(os.path.join(d, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    with SafetensorsFile(os.path.join(d, "model.safetensors")) as sf:
        own = model.state_dict()
        missing = set(own) - set(sf.keys())
        unexpected = set(sf.keys()) - set(own)
        if missing or unexpected:
            raise ValueError(f"{d}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}): was it made with other options?")
        with torch.no_grad():
            for k, t in own.items():
                if tuple(sf.info(k).shape) != tuple(t.shape):
                    raise ValueError(f"{d}: {k} has shape {list(sf.info(k).shape)}, the model {list(t.shape)}")
                sf.read(k, out=t)
    opt = state["optimizer"]
    if opt["num_params"] != sum(len(g["params"]) for g in optimizer.param_groups):
        raise ValueError(f"{d}: the optimizer state is for another set of parameters")
    tensors = {}
    with SafetensorsFile(os.path.join(d, "optimizer.safetensors")) as sf:
        for k in sf.keys():
            tensors[k] = sf.read(k)
    per_param: dict[int, dict] = {}
    for k, v in tensors.items():
        _, idx, name = k.split(".", 2)
        per_param.setdefault(int(idx), {})[name] = v
    for k, v in opt["scalars"].items():
        idx, name = k.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    sd = optimizer.state_dict()
    groups = [dict(g, **{k: v for k, v in saved.items() if k != "num_params"})
              for g, saved in zip(sd["param_groups"], opt["param_groups"])]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    set_rng_state(state["rng"])
    return state


def remove_stale(run_dir: str) -> list[str]:
    """Remove what a killed run of ours left half-written: checkpoint temp directories (`.step_N.xxxx`),
    replaced checkpoints (`step_N.old`), atomic writes' temp files (`.name.xxxxxxxx.tmp`) and staged weight
    shards (`.model.safetensors.staged`) in the run directory.
    Nothing else is touched. -> the paths removed."""
    removed = []
    root = os.path.join(run_dir, "checkpoints")
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, d)
        if _STALE_DIR.match(d) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for f in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, f)
        if _STALE_FILE.match(f) and os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
            removed.append(path)
    return removed


def exported_step(run_dir: str) -> int | None:
    """The step whose weights the run directory's model holds, None if unknown (never exported, an export
    cut short, or a run from before this record)."""
    try:
        with open(os.path.join(run_dir, "checkpoints", EXPORTED), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def mark_exported(run_dir: str, step: int) -> None:
    """Record that the run directory's model is checkpoint `step` (call once its export is complete)."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    atomic_write_json(os.path.join(run_dir, "checkpoints", EXPORTED), {"step": step})
