"""Evaluations a training run and `dsv3 eval` share: validation loss and bits per byte (bpb.py)."""

from .bpb import LossResult, bits_per_byte, next_token_loss

__all__ = ["LossResult", "bits_per_byte", "next_token_loss"]
