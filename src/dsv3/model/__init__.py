from .model import DeepSeekV3, MLA, Block, RotaryEmbedding, apply_rope, init_weights, rope_inv_freq
from .moe import MoE, Gate, Experts, RoutingStats, moe_layers
from .mtp import MTPModule, mtp_loss
from .layers import Linear, RMSNorm, MLP
