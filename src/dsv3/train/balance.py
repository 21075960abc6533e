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

from ..model.moe import moe_layers

MODES = ("aux-free", "aux-loss", "none")
__all__ = ["MODES", "moe_layers", "configure", "update_bias", "maxvio"]


def configure(model: nn.Module, mode: str, alpha: float) -> str | None:
    """Check that `mode` can balance this model; -> the balance loss it trains with ("sequence", "batch", or
    None when alpha is 0), for the RoutingStats of each forward (model/moe.py)."""
    if mode not in MODES:
        raise ValueError(f"--balance {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "aux-free" and any(m.gate.bias is None for m in moe_layers(model)):
        raise ValueError("--balance aux-free needs the V3 gate's balancing bias (topk_method noaux_tc); this model "
                         f"routes with {moe_layers(model)[0].gate.method!r}: use --balance aux-loss or none")
    loss = {"aux-free": "sequence", "aux-loss": "batch", "none": None}[mode]
    return loss if alpha > 0 else None


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
