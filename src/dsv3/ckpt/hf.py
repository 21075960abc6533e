"""The Hugging Face checkpoint layout of DeepSeek-V3 and our module names: one table, both directions.

    ours                                  HF (as in the official release)
    embed.weight                          model.embed_tokens.weight
    norm.weight / head.weight             model.norm.weight / lm_head.weight
    layers.N.<block>                      model.layers.N.<block>
    mtp.K.{enorm,hnorm,eh_proj}.weight    model.layers.{L+K}.{enorm,hnorm,eh_proj}.weight
    mtp.K.norm.weight                     model.layers.{L+K}.shared_head.norm.weight
    mtp.K.block.<block>                   model.layers.{L+K}.<block>
    (embed, head: shared)                 model.layers.{L+K}.{embed_tokens, shared_head.head}.weight

and inside a block the `_BLOCK` table below. Routed experts are one stacked tensor per projection here
(`ffn.experts.w1` is (E, I, D)) and one tensor per expert there (`mlp.experts.E.gate_proj.weight`).
An FP8 weight `X.weight` comes with `X.weight_scale_inv` (ours: `X.weight_scale_inv`, or
`ffn.experts.w1_scale_inv` for stacked experts).
"""

from __future__ import annotations

import re

_BLOCK = {  # ours (within a block) -> HF (within model.layers.N); prefixes end at a dot or are whole names
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.": "self_attn.q_proj.",
    "attn.wq_a.": "self_attn.q_a_proj.",
    "attn.q_norm.": "self_attn.q_a_layernorm.",
    "attn.wq_b.": "self_attn.q_b_proj.",
    "attn.wkv_a.": "self_attn.kv_a_proj_with_mqa.",
    "attn.kv_norm.": "self_attn.kv_a_layernorm.",
    "attn.wkv_b.": "self_attn.kv_b_proj.",
    "attn.wo.": "self_attn.o_proj.",
    "ffn.w1.": "mlp.gate_proj.",
    "ffn.w2.": "mlp.down_proj.",
    "ffn.w3.": "mlp.up_proj.",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.": "mlp.shared_experts.gate_proj.",
    "ffn.shared_experts.w2.": "mlp.shared_experts.down_proj.",
    "ffn.shared_experts.w3.": "mlp.shared_experts.up_proj.",
}
_BLOCK_REV = {v: k for k, v in _BLOCK.items()}
_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT_REV = {v: k for k, v in _EXPERT.items()}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight"}
_MTP_REV = {v: k for k, v in _MTP.items()}
_MTP_SHARED = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
_TOP_REV = {v: k for k, v in _TOP.items()}

_EXPERT_HF = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_EXPERT_OURS = re.compile(r"ffn\.experts\.(w[123])(_scale_inv)?$")
_LAYER_HF = re.compile(r"model\.layers\.(\d+)\.(.+)$")

# Which HF weights the official FP8 release quantises: every projection of attention and of the MLPs
# (dense, routed, shared), in the main model and in the MTP block; never the embedding, the head, norms,
# the gate or the MTP module's eh_proj.
_QUANTIZABLE = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj|shared_experts\.(gate|up|down)_proj|experts\.\d+\.(gate|up|down)_proj))"
    r"\.weight$")


def is_quantizable(hf_name: str) -> bool:
    return _QUANTIZABLE.match(hf_name) is not None


def _map_prefix(rest: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if src.endswith("."):
            if rest.startswith(src):
                return dst + rest[len(src):]
        elif rest == src:
            return dst
    return None


def _block_to_hf(rest: str, prefix: str) -> list[tuple[str, int | None]]:
    m = _EXPERT_OURS.match(rest)
    if m:  # stacked experts: one HF name per expert, marked by the expert index
        suffix = "weight_scale_inv" if m.group(2) else "weight"
        return [(f"{prefix}mlp.experts.{{e}}.{_EXPERT[m.group(1)]}.{suffix}", -1)]
    hf = _map_prefix(rest, _BLOCK)
    if hf is None:
        raise KeyError(rest)
    return [(prefix + hf, None)]


def ours_to_hf(name: str, num_layers: int) -> list[tuple[str, int | None]]:
    """Our state-dict name -> [(HF name, None)], or for stacked experts [(template with {e}, -1)]."""
    if name in _TOP:
        return [(_TOP[name], None)]
    parts = name.split(".", 2)
    if parts[0] == "layers":
        return _block_to_hf(parts[2], f"model.layers.{parts[1]}.")
    if parts[0] == "mtp":
        k, rest = int(parts[1]), parts[2]
        prefix = f"model.layers.{num_layers + k}."
        if rest.startswith("block."):
            return _block_to_hf(rest[len("block."):], prefix)
        if rest in _MTP:
            return [(prefix + _MTP[rest], None)]
    raise KeyError(f"no HF name for {name!r}")


def hf_to_ours(hf_name: str, num_layers: int) -> tuple[str, int | None] | None:
    """HF name -> (our name, expert index or None). None for the MTP module's copies of the shared
    embedding and head, which we do not store twice. KeyError for a name we do not know."""
    if hf_name in _TOP_REV:
        return _TOP_REV[hf_name], None
    m = _LAYER_HF.match(hf_name)
    if not m:
        raise KeyError(hf_name)
    n, rest = int(m.group(1)), m.group(2)
    if n < num_layers:
        prefix = f"layers.{n}."
    else:
        k = n - num_layers
        if rest in _MTP_SHARED:
            return None
        if rest in _MTP_REV:
            return f"mtp.{k}.{_MTP_REV[rest]}", None
        prefix = f"mtp.{k}.block."
    e = _EXPERT_HF.match(rest)
    if e:
        scale = "_scale_inv" if e.group(3) == "weight_scale_inv" else ""
        return f"{prefix}ffn.experts.{_EXPERT_REV[e.group(2)]}{scale}", int(e.group(1))
    ours = _map_prefix(rest, _BLOCK_REV)
    if ours is None:
        raise KeyError(hf_name)
    return prefix + ours, None


def mtp_shared_names(num_layers: int, depth: int) -> list[tuple[str, str]]:
    """[(HF name of an MTP module's copy of a shared tensor, our name of the original)]."""
    return [(f"model.layers.{num_layers + k}.{hf}", ours) for k in range(depth) for hf, ours in _MTP_SHARED.items()]
