"""ModelConfig: the HF config.json fields, round trips, presets, and a ValueError naming the fields at fault."""

from __future__ import annotations

import json
import pathlib

import pytest

from dsv3 import ModelConfig

REF = pathlib.Path("/work/shared/reference/deepseek-v3-hf-config.json")
REAL_V3 = json.loads(REF.read_text()) if REF.exists() else None
# DeepSeek-V2-Lite's config.json, as published (the fields that matter here)
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
}


@pytest.mark.skipif(REAL_V3 is None, reason="reference config not available")
def test_real_v3_config_round_trip():
    c = ModelConfig.from_hf(REAL_V3)
    assert c == ModelConfig.preset("671B").replace(extra=c.extra, initializer_range=c.initializer_range)
    assert c.rope_type == "yarn" and c.rope_factor == 40 and c.is_fp8
    out = c.to_hf()
    for k, v in REAL_V3.items():  # every field of the real file comes back with its value
        assert out[k] == v, k
    assert ModelConfig.from_hf(out) == c
    # 671B total in the main model, ~37B active per token (the report's figures)
    assert abs(c.num_params(include_mtp=False) / 1e9 - 671) < 1
    assert 36 < c.num_active_params() / 1e9 < 38


def test_v2_lite_config():
    c = ModelConfig.from_hf(V2_LITE)
    assert c.q_lora_rank is None and c.topk_method == "greedy" and c.scoring_func == "softmax"
    assert c.num_nextn_predict_layers == 0 and not c.norm_topk_prob
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * __import__("math").log(40) + 1) ** 2)
    assert c.rope_attention_factor == 1.0
    out = c.to_hf()
    assert out["auto_map"] == V2_LITE["auto_map"] and out["q_lora_rank"] is None
    assert out["architectures"] == ["DeepseekV2ForCausalLM"]
    assert ModelConfig.from_hf(out) == c


def test_transformers5_layout_is_read(tmp_path):
    """transformers 5 writes rope_parameters (with rope_theta inside) and `dtype` instead of torch_dtype."""
    d = dict(V2_LITE, model_type="deepseek_v3", dtype="float32", num_nextn_predict_layers=1)
    d.pop("rope_scaling"), d.pop("rope_theta"), d.pop("torch_dtype")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                            "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 1.0, "mscale_all_dim": 1.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = ModelConfig.from_hf(tmp_path)  # a directory works as well as a dict
    assert (c.rope_type, c.rope_theta, c.rope_factor, c.original_max_position_embeddings) == ("yarn", 5000.0, 8.0, 1024)
    assert c.torch_dtype == "float32"


@pytest.mark.parametrize("name", ["tiny", "bench-small", "671B"])
def test_presets(name):
    c = ModelConfig.preset(name)
    assert ModelConfig.from_hf(c.to_hf()) == c
    if name == "tiny":
        assert 1e6 < c.num_params() < 10e6
        assert c.q_lora_rank and c.n_group > 1 and c.n_routed_experts >= 8 and c.num_nextn_predict_layers == 1
        assert sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) >= 2
    if name == "bench-small":  # DESIGN.md's CPU benchmark model
        assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.first_k_dense_replace, c.num_attention_heads,
                c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                c.intermediate_size, c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts,
                c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor) == \
               (4096, 512, 4, 1, 8, 192, 128, 32, 16, 32, 1024, 16, 256, 1, 4, 4, 2, 2.5)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize("changes, fields", [
    (dict(n_routed_experts=10, n_group=4), ["n_routed_experts=10", "n_group=4"]),
    (dict(topk_group=5, n_group=4), ["topk_group=5", "n_group=4"]),
    (dict(num_experts_per_tok=5, n_group=4, topk_group=1, n_routed_experts=8), ["num_experts_per_tok=5"]),
    (dict(num_experts_per_tok=9, n_routed_experts=8), ["num_experts_per_tok=9"]),
    (dict(qk_rope_head_dim=7), ["qk_rope_head_dim=7"]),
    (dict(hidden_size=0), ["hidden_size=0"]),
    (dict(topk_method="random"), ["topk_method='random'"]),
    (dict(scoring_func="relu"), ["scoring_func='relu'"]),
    (dict(rope_type="linear"), ["linear"]),
    (dict(rope_type="yarn", rope_factor=0.5), ["factor=0.5"]),
    (dict(model_type="llama"), ["model_type='llama'"]),
    (dict(hidden_act="gelu"), ["hidden_act='gelu'"]),
    (dict(quantization_config={"quant_method": "gptq"}), ["quant_method='gptq'"]),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [64, 64]}), ["weight_block_size"]),
    (dict(n_routed_experts=8, n_group=8, topk_group=4, num_experts_per_tok=2), ["n_group=8", "top-2"]),
])
def test_validation_names_the_fields(changes, fields):
    base = ModelConfig.preset("tiny").to_hf()
    with pytest.raises(ValueError) as e:
        ModelConfig(**{**ModelConfig.preset("tiny").__dict__, **changes})
    for f in fields:
        assert f in str(e.value), (f, str(e.value))
    assert base  # the preset itself is valid


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="required field.*hidden_size"):
        ModelConfig.from_hf({k: v for k, v in V2_LITE.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="model_type='llama'.*LlamaForCausalLM"):
        ModelConfig.from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="n_group='four' must be of type int"):
        ModelConfig.from_hf(dict(V2_LITE, n_group="four", topk_method="group_limited_greedy"))
    with pytest.raises(ValueError, match="norm_topk_prob=1 must be of type bool"):
        ModelConfig.from_hf(dict(V2_LITE, norm_topk_prob=1))


def test_save_is_atomic_json(tmp_path):
    c = ModelConfig.preset("tiny")
    c.save(tmp_path / "config.json")
    assert ModelConfig.from_hf(tmp_path) == c
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
