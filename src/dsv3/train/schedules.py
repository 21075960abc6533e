"""The V3 recipe's schedules (RECIPE.md), as small pure functions of the step, scaled to a run of `total`
steps by the fractions of the 14.8T-token run they come from."""

from __future__ import annotations

import math

CONSTANT_END = 10.0 / 14.8  # LR constant until 10T tokens, then cosine decay ...
COSINE_END = 14.3 / 14.8  # ... to a tenth of the peak at 14.3T; gamma drops to 0 there too
FINAL_START = 14.633 / 14.8  # the last 167B tokens at 7.3e-6 / 2.2e-4 of the peak
FLOOR, FINAL = 0.1, 7.3e-6 / 2.2e-4
MTP_SWITCH = 10.0 / 14.8  # lambda 0.3 for the first 10T tokens, then 0.1


def default_warmup(total: int) -> int:
    """2K warmup steps in V3 (of ~60K+); here 5% of the run, at least 1 and at most 2000."""
    return max(1, min(2000, round(0.05 * total)))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup -> constant -> cosine to peak/10 -> peak/10 -> peak * 7.3e-6/2.2e-4 (step is 0-based)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = step / max(total, 1)
    if frac < CONSTANT_END:
        return peak
    if frac < COSINE_END:
        t = (frac - CONSTANT_END) / (COSINE_END - CONSTANT_END)
        return peak * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))
    return peak * (FLOOR if frac < FINAL_START else FINAL)


def gamma_at(step: int, total: int, gamma: float) -> float:
    """The balancing bias update speed: gamma for most of training, 0 for the last tokens."""
    return gamma if step / max(total, 1) < COSINE_END else 0.0


def mtp_lambda_at(step: int, total: int, first: float = 0.3, then: float = 0.1) -> float:
    return first if step / max(total, 1) < MTP_SWITCH else then


LR_SCHEDULES = ("v3", "cosine", "constant")


def lr_for(schedule: str, step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """The learning rate of a named schedule (step 0-based), each after a linear warmup:
    "v3": pretraining's (`lr_at`); "cosine": cosine decay to floor x peak over the run (V3's SFT: 5e-6 -> 1e-6,
    floor 0.2); "constant": the peak throughout (TRL's GRPO runs without decay are this)."""
    if schedule == "v3":
        return lr_at(step, total, peak, warmup)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        t = (step - warmup) / max(total - warmup, 1)
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
