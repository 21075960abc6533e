"""DeepSeek-V3, to be read next to the technical report (arXiv 2412.19437, §2.1): RoPE with YaRN, Multi-head
Latent Attention, the dense MLP, the transformer block and the model. MoE and MTP are siblings (moe.py,
mtp.py); the shared building blocks (an FP8-capable Linear, RMSNorm, the SwiGLU MLP) are in layers.py.

The model knows nothing of caches, ranks or devices: `forward(input_ids)` computes the whole sequence.
The inference engine runs the same forward (`hidden_states`, `Block.forward`, `MTPModule.forward`) and hands
it an attention backend: MLA then projects as always and the backend attends over the engine's latent cache
(infer/model_runner.py) instead of over the sequence's own keys.

Shapes: B batch, T query positions, S key positions, H heads, D hidden size, C kv latent (kv_lora_rank),
R rope dims per head, P nope dims per head, V value dims per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .layers import KeepDtype, Linear, MLP, PackedWeights, RMSNorm, cast, pack, packed
from .moe import MoE, RoutingStats
from .mtp import MTPModule


# ---- rotary position embedding, with YaRN ---------------------------------------------------------------

def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """theta_j = base^(-2j/R) for j < R/2; under YaRN, low frequencies (long wavelengths) are interpolated by
    the factor s, high ones kept, with a linear ramp between the dims completing beta_slow and beta_fast
    rotations over the original context."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    # computed on the CPU even while a model is built on the meta device (a meta kernel would pull in sympy)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if config.rope_type != "yarn":
        return inv_freq

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(config.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: original frequency (extrapolate), 0: divided by the factor (interpolate)
    return inv_freq / config.rope_factor * (1 - keep) + inv_freq * keep


class RotaryEmbedding(KeepDtype):
    """positions (...,) -> e^{i pos theta_j} (..., R/2), complex64 (times YaRN's cos/sin factor)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.attention_factor = config.rope_attention_factor

    def pinned(self) -> tuple[str, ...]:
        return ("inv_freq",)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None].float() * self.inv_freq  # (..., R/2)
        return torch.polar(torch.full_like(angles, self.attention_factor), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of x (..., R) as complex numbers x0 + i x1 (the
    layout of the official checkpoints; rotating halves instead would be a different model).
    freqs (..., R/2) complex, broadcast against x's leading dims."""
    xf = cast(x, torch.float32)
    if xf.stride(-1) != 1:  # view_as_complex needs (real, imag) adjacent in memory
        xf = xf.contiguous()
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    return cast(torch.view_as_real(xc * freqs).flatten(-2), x.dtype)


# ---- Multi-head Latent Attention (§2.1.1) --------------------------------------------------------------

class MLA(nn.Module):
    """Keys and values are generated from one low-rank latent c_KV (C wide, normalised) plus one decoupled
    rotary key k_R (R wide) shared by all heads: these two are all a cache needs to hold. Queries come from
    their own latent c_Q when q_lora_rank is set. H in the shapes below is the heads this module computes: all
    of them, or H/tp of them under tensor parallelism (dsv3.parallel), so reshapes infer it from the product."""

    def __init__(self, config: ModelConfig, layer_id: int = 0):
        super().__init__()
        d, H = config.hidden_size, config.num_attention_heads
        self.layer_id = layer_id  # the block's index (the MTP modules' follow the main layers): its cache layer
        self.n_heads = H  # all of the model's heads, whatever tensor parallelism computes here
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.wq = Linear(d, H * self.qk_dim)
        else:
            self.wq_a = Linear(d, self.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.wq_b = Linear(self.q_lora_rank, H * self.qk_dim)
        self.wkv_a = Linear(d, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.wkv_b = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim))
        self.wo = Linear(H * self.v_dim, d, bias=bias)
        self.wqkv_a: PackedWeights | None = None  # wq_a and wkv_a stacked, after pack_projections()
        self.softmax_scale = config.softmax_scale

    def pack_projections(self, contiguous_only: bool = False) -> None:
        """Keep wq_a and wkv_a, both applied to the block's input, in one matrix (their weights become views
        of it): one GEMM, not two. (Stacked by rows: the views stay contiguous.)"""
        if self.q_lora_rank is not None and not (self.wq_a.is_fp8 or self.wkv_a.is_fp8) \
                and self.wq_a.bias is None and self.wkv_a.bias is None:
            pack(self, "wqkv_a", [self.wq_a.weight, self.wkv_a.weight])

    def project(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., D) -> q_nope (..., H, P), q_rope (..., H, R) rotated; and what a cache keeps: the kv latent
        (..., C) normalised and k_rope (..., R) rotated. freqs (..., R/2) per position."""
        wqkv_a = packed(self, "wqkv_a")
        if wqkv_a is not None:
            q_a, kv, k_rope = wqkv_a.matmul(x).split([self.q_lora_rank, self.kv_lora_rank, self.rope_dim], -1)
            q = self.wq_b(self.q_norm(q_a))
        else:
            q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
            kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_nope, q_rope = q.unflatten(-1, (-1, self.qk_dim)).split([self.nope_dim, self.rope_dim], dim=-1)
        # the queries' rope dims and the shared key's rotate as H + 1 heads in one product (one angle for all)
        rope = apply_rope(torch.cat([q_rope, k_rope.unsqueeze(-2)], dim=-2), freqs.unsqueeze(-2))
        return q_nope, rope[..., :-1, :], self.kv_norm(kv), rope[..., -1, :]

    def expand_kv(self, kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, S, C) and rotary key (B, S, R) -> per-head keys (B, S, H, P+R) and values (B, S, H, V)."""
        kv = self.wkv_b(kv).unflatten(-1, (-1, self.nope_dim + self.v_dim))  # (B, S, H, P+V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(-2).expand(-1, -1, kv.shape[-2], -1)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None = None,
                backend=None) -> torch.Tensor:
        """Full-sequence attention (training, scoring): mask None for causal, else a boolean (T, S) or
        (B, 1, T, S) mask, True where attention is allowed. With a backend (an inference engine's attention over
        its latent cache), backend(self, q_nope, q_rope, kv, k_rope) -> (..., H, V) stores the new latents and
        attends over the cached ones; the mask is then the backend's business."""
        q_nope, q_rope, kv, k_rope = self.project(x, freqs)
        if backend is not None:
            out = backend(self, q_nope, q_rope, kv, k_rope)
        else:
            k, v = self.expand_kv(kv, k_rope)
            out = attention(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, self.softmax_scale)  # (B, T, H, V)
        return self.wo(out.flatten(-2))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k (B, T|S, H, P+R), v (B, S, H, V); causal when mask is None.
    MLA's value heads are narrower than its query/key heads (128 vs 192 in V3); the fused SDPA kernels
    want them equal, so v is zero-padded and the padding cut from the output: forward and backward then take
    the flash kernel, not the unfused path that materialises the (T, S) scores."""
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.transpose(1, 2)[..., :dv]


# ---- the transformer -----------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        d = config.hidden_size
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn = MLA(config, layer_id)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        if config.is_moe_layer(layer_id):
            shared = None
            if config.n_shared_experts:
                shared = MLP(d, config.moe_intermediate_size * config.n_shared_experts)
            self.ffn = MoE(config, shared)
        else:
            self.ffn = MLP(d, config.intermediate_size)
        self.is_moe = isinstance(self.ffn, MoE)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None = None,
                stats: RoutingStats | None = None, backend=None) -> torch.Tensor:
        """x (..., D) -> (..., D). backend: an engine's attention over its cache (`MLA.forward`); it may compute
        some rows only (an MTP module drafting from each sequence's last row), and then names them
        (`backend.rows(x)`): the residual stream continues on those."""
        h = self.attn(self.attn_norm(x), freqs, mask, backend)
        x = h + (x if backend is None else backend.rows(x))
        return x + (self.ffn(self.ffn_norm(x), stats) if self.is_moe else self.ffn(self.ffn_norm(x)))


class DeepSeekV3(nn.Module):
    """Embedding -> blocks -> final norm -> head, plus the MTP modules (which share the embedding and head).
    `model(input_ids)` returns the main head's logits (B, T, vocab). Training passes `stats`, a RoutingStats
    into which every MoE layer the forward runs records its expert loads and balance loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        L, d = config.num_hidden_layers, config.hidden_size
        # uninitialised like every other weight (init_weights or a checkpoint fills it)
        self.embed = nn.Embedding(config.vocab_size, d, _weight=torch.empty(config.vocab_size, d))
        self.layers = nn.ModuleList(Block(config, i) for i in range(L))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = Linear(d, config.vocab_size)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config)
        self.mtp = nn.ModuleList(MTPModule(config, Block(config, L + k))
                                 for k in range(config.num_nextn_predict_layers))
        self.recompute = False  # training: keep only each block's input, recompute the rest in backward

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, stats: RoutingStats | None = None,
                      backend=None) -> torch.Tensor:
        """input_ids (B, T) -> the final-normed hidden states (B, T, D) that the head maps to logits.
        positions: (T,) or (B, T) (default 0..T-1); mask: None for causal, else boolean (B, 1, T, T), True where
        attention is allowed. Packed training rows pass both: positions restarting at each packed sample and a
        block-diagonal causal mask, so no sample sees another.
        backend: an inference engine's step (infer/model_runner.py): input_ids and positions are then the
        tokens its sequences feed, flattened (N,), and every MLA attends through it (`MLA.forward`)."""
        if backend is None:
            self._check_input(input_ids)
            if positions is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            freqs = self.rope(positions)
        else:  # (the engine computes a step's rotary factors once, for the MTP module too)
            freqs = backend.freqs(self.rope)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = self._run(layer, h, freqs, mask, stats, backend)
        return self.norm(h)

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, stats: RoutingStats | None = None) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids, positions, mask, stats))

    def mtp_hidden_states(self, h: torch.Tensor, input_ids: torch.Tensor, stats: RoutingStats | None = None,
                          positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run the MTP modules in sequence from the main model's hidden states h (B, T, D). Module k returns
        (B, T-k, D): position i sees tokens up to i+k and predicts token i+k+1. positions and mask as the main
        model's (packed sequences), cut to the first T-k positions."""
        T = input_ids.shape[1]
        outs = []
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            pos = torch.arange(T - k, device=input_ids.device) if positions is None else positions[..., :T - k]
            m = None if mask is None else mask[..., :T - k, :T - k]
            h = self._run(module, h[:, :T - k], self.embed(input_ids[:, k:]), self.rope(pos), m, stats)
            outs.append(h)
        return outs

    def forward_with_mtp(self, input_ids: torch.Tensor, stats: RoutingStats | None = None,
                         positions: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (main logits (B, T, V), [MTP module k's logits (B, T-k, V) for k = 1..D]), one pass. positions
        (T,) or (B, T) and mask (B, 1, T, T) for packed sequences (see `hidden_states`)."""
        h = self.hidden_states(input_ids, positions, mask, stats)
        mtp_h = self.mtp_hidden_states(h, input_ids, stats, positions, mask)
        return self.head(h), [self.head(m.norm(hk)) for m, hk in zip(self.mtp, mtp_h)]

    def pack_projections(self, contiguous_only: bool = False) -> "DeepSeekV3":
        """For inference: stack the projections that read the same input (MLA's wq_a | wkv_a; w1 | w3 of the
        dense MLPs, shared and routed experts) so each pair costs one GEMM. Parameters become views of the
        stacked tensors: values and state_dict are unchanged. FP8 weights stay as they are. Call it once the
        model has its final device and dtype; a later move or cast quietly returns to the unpacked path.
        contiguous_only: stack only where every parameter stays a contiguous view (not the routed experts'
        w1 | w3, stacked per expert): for a model that is also being trained, since torch's fused AdamW on
        CPU updates non-contiguous parameters wrongly (torch 2.13; tests/test_grpo.py shows it)."""
        for module in self.modules():
            if module is not self and hasattr(module, "pack_projections"):
                module.pack_projections(contiguous_only)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype


@torch.no_grad()
def init_weights(model: DeepSeekV3, std: float | None = None, generator: torch.Generator | None = None) -> None:
    """Every weight matrix and the embedding ~ N(0, std) (the V3 report: std 0.006 for all parameters);
    norms 1, biases and balancing biases 0. std defaults to config.initializer_range."""
    std = model.config.initializer_range if std is None else std
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            raise ValueError(f"{name} is stored in FP8; initialise the model before quantising it")
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=generator)
    for mod in model.modules():
        if isinstance(mod, MoE) and mod.gate.bias is not None:
            mod.gate.bias.zero_()
