"""The latent KV cache: the only place that allocates cache memory.

MLA's promise (§2.1.1): per token and layer, keep only the normalised kv latent c_KV (kv_lora_rank wide)
and the roped key k_R (qk_rope_head_dim wide, shared by all heads). For DeepSeek-V3 in BF16 that is
61 x (512 + 64) x 2 = 70,272 bytes per token, against 61 x 128 x (192 + 128) x 2 = 4,997,120 bytes for
full per-head keys and values (71x less).

Layout: one tensor (layers, num_blocks * block_size + 1, C + R); a token's row is its slot,
block_table[pos // block_size] * block_size + pos % block_size. Layer index num_hidden_layers + k - 1 is
MTP module k's own cache, present only when speculative decoding uses it. The last row, `scratch_slot`, belongs
to no block: the padding rows of a fixed-shape step (cuda_graphs.py) write there and read from there.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model.layers import cast


class LatentCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, num_mtp_layers: int = 0):
        self.num_main_layers = config.num_hidden_layers
        self.num_layers = config.num_hidden_layers + num_mtp_layers
        self.C, self.R = config.kv_lora_rank, config.qk_rope_head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_slot = num_blocks * block_size
        self.data = torch.zeros(self.num_layers, self.scratch_slot + 1, self.C + self.R, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype, num_layers: int | None = None) -> int:
        layers = config.num_hidden_layers if num_layers is None else num_layers
        return layers * (config.kv_lora_rank + config.qk_rope_head_dim) * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity(self) -> int:
        """Token positions the cache holds (over all sequences)."""
        return self.num_blocks * self.block_size

    @property
    def main_bytes_per_token(self) -> int:
        """Measured from the allocation: bytes the main model's layers spend on one token position."""
        return self.data[: self.num_main_layers].nbytes // self.data.shape[1]

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store tokens' latents (N, C) and roped keys (N, R) at their slots (N,)."""
        self.data[layer].index_copy_(0, slots, cast(torch.cat([kv, k_rope], dim=-1), self.data.dtype))

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy the main model's rows at slots src to slots dst, every layer in one op (the speculator keeps
        a draft verified at a slot further on by moving it to its position's slot)."""
        rows = self.data[: self.num_main_layers]
        device = self.data.device
        rows.index_copy_(1, torch.tensor(dst, device=device), rows.index_select(1, torch.tensor(src, device=device)))

    def read(self, layer: int, slot_table: torch.Tensor) -> torch.Tensor:
        """Gather the rows of slot_table (B, S) -> (B, S, C + R): the latent, then the roped key.
        (index_select, not advanced indexing: the same rows at a third of the cost on CPUs.)"""
        return self.data[layer].index_select(0, slot_table.flatten()).view(*slot_table.shape, -1)
