"""AdamW for the V3 recipe: betas (0.9, 0.95), weight decay 0.1 on matrices (not on norms, biases or the
balancing bias, which is no parameter at all), optionally with the moments stored in BF16 as V3 does
(the update itself is computed in float32)."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose moments live in `moment_dtype` (float32 or bfloat16)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts saved moments to the parameter's dtype: put them back
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(self.moment_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return None


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    bf16_moments: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if bf16_moments:
        return AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, moment_dtype=torch.bfloat16)
    return torch_adamw(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def torch_adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW with the fused kernel where the parameters' device has one (CPU and CUDA do: one pass over
    parameter, gradient and moments, where the foreach path makes one per elementwise op), else foreach."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # a device (or dtype) without the fused kernel
        return torch.optim.AdamW(params, foreach=True, **kwargs)
