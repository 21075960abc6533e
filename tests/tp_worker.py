"""Worker for tests/test_tensor_parallel.py, run under torchrun (tests/multiproc.py), one mode or several
(`equiv,refuse`) in one launch:

    tp_worker.py equiv OUT     one process's model vs the same model under apply_tp over all processes, on the
                               micro preset with and without q_lora: first-step logits (main and MTP), loss and
                               every gradient, then the losses of a few AdamW steps.
                               Rank 0 writes OUT/<variant>.pt: {"ref": {...}, "tp": {...}} of plain tensors.
    tp_worker.py refuse OUT    apply_tp on sizes that do not split and on FP8 weights: OUT/refuse.json, the
                               error messages.
    tp_worker.py fsdp OUT      4 processes, a 2x2 ("dp", "tp") mesh: apply_tp over tp then fully_shard over dp,
                               each dp rank on its half of the batch; OUT/fsdp.pt: the losses (the one-process
                               reference is equiv's micro.pt: same weights, same batch).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dsv3 import DeepSeekV3, ModelConfig, init_weights
from dsv3.model.moe import RoutingStats
from dsv3.model.mtp import mtp_loss
from dsv3.parallel.tensor_parallel import apply_tp

STEPS, LR = 3, 1e-2


def build(config: ModelConfig, seed: int = 0) -> DeepSeekV3:
    """Every weight N(0, 0.05) and the norms near 1, from a seeded generator: the same on every process."""
    g = torch.Generator().manual_seed(seed)
    model = DeepSeekV3(config)
    init_weights(model, std=0.05, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def batch(config: ModelConfig, B: int = 4, T: int = 24) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def loss_of(model: DeepSeekV3, batch_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """V3's pretraining loss (main + 0.3 MTP + 1e-4 sequence-wise balance) -> (loss, logits, MTP logits)."""
    x, y = batch_BT[:, :-1], batch_BT[:, 1:]
    stats = RoutingStats("sequence")
    logits, mtp_logits = model.forward_with_mtp(x, stats=stats)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + 0.3 * mtp_loss(mtp_logits, x, labels=y)
    return loss + 1e-4 * stats.balance_loss_sum(), logits, mtp_logits


def train(model: DeepSeekV3, batch_BT: torch.Tensor) -> dict:
    """STEPS AdamW steps on one batch; the first step's logits, loss and gradients, every step's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    out = {"losses": []}
    for step in range(STEPS):
        loss, logits, mtp_logits = loss_of(model, batch_BT)
        loss.backward()
        if step == 0:
            out.update(logits=logits.detach().clone(), mtp_logits=[m.detach().clone() for m in mtp_logits],
                       grads={n: full(p.grad) for n, p in model.named_parameters()})
        out["losses"].append(loss.detach().clone())
        opt.step()
        opt.zero_grad()
    out["losses"] = torch.stack(out["losses"])
    return out


def equiv(out_dir: str) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for variant, overrides in [("micro", {}), ("micro_no_qlora", {"q_lora_rank": None})]:
        config = ModelConfig(**{**ModelConfig.preset("micro").__dict__, **overrides})
        data = batch(config)
        ref = train(build(config), data) if dist.get_rank() == 0 else None
        model = build(config)
        apply_tp(model, mesh)
        split = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
        tp = train(model, data)
        losses = [None] * dist.get_world_size()
        dist.all_gather_object(losses, tp["losses"].tolist())
        tp["losses_by_rank"] = losses
        tp["replica_drift"] = replica_drift(model)
        if dist.get_rank() == 0:
            torch.save({"ref": ref, "tp": tp, "split": split}, os.path.join(out_dir, f"{variant}.pt"))


def replica_drift(model: DeepSeekV3) -> float:
    """The largest difference between any process's replicated weights and rank 0's (0: they stay equal)."""
    drift = torch.zeros(())
    for p in model.parameters():
        if not isinstance(p, DTensor):
            theirs = p.detach().clone()
            dist.broadcast(theirs, src=0)
            drift = torch.maximum(drift, (theirs - p.detach()).abs().max())
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return drift.item()


def refuse(out_dir: str) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))

    def micro(**overrides) -> DeepSeekV3:
        return DeepSeekV3(ModelConfig(**{**ModelConfig.preset("micro").__dict__, **overrides}))

    def fp8() -> DeepSeekV3:
        model = micro()
        model.layers[0].attn.wo.to_fp8()
        return model

    cases = {"heads": lambda: micro(num_attention_heads=3), "dense": lambda: micro(intermediate_size=129),
             "shared": lambda: micro(moe_intermediate_size=33), "fp8": fp8}
    errors = {}
    for case, make in cases.items():
        try:
            apply_tp(make(), mesh)
            errors[case] = None
        except ValueError as e:
            errors[case] = str(e)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "refuse.json"), "w") as f:
            json.dump(errors, f)


def fsdp(out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    config = ModelConfig.preset("micro")
    data = batch(config)
    model = build(config)
    apply_tp(model, mesh["tp"])
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    register_fsdp_forward_method(model, "forward_with_mtp")  # FSDP2 hooks forward; the loss calls this
    half = data.shape[0] // 2
    mine = data[mesh["dp"].get_local_rank() * half:][:half]
    # each dp rank takes the mean over its half: FSDP averages the gradients over dp, so the step is the whole
    # batch's. The loss logged is the mean of the two halves' losses, as a data-parallel trainer logs it.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        loss, _, _ = loss_of(model, mine)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        losses.append(mean / 2)
    if dist.get_rank() == 0:
        torch.save({"losses": torch.stack(losses)}, os.path.join(out_dir, "fsdp.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for mode in sys.argv[1].split(","):
        {"equiv": equiv, "refuse": refuse, "fsdp": fsdp}[mode](sys.argv[2])
    dist.barrier()  # every rank done with its collectives before any tears the groups down
    dist.destroy_process_group()
