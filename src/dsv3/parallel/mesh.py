"""The layout of a run over processes, and the device mesh it becomes.

    torchrun --nproc-per-node 4 -m dsv3 train --preset tiny --out runs/t --dp-shard 4 --ep 2

world = pp x dp x tp processes. Expert parallelism borrows from data parallelism, as in the V3 report (EP64
inside the data-parallel ranks of each pipeline stage) and in torchtitan: the `ep` ranks of an EP group each
hold E/ep routed experts of every MoE layer and read different data; over the dp/ep groups left
("dp_mod_ep") each expert is sharded by FSDP. Dense parameters are sharded by FSDP over all of dp.

The mesh's dimensions, outermost first (ranks next to each other differ in the innermost one, so on GPUs
tensor parallelism, the chattiest, stays inside a node):

    ("pp", "dp_mod_ep", "ep", "tp"),  with "dp" = ("dp_mod_ep", "ep") flattened

Without torchrun nothing here runs and dsv3 trains as one process. Under torchrun the backend is gloo on
CPU and NCCL on CUDA (one GPU per process: LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# --pp-schedule: (torch.distributed.pipelining's class, stages per rank, placement: "loop" puts stage s on rank
# s % pp, "v" on rank s for the first pp stages and back down for the rest, so rank 0 holds first and last)
PP_SCHEDULES = {
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}


@dataclass(frozen=True)
class Layout:
    """How a run splits over processes (`dsv3 train --dp-shard D --ep E --pp P --tp T --pp-schedule S`)."""

    dp_shard: int = -1  # data-parallel (FSDP) degree; -1: what the world leaves after pp and tp
    ep: int = 1  # expert-parallel degree, borrowed from dp: divides it
    pp: int = 1  # pipeline stages
    tp: int = 1  # tensor-parallel degree (MLA heads, dense MLPs)
    pp_schedule: str = "1f1b"
    pp_overlap: bool = True  # DualPipeV: each paired forward and backward side by side (pipeline.py)

    @property
    def dp(self) -> int:
        return self.dp_shard

    def resolve(self, world: int) -> "Layout":
        """-> this layout for `world` processes, dp_shard filled in; a layout that does not fit is refused
        with its numbers."""
        for name in ("ep", "pp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"--pp-schedule {self.pp_schedule!r}: expected one of {', '.join(PP_SCHEDULES)}")
        dp = self.dp_shard
        if dp == -1:
            if world % (self.pp * self.tp):
                raise ValueError(f"{world} processes do not split into --pp {self.pp} x --tp {self.tp} "
                                 f"(= {self.pp * self.tp}) x a data-parallel degree")
            dp = world // (self.pp * self.tp)
        elif dp < 1:
            raise ValueError(f"--dp-shard {dp}: must be at least 1, or -1 for what the other degrees leave")
        if dp * self.pp * self.tp != world:
            raise ValueError(f"--dp-shard {dp} x --pp {self.pp} x --tp {self.tp} = {dp * self.pp * self.tp} "
                             f"processes, but {world} were started (torchrun --nproc-per-node x --nnodes)")
        if dp % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the data-parallel degree {dp}: expert parallelism "
                             "borrows its ranks from data parallelism (each EP rank reads its own data)")
        return Layout(dp, self.ep, self.pp, self.tp, self.pp_schedule, self.pp_overlap)

    @property
    def is_single(self) -> bool:
        return self.dp_shard in (-1, 1) and self.ep == self.pp == self.tp == 1

    def describe(self) -> str:
        """E.g. "dp 4 x ep 2" or "dp 1 x pp 2 (dualpipev)"."""
        parts = [f"dp {self.dp_shard}"] if self.dp_shard > 0 else []
        parts += [f"{n} {getattr(self, n)}" for n in ("ep", "pp", "tp") if getattr(self, n) > 1]
        return " x ".join(parts) + (f" ({self.pp_schedule})" if self.pp > 1 else "")


@dataclass
class Parallel:
    """A started run's place among the processes: the resolved layout, the mesh and its sub-meshes."""

    layout: Layout
    mesh: DeviceMesh  # ("pp", "dp_mod_ep", "ep", "tp")
    device: torch.device

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return dist.get_world_size()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs metrics, writes plots and the exported model."""
        return self.rank == 0

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def dp_mod_ep_mesh(self) -> DeviceMesh:
        return self.mesh["dp_mod_ep"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self.mesh["pp"]

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks: which share of each batch it reads."""
        return self.dp_mesh.get_local_rank()

    def barrier(self) -> None:
        dist.barrier()


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def start(layout: Layout, device: str | None = None, timeout_s: float = 1800) -> Parallel | None:
    """Join the processes torchrun started and build the mesh. -> None when not under torchrun (one process),
    where a layout asking for more is refused with the command that would run it."""
    if not under_torchrun():
        if not layout.is_single:
            n = (layout.dp_shard if layout.dp_shard > 0 else layout.ep) * layout.pp * layout.tp
            raise ValueError(f"{layout.describe()} needs {n} processes: start it with torchrun --nproc-per-node {n} "
                             "-m dsv3 train ...")
        return None
    world = int(os.environ["WORLD_SIZE"])
    layout = layout.resolve(world)  # before any process group: a bad layout fails fast on every rank
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # on GPUs NCCL for CUDA tensors and gloo for the few CPU ones (logged numbers, flags)
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    mesh = init_device_mesh(dev.type, (layout.pp, layout.dp // layout.ep, layout.ep, layout.tp),
                            mesh_dim_names=("pp", "dp_mod_ep", "ep", "tp"))
    mesh["dp_mod_ep", "ep"]._flatten("dp")  # torchtitan's way to name a flattened pair; public API pending in torch
    return Parallel(layout, mesh, dev)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
