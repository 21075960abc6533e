"""Training objectives: what the Trainer minimises, one callable each.

An objective runs the forward on one micro-batch and returns `(loss, terms)`: the scalar to backpropagate
and the terms to log. A tensor term is averaged over the step's micro-batches; a plain number (a weight from
a schedule) or None is logged as given. `terms["loss"]` is the run's headline loss (its finiteness decides
whether the step is applied).

    objective(model, batch, stats, step) -> (loss, terms)

`batch` is what the Trainer's data yields (for pretraining, token ids (B, T+1)); `stats` is the forward's
RoutingStats (model/moe.py), which collects the expert loads and balance losses; `step` is the 0-based
optimizer step, for the objective's schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.model import DeepSeekV3
from ..model.moe import RoutingStats
from ..model.mtp import mtp_loss
from .schedules import mtp_lambda_at


@dataclass
class Pretraining:
    """V3's pretraining objective: L = L_main + lambda_t x L_MTP (§2.2, eq. 25) + alpha x L_balance (§2.1.2,
    eq. 17). L_main is the next-token cross-entropy; lambda_t follows `mtp_lambda_at` over `steps`."""

    steps: int
    mtp_lambda: tuple[float, float] = (0.3, 0.1)  # for the first 2/3 of training, then
    alpha: float = 1e-4  # the balance loss's weight (the loss itself is asked of the RoutingStats)

    def __call__(self, model: DeepSeekV3, batch_BT: torch.Tensor, stats: RoutingStats | None,
                 step: int) -> tuple[torch.Tensor, dict]:
        x, y = batch_BT[:, :-1], batch_BT[:, 1:]
        logits, mtp_logits = model.forward_with_mtp(x, stats=stats)
        main_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        lam = mtp_lambda_at(step, self.steps, *self.mtp_lambda) if model.mtp else 0.0
        loss = main_loss
        terms = {"loss": main_loss.detach(), "mtp_loss": 0.0 if model.mtp else None, "balance_loss": 0.0,
                 "mtp_lambda": lam}
        if mtp_logits:
            l_mtp = mtp_loss(mtp_logits, x, labels=y)
            loss = loss + lam * l_mtp
            terms["mtp_loss"] = l_mtp.detach()
        l_bal = stats.balance_loss_sum() if stats is not None else None
        if l_bal is not None:
            loss = loss + self.alpha * l_bal
            terms["balance_loss"] = l_bal.detach()
        return loss, terms
