"""ModelConfig: one dataclass with the field names of the Hugging Face `config.json` of DeepSeek-V3
(`model_type: deepseek_v3`), which also reads DeepSeek-V2 / V2-Lite configs (`deepseek_v2`).

Field names are the HF ones so that a real config.json maps onto it one to one; the YaRN block of
`rope_scaling` is flattened into `rope_*` fields. Unknown keys of a config.json are kept in `extra` and
written back by `to_hf()`, so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

_TYPES = {  # the annotations below, as isinstance() checks (int is accepted where a float is expected)
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
    "int | None": (int, type(None)), "dict | None": (dict, type(None)),
    "int | list[int] | None": (int, list, type(None)),
}
_ARCHS = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
# torch_dtype: the names transformers writes (float8 ones in FP8 releases) and the aliases load_pretrained reads,
# compared without a "torch." prefix and case
_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_DTYPE_ALIASES = ("fp32", "float", "bf16", "fp16", "half")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"  # "deepseek_v3" or "deepseek_v2"
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168  # d, the residual stream width
    intermediate_size: int = 18432  # hidden width of the dense MLP layers
    num_hidden_layers: int = 61  # main-model blocks (MTP blocks come after these)
    num_attention_heads: int = 128
    max_position_embeddings: int = 163840  # longest context the model is configured for
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006  # std of the normal init (V3 report: 0.006 for all parameters)
    # mla
    q_lora_rank: int | None = 1536  # query latent width; None: a plain q_proj (V2-Lite)
    kv_lora_rank: int = 512  # the cached kv latent
    qk_nope_head_dim: int = 128  # per-head query/key part without position
    qk_rope_head_dim: int = 64  # per-head decoupled rotary part (one key shared by all heads)
    v_head_dim: int = 128
    attention_bias: bool = False  # biases on q_a_proj, kv_a_proj_with_mqa, o_proj
    # moe
    n_routed_experts: int | None = 256  # None: every layer dense
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048  # hidden width of one expert
    num_experts_per_tok: int = 8  # top-k
    n_group: int = 8  # expert groups for group-limited routing
    topk_group: int = 4  # groups kept per token
    topk_method: str = "noaux_tc"  # noaux_tc (V3) | greedy | group_limited_greedy (V2)
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum 1
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3  # the first k layers use the dense MLP
    moe_layer_freq: int = 1  # after those, every moe_layer_freq-th layer is MoE
    aux_loss_alpha: float = 0.001  # balance-loss weight (training only)
    seq_aux: bool = True  # sequence-wise balance loss (training only)
    # mtp
    num_nextn_predict_layers: int = 1  # MTP depth D; weights at layers num_hidden_layers .. +D-1
    # rope / yarn
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    rope_factor: float = 1.0  # yarn: context extension factor s
    original_max_position_embeddings: int = 4096  # yarn: context length of pretraining
    beta_fast: float = 32.0  # yarn: rotations bounding the extrapolated band
    beta_slow: float = 1.0  # yarn: rotations bounding the interpolated band
    mscale: float = 1.0  # yarn: cos/sin scale mscale(s, mscale) / mscale(s, mscale_all_dim)
    mscale_all_dim: float = 0.0  # yarn: softmax scale multiplied by mscale(s, mscale_all_dim)^2
    # tokens
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # storage
    torch_dtype: str = "bfloat16"  # dtype of the non-quantised weights on disk
    quantization_config: dict | None = None  # FP8 block scaling, as the official release
    extra: dict = field(default_factory=dict)  # config.json keys we do not interpret, kept for to_hf()

    def __post_init__(self) -> None:
        """Refuse a config no model can run with: each check raises ValueError naming the field and its value."""
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _TYPES[f.type]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"{f.name}={value!r} must be of type {f.type}")
            if f.type == "float" and not math.isfinite(value):
                raise ValueError(f"{f.name}={value!r} must be a finite number")
        if self.q_lora_rank == 0:
            self.q_lora_rank = None  # the official demo writes 0 for "no q latent"
        if self.model_type not in _ARCHS:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {sorted(_ARCHS)}")
        self._check_sizes()
        self._check_numerics()
        self._check_token_ids()
        if self.n_routed_experts is not None:
            self._check_moe()
        self._check_rope()
        if self.quantization_config is not None:
            self._check_quantization()
        if self.torch_dtype.removeprefix("torch.").lower() not in _DTYPE_NAMES + _DTYPE_ALIASES:
            raise ValueError(f"torch_dtype={self.torch_dtype!r} is not a dtype name; expected one of "
                             f"{', '.join(_DTYPE_NAMES)} (or leave it out: bfloat16)")

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.qk_nope_head_dim < 0:
            raise ValueError(f"qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank={self.q_lora_rank} must be positive, or 0/None for no q latent")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; DeepSeek models use 'silu'")
        if self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0")
        if self.first_k_dense_replace < 0:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be >= 0")
        if self.first_k_dense_replace > 0 or self.n_routed_experts is None:
            if self.intermediate_size <= 0:
                raise ValueError(f"intermediate_size={self.intermediate_size} must be positive for dense layers")

    def _check_numerics(self) -> None:
        # eps <= 0 divides by zero on a zero row; theta <= 0 gives NaN frequencies: every forward would fail
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if self.initializer_range < 0:
            raise ValueError(f"initializer_range={self.initializer_range} must be >= 0 (a standard deviation)")

    def _check_token_ids(self) -> None:
        V = self.vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [] if value is None else [value]
            for i in ids:
                if not isinstance(i, int) or isinstance(i, bool):
                    raise ValueError(f"{name}={value!r} must hold integer token ids")
                if not 0 <= i < V:
                    raise ValueError(f"{name}={value!r}: token id {i} is outside the vocabulary [0, vocab_size={V})")

    def _check_rope(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; expected 'yarn' or none")
        if self.rope_type != "yarn":
            return
        if self.rope_factor < 1:
            raise ValueError(f"rope_scaling.factor={self.rope_factor} must be >= 1")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(f"rope_scaling.original_max_position_embeddings="
                             f"{self.original_max_position_embeddings} must be positive")
        for name in ("beta_fast", "beta_slow"):  # rotation counts: the correction range divides by them
            if getattr(self, name) <= 0:
                raise ValueError(f"rope_scaling.{name}={getattr(self, name)} must be > 0")
        for name in ("mscale", "mscale_all_dim"):  # 0: off
            if getattr(self, name) < 0:
                raise ValueError(f"rope_scaling.{name}={getattr(self, name)} must be >= 0")

    def _check_quantization(self) -> None:
        qc = self.quantization_config
        if qc.get("quant_method") != "fp8":
            raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; "
                             "only the official block-scaled 'fp8' is")
        block = qc.get("weight_block_size", [128, 128])
        if not isinstance(block, (list, tuple)) or list(block) != [128, 128]:
            raise ValueError(f"quantization_config.weight_block_size={block!r} is not supported; expected [128, 128]")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt={qc.get('fmt')!r} is not supported; expected 'e4m3'")

    def _check_moe(self) -> None:
        E, G = self.n_routed_experts, self.n_group
        if E <= 0:
            raise ValueError(f"n_routed_experts={E} must be positive (or null for a dense model)")
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq={self.moe_layer_freq} must be >= 1")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        if self.aux_loss_alpha < 0:
            raise ValueError(f"aux_loss_alpha={self.aux_loss_alpha} must be >= 0")
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r} is not supported; expected one of {_TOPK_METHODS}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func={self.scoring_func!r} is not supported; expected 'sigmoid' or 'softmax'")
        if not 1 <= self.num_experts_per_tok <= E:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={E}]")
        if self.topk_method == "greedy":
            return  # no groups
        if G < 1 or E % G:
            raise ValueError(f"n_routed_experts={E} must divide into n_group={G} equal groups")
        if not 1 <= self.topk_group <= G:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={G}]")
        kept = self.topk_group * (E // G)
        if self.num_experts_per_tok > kept:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {kept} experts that "
                             f"topk_group={self.topk_group} of n_group={G} groups hold")
        if self.topk_method == "noaux_tc" and E // G < 2 and G > 1:
            raise ValueError(f"noaux_tc scores a group by its top-2 experts, so each of the n_group={G} groups "
                             f"needs >= 2 of the n_routed_experts={E}")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale = scale * m * m  # YaRN: attention temperature sqrt(1/t) = 0.1 ln s + 1, applied to q.k
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """The factor on cos/sin (DeepSeek's HF YaRN): 1.0 for every released config (mscale == mscale_all_dim)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor)

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def is_fp8(self) -> bool:
        return self.quantization_config is not None

    def is_moe_layer(self, layer_id: int) -> bool:
        """MTP blocks (layer_id >= num_hidden_layers) follow the same rule as the main model's."""
        return (self.n_routed_experts is not None and layer_id >= self.first_k_dense_replace
                and layer_id % self.moe_layer_freq == 0)

    def num_params(self, include_mtp: bool = True) -> int:
        """Parameter count from the sizes alone (no model built)."""
        d, H = self.hidden_size, self.num_attention_heads
        qk, b = self.qk_head_dim, int(self.attention_bias)
        if self.q_lora_rank is None:
            attn = d * H * qk
        else:
            attn = d * self.q_lora_rank + b * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + b * (self.kv_lora_rank + self.qk_rope_head_dim)
        attn += self.kv_lora_rank + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        attn += H * self.v_head_dim * d + b * d

        def block(i: int) -> int:
            if self.is_moe_layer(i):
                E, m = self.n_routed_experts, self.moe_intermediate_size
                ffn = 3 * d * m * (E + self.n_shared_experts) + E * d  # (the balancing bias is a buffer)
            else:
                ffn = 3 * d * self.intermediate_size
            return attn + ffn + 2 * d

        total = sum(block(i) for i in range(self.num_hidden_layers))
        total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d
        if include_mtp:
            L = self.num_hidden_layers
            total += sum(block(L + k) + 2 * d * d + 3 * d for k in range(self.num_nextn_predict_layers))
        return total

    def num_active_params(self) -> int:
        """Parameters one token touches in the main model (embedding row excluded, head included)."""
        if self.n_routed_experts is None:
            return self.num_params(include_mtp=False) - self.vocab_size * self.hidden_size
        idle = self.n_routed_experts - self.num_experts_per_tok
        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        per_expert = 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_params(include_mtp=False) - n_moe * idle * per_expert - self.vocab_size * self.hidden_size

    # ---- HF config.json ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "ModelConfig":
        """Read an HF config.json (a path to the file or to its directory, or the parsed dict)."""
        if isinstance(path_or_dict, dict):
            d, where = dict(path_or_dict), "config"
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no config.json at {p}")
            try:
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise ValueError(f"{p} must hold a JSON object, not {type(d).__name__}")
            where = p
        mt = d.get("model_type")
        if mt not in _ARCHS:
            archs = d.get("architectures") or []
            hint = f" (architectures={archs})" if archs else ""
            raise ValueError(f"{where}: model_type={mt!r}{hint} is not a DeepSeek-V3/V2 model; "
                             f"expected one of {sorted(_ARCHS)}")
        v2 = mt == "deepseek_v2"
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        if d.get("n_routed_experts") is not None:
            required += ["moe_intermediate_size", "num_experts_per_tok"]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ValueError(f"{where}: required field(s) missing: {', '.join(missing)}")

        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_type", "rope_factor", "beta_fast",
                                                             "beta_slow", "mscale", "mscale_all_dim",
                                                             "original_max_position_embeddings", "rope_theta"}
        nullable = {"q_lora_rank", "n_routed_experts", "bos_token_id", "eos_token_id", "pad_token_id",
                    "quantization_config"}
        kw: dict[str, Any] = {k: d[k] for k in names if k in d and (d[k] is not None or k in nullable)}
        if v2:  # HF's DeepseekV2Config defaults, where a V2 config.json leaves a field out
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("routed_scaling_factor", 1.0)
            kw.setdefault("first_k_dense_replace", 0)
            kw.setdefault("num_nextn_predict_layers", 0)
            kw.setdefault("n_shared_experts", 2 if d.get("n_routed_experts") else 0)
            kw.setdefault("n_group", 1)
            kw.setdefault("topk_group", 1)
            kw.setdefault("bos_token_id", 100000)
            kw.setdefault("eos_token_id", 100001)
        else:
            kw.setdefault("num_nextn_predict_layers", 0)  # a v3 config without the field has no MTP weights
        dtype = d.get("torch_dtype")
        if dtype is None:
            dtype = d.get("dtype")  # transformers >= 4.56 writes "dtype"; neither (or null): the default
        if dtype is not None:
            kw["torch_dtype"] = dtype
        kw.setdefault("n_group", 1)  # V2-Lite and greedy configs write null here
        kw.setdefault("topk_group", 1)

        # rope: legacy `rope_scaling` + `rope_theta`, or transformers 5's `rope_parameters`
        rp = d.get("rope_parameters") or {}
        rs = d.get("rope_scaling") or {}
        if not isinstance(rs, dict) or not isinstance(rp, dict):
            raise ValueError(f"{where}: rope_scaling / rope_parameters must be objects")
        rope = {**rp, **rs}
        theta = d.get("rope_theta")
        if theta is None:  # (transformers 5 keeps it in rope_parameters; an explicit null is an error)
            theta = rope.get("rope_theta", None if "rope_theta" in d else 10000.0)
        kw["rope_theta"] = _number(where, "rope_theta", theta)
        rtype = rope.get("type", rope.get("rope_type", "default")) or "default"
        kw["rope_type"] = rtype
        if rtype == "yarn":
            mpe = d.get("max_position_embeddings")
            factor = rope.get("factor")
            omp = _number(where, "rope_scaling.original_max_position_embeddings",
                          rope.get("original_max_position_embeddings", mpe), integer=True)
            if factor is None:
                if not (mpe and omp):
                    raise ValueError(f"{where}: rope_scaling of type yarn needs 'factor'")
                factor = _number(where, "max_position_embeddings", mpe) / omp
            kw.update(rope_factor=_number(where, "rope_scaling.factor", factor), original_max_position_embeddings=omp,
                      **{k: _number(where, f"rope_scaling.{k}", default if rope.get(k) is None else rope.get(k))
                         for k, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("mscale", 0.0),
                                            ("mscale_all_dim", 0.0))})
        used = names | {"rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype"}
        derived = {"qk_head_dim", "head_dim", "num_key_value_heads", "architectures", "transformers_version"}
        kw["extra"] = {k: v for k, v in d.items() if k not in used and k not in derived}
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:  # (a value the checks of __post_init__ refuse, named with the file)
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """The config.json dict, in the layout of the official release (legacy rope_scaling + rope_theta)."""
        d: dict[str, Any] = {"architectures": [_ARCHS[self.model_type]], "model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "model_type", "rope_type", "rope_factor", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "original_max_position_embeddings", "quantization_config"):
                continue
            d[f.name] = getattr(self, f.name)
        if self.q_lora_rank is None:
            d["q_lora_rank"] = None
        # transformers reads these; MLA has as many kv heads as q heads once expanded
        d["num_key_value_heads"] = self.num_attention_heads
        d["rope_scaling"] = None
        if self.rope_type == "yarn":
            d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor,
                                 "original_max_position_embeddings": self.original_max_position_embeddings,
                                 "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                                 "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim}
        if self.quantization_config is not None:
            d["quantization_config"] = dict(self.quantization_config)
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    def save(self, path: str | os.PathLike) -> None:
        from .ckpt.io import atomic_write_text
        atomic_write_text(os.fspath(path), json.dumps(self.to_hf(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])


def _number(where: str, name: str, value: Any, integer: bool = False) -> float | int:
    """A config.json number (JSON may write 4096.0 for an integer) -> float, or int; ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        raise ValueError(f"{where}: {name}={value!r} must be {'an integer' if integer else 'a number'}")
    return int(value) if integer else float(value)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_V3_FULL = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
    max_position_embeddings=163840, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, moe_intermediate_size=2048, num_experts_per_tok=8,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3, num_nextn_predict_layers=1,
    rope_type="yarn", rope_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
    mscale=1.0, mscale_all_dim=1.0,
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [128, 128]},
)

PRESETS: dict[str, dict] = {
    # A few million parameters: trains on a laptop CPU in minutes, yet has every part of the real model
    # (q latent, 3 MoE layers of 8 experts in 4 groups, a shared expert, one MTP module).
    "tiny": dict(
        vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=2048, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=128, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        torch_dtype="float32",
    ),
    # For tests: every part of the model, trained in seconds.
    "micro": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=512, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        torch_dtype="float32",
    ),
    # The CPU benchmark model of DESIGN.md.
    "bench-small": dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=4096, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=256, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        torch_dtype="float32",
    ),
    # GPU-sized models with the recipe's shapes (~125M and ~1B parameters in all, MTP included).
    "125M": dict(
        vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        max_position_embeddings=4096, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=128, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
    ),
    "1B": dict(
        vocab_size=32768, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
        max_position_embeddings=4096, q_lora_rank=768, kv_lora_rank=384, qk_nope_head_dim=96, qk_rope_head_dim=48,
        v_head_dim=96, n_routed_experts=48, n_shared_experts=1, moe_intermediate_size=256, num_experts_per_tok=4,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
    ),
    # DeepSeek-V3 / R1 as released (FP8 weights, 128K context through YaRN).
    "671B": _V3_FULL,
}
