"""Multi-Token Prediction (DeepSeek-V3 report §2.2).

Module k (1-based) at position i combines the previous depth's representation h^{k-1}_i with the
embedding of token t_{i+k} and predicts token t_{i+k+1}:

    h'_i  = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])     (embedding first, as the checkpoints' eh_proj)
    h^k   = Block_k(h')                                          (one causal transformer block)
    P^k   = OutHead(shared_head.norm(h^k))

The embedding and the output head are shared with the main model. h^0 is the main model's output after its
final norm (what vLLM and SGLang feed the module when they draft with V3's MTP weights); h^k for k >= 1 is
the block's output before `shared_head.norm`. Weights live at `model.layers.{num_hidden_layers + k - 1}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear, RMSNorm


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, block: nn.Module):
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d)
        self.block = block
        self.norm = RMSNorm(d, config.rms_norm_eps)  # shared_head.norm in the checkpoint

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """h_prev (..., D) and the embeddings of the tokens one further along (..., D) -> the block's input."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        # the block's residual stream keeps this layout: row-major, whatever layout a few-row product returned
        return h if h.is_contiguous() else h.contiguous()

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, *block_args, **block_kwargs) -> torch.Tensor:
        """-> h^k (B, T, D)."""
        return self.block(self.combine(h_prev, emb_next), *block_args, **block_kwargs)


def mtp_loss(mtp_logits: list[torch.Tensor], input_ids: torch.Tensor, ignore_index: int = -100,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """L_MTP = mean over depths k of the cross-entropy of module k's predictions of token i+k+1 (§2.2,
    before the lambda weight). `labels` (B, T) are the main model's next-token targets (default: input_ids
    shifted); depth k's target at position i is labels[:, i + k]."""
    if not mtp_logits:
        raise ValueError("mtp_loss needs at least one MTP depth")
    if labels is None:
        labels = F.pad(input_ids[:, 1:], (0, 1), value=ignore_index)
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        target = labels[:, k:k + logits.shape[1]]  # logits (B, T-k, V): position i predicts labels[i+k]
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=ignore_index))
    return torch.stack(losses).mean()
