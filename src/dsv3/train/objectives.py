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


@dataclass
class SFT:
    """Supervised fine-tuning on chat records (V3 §5.1): the next-token cross-entropy on the assistant turns'
    tokens only (their end-of-sentence token included), averaged over every such token of the optimizer step,
    whatever the micro-batching (as transformers' `num_items_in_batch`); plus mtp_lambda x the MTP modules'
    loss on the same tokens, so speculative decoding keeps working, and alpha x the balance loss.

    batch: data/chat.py's SFTBatch, rows of packed records (positions restarting, a block-diagonal mask)."""

    mtp_lambda: float = 0.1
    alpha: float | None = None  # the balance loss's weight (None: the run's --alpha)

    def prepare_step(self, batches: list, trainer) -> None:
        """Each micro-batch's share of the step's loss tokens (over every data-parallel rank): the Trainer
        averages micro-batch losses (and FSDP ranks' gradients), so a micro-batch's summed loss is divided by
        the step's token count over the number of micro-batches."""
        n = torch.tensor(float(sum(b.num_loss_tokens for b in batches)), dtype=torch.float64)
        dp = 1
        if trainer.par is not None:
            from ..parallel.parallelize import sum_over_dp
            n, dp = sum_over_dp(n, trainer.par), trainer.dp
        for b in batches:
            b.loss_denominator = max(n.item(), 1.0) / (len(batches) * dp)

    def __call__(self, model: DeepSeekV3, batch, stats: RoutingStats | None, step: int) -> tuple[torch.Tensor, dict]:
        mask = batch.attention_mask()
        logits, mtp_logits = model.forward_with_mtp(batch.input_ids, stats=stats, positions=batch.positions,
                                                    mask=mask)
        denom = getattr(batch, "loss_denominator", None) or max(batch.num_loss_tokens, 1)
        main_loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=-100,
                                    reduction="sum") / denom
        loss = main_loss
        terms = {"loss": main_loss.detach(), "mtp_loss": 0.0 if model.mtp else None, "balance_loss": 0.0,
                 "mtp_lambda": self.mtp_lambda if model.mtp else 0.0}
        if mtp_logits and self.mtp_lambda:
            # depth k at position i predicts labels[i + k], where i + k is still in the same packed record
            losses = []
            for k, logits_k in enumerate(mtp_logits, start=1):
                same = batch.segments[:, :-k] == batch.segments[:, k:]  # (B, T-k)
                target = batch.labels[:, k:].masked_fill(~same, -100)
                if (target != -100).any():
                    losses.append(F.cross_entropy(logits_k.flatten(0, 1).float(), target.flatten(), ignore_index=-100))
            if losses:
                l_mtp = torch.stack(losses).mean()
                loss = loss + self.mtp_lambda * l_mtp
                terms["mtp_loss"] = l_mtp.detach()
        l_bal = stats.balance_loss_sum() if stats is not None else None
        if l_bal is not None and self.alpha:
            loss = loss + self.alpha * l_bal
            terms["balance_loss"] = l_bal.detach()
        return loss, terms


# ---- GRPO (DeepSeekMath eq. 3; the V3 report's eqs. 26-28) ---------------------------------------------------

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps) for rewards (N,) laid out group by group (the G samples
    of one prompt adjacent). scale "batch" divides by the whole batch's std instead, "none" not at all (Dr.
    GRPO). std is the sample standard deviation, as TRL's. A group whose rewards are all equal gets 0."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale!r}: expected one of {', '.join(SCALE_REWARDS)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size).double()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps) if group_size > 1 else adv
    elif scale == "batch":
        adv = adv / (r.std() + eps) if r.numel() > 1 else adv
    return adv.flatten().to(rewards.dtype)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token, from the sampled tokens' log-probabilities:
    exp(ref - logp) - (ref - logp) - 1 >= 0, with equality where the two agree (DeepSeekMath eq. 4)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A), ratio = pi / pi_old; advantages
    broadcast per sequence (N, 1). -> (loss (N, T), ratio (N, T))."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), ratio


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, denominator: float | None = None,
                max_completion_length: int | None = None) -> torch.Tensor:
    """The three normalisations of the per-token loss (N, T) over the completion tokens (mask):
    grpo: each sequence's mean, averaged over sequences (DeepSeekMath; longer answers weigh less per token);
    dr_grpo: the sum over (sequences x max_completion_length), a constant (Dr. GRPO: no length bias);
    dapo: the sum over every completion token (DAPO's token-level loss).
    `denominator` overrides the count a micro-batch divides by (sequences, sequences x max length, or tokens
    of the whole step's batch, each divided by the number of micro-batches), so that micro-batching does not
    change the loss."""
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / (denominator or per_token.shape[0])
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return (per_token * m).sum() / (denominator or per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return (per_token * m).sum() / (denominator or m.sum().clamp(min=1))
    raise ValueError(f"loss_type {loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def completion_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) at every position with a label (N, T) (0 where labels are -100), from logits divided by
    the sampling temperature (the distribution the rollout sampled from); with_entropy: also the entropy of
    that distribution per position."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    ent = None
    if with_entropy:  # logged, not trained on: outside autograd, which would keep a (N, T, V) tensor for it
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


@dataclass
class GRPO:
    """Group Relative Policy Optimization on rollout batches (train/grpo.py's GRPOBatch: prompt + completion
    ids, labels on the completion tokens, per-sequence advantages, the old and reference log-probabilities).

    J = E[ 1/|o| sum_t min(r_t A, clip(r_t, 1 - eps, 1 + eps_high) A) - beta KL_k3(pi || pi_ref) ], minimised
    as its negative with `loss_type`'s normalisation. With one update per rollout batch pi_old is the current
    policy detached: ratio 1, no clipping, the plain policy gradient."""

    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    temperature: float = 1.0
    max_completion_length: int = 256
    alpha: float | None = None  # the balance loss's weight (None: the run's)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")

    def prepare_step(self, batches: list, trainer) -> None:
        """The whole step's count for the normalisation, shared out over its micro-batches."""
        if self.loss_type == "grpo":
            n = sum(len(b) for b in batches)
        elif self.loss_type == "dr_grpo":
            n = sum(len(b) for b in batches) * self.max_completion_length
        else:
            n = sum(b.num_completion_tokens for b in batches)
        for b in batches:
            b.denominator = max(n, 1) / len(batches)

    def __call__(self, model: DeepSeekV3, batch, stats: RoutingStats | None, step: int) -> tuple[torch.Tensor, dict]:
        logits = model(batch.input_ids, stats=stats)
        mask = batch.labels != -100
        logp, ent = completion_logprobs(logits, batch.labels, self.temperature, with_entropy=True)
        old = logp.detach() if batch.old_logp is None else batch.old_logp
        adv = batch.advantages.unsqueeze(-1).to(logp.dtype)
        per_token, ratio = clipped_surrogate(logp, old, adv, self.epsilon, self.epsilon_high)
        n_tok = mask.sum().clamp(min=1)
        terms = {}
        if self.beta:
            kl = k3(logp, batch.ref_logp)
            per_token = per_token + self.beta * kl
            terms["kl"] = ((kl * mask).sum() / n_tok).detach()
        loss = reduce_loss(per_token, mask, self.loss_type, getattr(batch, "denominator", None),
                           self.max_completion_length)
        with torch.no_grad():
            low = (ratio < 1 - self.epsilon) & (adv < 0) & mask
            high = (ratio > 1 + self.epsilon_high) & (adv > 0) & mask
            terms.update({"loss": loss.detach(), "entropy": (ent * mask).sum() / n_tok,
                          "clip_ratio/low_mean": low.sum() / n_tok, "clip_ratio/high_mean": high.sum() / n_tok,
                          "clip_ratio/region_mean": (low | high).sum() / n_tok})
        l_bal = stats.balance_loss_sum() if stats is not None else None
        if l_bal is not None and self.alpha:
            loss = loss + self.alpha * l_bal
            terms["balance_loss"] = l_bal.detach()
        terms.update(batch.rollout_stats)  # the rollout's rewards and lengths, as plain numbers
        return loss, terms
