"""Expert load balancing during training (V3 report §2.1.2; Wang et al. 2024, arXiv 2408.15664).

- aux-free: after each step, every expert's bias b_i moves by gamma towards balance:
  b_i += gamma * sign(mean load - load_i). The bias only picks experts, so balancing never fights the
  language-modelling gradient. V3 adds a tiny sequence-wise balance loss (alpha 1e-4) against extreme
  imbalance within one sequence.
- aux-loss: the classic batch-wise auxiliary loss (alpha 1e-3 in the paper's baseline), no bias.
- none: nothing.
MaxVio = (max_i load_i - mean load) / mean load, per MoE layer, averaged over layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MoE

MODES = ("aux-free", "aux-loss", "none")


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def configure(model: nn.Module, mode: str, alpha: float) -> None:
    """Turn on load recording, and the balance loss that `mode` uses (none when alpha is 0)."""
    if mode not in MODES:
        raise ValueError(f"--balance {mode!r}: expected one of {', '.join(MODES)}")
    loss = {"aux-free": "sequence", "aux-loss": "batch", "none": None}[mode]
    for moe in moe_layers(model):
        moe.record_loads = True
        moe.balance_loss = loss if alpha > 0 else None


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over MoE layers of the last forward's balance loss (before alpha), or None."""
    losses = [m.aux_loss for m in moe_layers(model) if m.balance_loss is not None and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def take_loads(model: nn.Module) -> torch.Tensor:
    """-> (MoE layers, experts) token counts since the last call, and reset them."""
    loads = torch.stack([m.tokens_per_expert.clone() for m in moe_layers(model)])
    for m in moe_layers(model):
        m.tokens_per_expert.zero_()
    return loads


@torch.no_grad()
def update_bias(model: nn.Module, loads: torch.Tensor, gamma: float) -> None:
    """b_i += gamma * sign(mean load - load_i), layer by layer."""
    if gamma == 0:
        return
    for moe, load in zip(moe_layers(model), loads.float()):
        if moe.gate.bias is not None:
            moe.gate.bias += gamma * torch.sign(load.mean() - load).to(moe.gate.bias.device)


def maxvio(loads: torch.Tensor) -> torch.Tensor:
    """(layers, experts) counts -> MaxVio per layer; NaN for a layer that routed no tokens (the MTP
    module's MoE during evaluation, which runs the main model only): average with nanmean."""
    loads = loads.float()
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, (loads.max(dim=-1).values - mean) / mean.clamp(min=1e-9), float("nan"))
