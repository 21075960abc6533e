"""Bad input is refused before it touches anything: a request (its SamplingParams and prompt) before the engine
schedules it, a config that no model could run with when a ModelConfig is built or read. After a refused
request the engine is exactly as it was: the next generate gives what a fresh engine gives."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

import dsv3
from dsv3 import ModelConfig
from dsv3.infer import LLM, SamplingParams
from dsv3.tokenizer import train_bpe

from conftest import TINY, random_model, tiny_config

REFERENCE = pathlib.Path("/work/shared/reference")


# ---- requests ----------------------------------------------------------------------------------------------

def engine(model, **kw) -> LLM:
    return LLM(model, cpu_kernels=False, block_size=4, kv_cache_tokens=256, max_model_len=64, seed=0, **kw)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), std=0.2)


# greedy, seeded sampling and unseeded sampling (the engine's shared stream): a refused request must consume
# nothing of any of them
GOOD_PROMPTS = [[5, 9, 2, 7], [11, 3, 4], [8, 1, 6, 2, 9]]
GOOD_PARAMS = [SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True),
               SamplingParams(temperature=1.0, seed=3, max_new_tokens=6, ignore_eos=True),
               SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)]


@pytest.fixture(scope="module")
def fresh(model):
    """What a fresh engine answers: (request id, tokens) per good request."""
    return [(o.request_id, o.token_ids) for o in engine(model).generate(GOOD_PROMPTS, GOOD_PARAMS)]


def assert_as_fresh(llm: LLM, fresh) -> None:
    assert llm.requests == {} and not llm.has_unfinished()
    assert not llm.scheduler.waiting and not llm.scheduler.running
    assert [(o.request_id, o.token_ids) for o in llm.generate(GOOD_PROMPTS, GOOD_PARAMS)] == fresh


@pytest.mark.parametrize("kw", [
    dict(seed=2 ** 64), dict(seed=-2 ** 63 - 1), dict(seed=1.5), dict(seed=True), dict(seed="7"),
    dict(temperature=float("inf")), dict(temperature=True), dict(top_k=True), dict(max_new_tokens=True),
    dict(max_new_tokens=2.0), dict(stop=5), dict(stop=[1]), dict(stop_token_ids=[-1]), dict(stop_token_ids=[True]),
    dict(stop_token_ids=5), dict(stop_token_ids=["1"]), dict(ignore_eos="no"),
])
def test_sampling_params_refuse_bad_fields(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_seeds_torch_accepts_are_accepted():
    for seed in (0, 2 ** 64 - 1, -2 ** 63, -1):
        SamplingParams(seed=seed)


def mutated(**kw) -> SamplingParams:
    """Params made valid and changed afterwards (a dataclass is mutable): the engine checks them again."""
    p = SamplingParams(temperature=1.0, max_new_tokens=6)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


BAD_REQUESTS = [  # (prompt, params, what the error names)
    ([5, 9, 2], mutated(seed=2 ** 64), "seed"),  # the case: scheduled, then the generator failed
    ([5, 9, 2], mutated(seed=-2 ** 63 - 1), "seed"),
    ([5, 9, 2], mutated(seed=0.5), "seed"),
    ([5, 9, 2], mutated(temperature=-1.0), "temperature"),
    ([5, 9, 2], mutated(temperature=float("nan")), "temperature"),
    ([5, 9, 2], mutated(top_p=0.0), "top_p"),
    ([5, 9, 2], mutated(top_k=-2), "top_k"),
    ([5, 9, 2], mutated(top_k=2 ** 63), "top_k"),  # accepted, it broke every later step of the engine
    ([5, 9, 2], mutated(max_new_tokens=0), "max_new_tokens"),
    ([5, 9, 2], mutated(stop=[""]), "stop"),
    ([5, 9, 2], mutated(logprobs=21), "logprobs"),
    ([5, 9, 2], mutated(prompt_logprobs=-1), "prompt_logprobs"),
    ([5, 9, 2], mutated(stop_token_ids=[TINY["vocab_size"]]), "stop_token_ids"),
    ([5, 9, 2], "not params", "SamplingParams"),
    ([], None, "empty"),
    ([5, TINY["vocab_size"]], None, "vocabulary"),
    ([5, -1], None, "vocabulary"),
    ([5, 2.0], None, "token ids"),
    (None, None, "prompt"),
    (7, None, "prompt"),
    ("no tokenizer", None, "tokenizer"),
    ([1] * 64, None, "context"),
]


@pytest.mark.parametrize("prompt, params, names", BAD_REQUESTS)
def test_refused_request_leaves_the_engine_as_it_was(model, fresh, prompt, params, names):
    llm = engine(model)
    with pytest.raises(ValueError, match=names):
        llm.add_request(prompt, params)
    assert_as_fresh(llm, fresh)


def test_bad_cache_salt_is_refused(model, fresh):
    llm = engine(model)
    with pytest.raises(ValueError, match="cache_salt"):
        llm.add_request([5, 9, 2], SamplingParams(max_new_tokens=2), cache_salt=5)
    assert_as_fresh(llm, fresh)


@pytest.mark.parametrize("prompt, params, names", [
    ([5, 9, 2], mutated(seed=2 ** 64), "seed"), ([5, 9, 2], mutated(stop_token_ids=[10 ** 6]), "stop_token_ids"),
    ([5, TINY["vocab_size"]], None, "vocabulary")])
def test_bad_request_in_a_batch_adds_none_of_them(model, fresh, prompt, params, names):
    llm = engine(model)
    with pytest.raises(ValueError, match=names):
        llm.generate(GOOD_PROMPTS[:2] + [prompt] + GOOD_PROMPTS[2:], GOOD_PARAMS[:2] + [params] + GOOD_PARAMS[2:])
    assert_as_fresh(llm, fresh)


def test_interrupted_generate_leaves_nothing_behind(model, fresh):
    llm = engine(model)
    step, calls = llm.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    llm.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate(GOOD_PROMPTS, GOOD_PARAMS)
    llm.step = step
    assert llm.requests == {} and not llm.has_unfinished()
    assert [o.token_ids for o in llm.generate(GOOD_PROMPTS[:1], GOOD_PARAMS[:1])] == [fresh[0][1]]


def test_prompt_the_tokenizer_encodes_beyond_the_model_vocabulary():
    """A tokenizer with more tokens than the model's embedding: refused, not an IndexError in every later step."""
    text = "the cat sat on the mat. the dog ate the bone! "
    tok = train_bpe([text * 20], vocab_size=400)
    top = max(tok.encode(text))
    assert top > max(tok.encode("the")) and top > 8
    llm = engine(random_model(tiny_config(vocab_size=top)), tokenizer=tok)  # one row short
    with pytest.raises(ValueError, match="vocabulary"):
        llm.add_request(text, SamplingParams(max_new_tokens=2))
    assert llm.requests == {} and not llm.has_unfinished()
    out = llm.generate("the", SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="not valid text"):  # a lone surrogate (was the tokenizer's TypeError)
        llm.add_request("the \ud800 cat", SamplingParams(max_new_tokens=2))
    assert llm.requests == {} and not llm.has_unfinished()


# ---- model configs -----------------------------------------------------------------------------------------

YARN = dict(rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=128)


@pytest.mark.parametrize("kw, field", [
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"), (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"), (dict(rope_theta=0), "rope_theta"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(initializer_range=-0.02), "initializer_range"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
    (dict(bos_token_id=TINY["vocab_size"]), "bos_token_id"), (dict(bos_token_id=-1), "bos_token_id"),
    (dict(eos_token_id=TINY["vocab_size"]), "eos_token_id"), (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=[1, TINY["vocab_size"] + 5]), "eos_token_id"), (dict(eos_token_id=[1, True]), "eos_token_id"),
    (dict(eos_token_id=[1, "2"]), "eos_token_id"),
    (dict(pad_token_id=TINY["vocab_size"]), "pad_token_id"),
    (dict(YARN, rope_factor=float("nan")), "factor"),
    (dict(YARN, beta_fast=0.0), "beta_fast"), (dict(YARN, beta_slow=-1.0), "beta_slow"),
    (dict(YARN, mscale=-1.0), "mscale"), (dict(YARN, mscale_all_dim=float("inf")), "mscale_all_dim"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": 128}), "weight_block_size"),
    (dict(torch_dtype="banana"), "torch_dtype"), (dict(torch_dtype="int8"), "torch_dtype"),
    (dict(torch_dtype="auto"), "torch_dtype"), (dict(torch_dtype=""), "torch_dtype"),
])
def test_config_refuses_values_no_model_can_run_with(kw, field):
    with pytest.raises(ValueError, match=field) as e:
        tiny_config(**kw)
    bad = kw.get(field, kw.get("rope_factor"))
    if not isinstance(bad, (dict, list)) and field != "weight_block_size":
        assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def write_config(dirpath: pathlib.Path, **changes) -> pathlib.Path:
    d = tiny_config().to_hf()
    d.update(changes)
    (dirpath / "config.json").write_text(json.dumps(d))
    return dirpath / "config.json"


@pytest.mark.parametrize("changes, field", [
    (dict(rms_norm_eps=-1), "rms_norm_eps"), (dict(rope_theta=-1), "rope_theta"),
    (dict(eos_token_id=100000), "eos_token_id"), (dict(rope_theta=None), "rope_theta"),
    (dict(rope_theta="10000"), "rope_theta"), (dict(rope_theta=True), "rope_theta"),
    (dict(rope_scaling={"type": "yarn", "factor": "x"}), "factor"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": "x"}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 100.5}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 0}),
     "beta_fast"),  # (was read as "not given": 32)
    (dict(torch_dtype="bfloat61"), "torch_dtype"), (dict(torch_dtype=16), "torch_dtype"),
    (dict(torch_dtype=["bfloat16"]), "torch_dtype"), (dict(torch_dtype=None, dtype="int4"), "torch_dtype"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, changes, field):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=field) as e:
        ModelConfig.from_hf(tmp_path)
    assert str(path) in str(e.value)


def test_torch_dtype_names_the_real_configs_use_are_accepted(tmp_path):
    """torch_dtype is the dtype of the weights on disk: a dtype name as transformers writes it (float8 variants
    included: FP8 releases write them), torch's aliases, or nothing (the default, bfloat16)."""
    for name in ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "fp32", "bf16", "fp16", "half", "float", "torch.bfloat16", "BFloat16"):
        assert tiny_config(torch_dtype=name).torch_dtype == name
        write_config(tmp_path, torch_dtype=name)
        assert ModelConfig.from_hf(tmp_path).torch_dtype == name
    d = tiny_config().to_hf()
    for changes, want in ((dict(torch_dtype=None), "bfloat16"), (dict(dtype="float16"), "float16"),
                          (dict(dtype=None), "bfloat16"), (dict(torch_dtype=None, dtype=None), "bfloat16")):
        e = {k: v for k, v in d.items() if k != "torch_dtype"}
        assert ModelConfig.from_hf({**e, **changes}).torch_dtype == want, changes
    del d["torch_dtype"]
    assert ModelConfig.from_hf(d).torch_dtype == "bfloat16"


def test_a_bad_tokenizer_is_reported_before_the_weights_are_read(tmp_path):
    """LLM reads the tokenizer first: a tokenizer.json (or tokenizer_config.json) that does not parse is a
    ValueError naming that file, though the weights file beside it is garbage too (had the weights been read
    first, the error would name them)."""
    tok = train_bpe(["the cat sat on the mat " * 20], vocab_size=300)
    dsv3.save_pretrained(random_model(tiny_config(vocab_size=tok.vocab_size)), tmp_path, dtype=torch.float32,
                         tokenizer=tok)
    weights = tmp_path / "model.safetensors"
    assert weights.is_file()
    weights.write_bytes(b"\xff" * 64)  # a header length no file has: loading it fails at once
    with pytest.raises(ValueError, match="safetensors"):
        dsv3.load_pretrained(tmp_path)  # (what LLM would report if it read the weights first)
    good_config = (tmp_path / "tokenizer_config.json").read_text()
    for name, junk in (("tokenizer.json", "{not json"), ("tokenizer.json", ""), ("tokenizer_config.json", "[1, 2")):
        (tmp_path / name).write_text(junk)
        with pytest.raises(ValueError) as e:
            LLM(tmp_path, cpu_kernels=False, kv_cache_tokens=64)
        assert str(tmp_path / name) in str(e.value) and "safetensors" not in str(e.value), str(e.value)
        if name == "tokenizer.json":
            tok.save_pretrained(tmp_path)
        (tmp_path / "tokenizer_config.json").write_text(good_config)


def test_a_model_that_cannot_run_is_refused_at_load(tmp_path):
    dsv3.save_pretrained(random_model(tiny_config()), tmp_path, dtype=torch.float32)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(d, rms_norm_eps=-1)))
    with pytest.raises(ValueError, match="rms_norm_eps") as e:
        dsv3.load_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    with pytest.raises(ValueError, match="rms_norm_eps"):
        LLM(tmp_path, cpu_kernels=False, kv_cache_tokens=64)


# Real configs, as published (the fields that matter here), that must keep loading
DEEPSEEK_V2 = dict(  # DeepSeek-V2 / V2-Chat (236B): group-limited greedy routing, 16x routed scaling
    model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
    moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
    n_shared_experts=2, n_routed_experts=160, routed_scaling_factor=16.0, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="group_limited_greedy", n_group=8,
    topk_group=3, num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
    scoring_func="softmax", aux_loss_alpha=0.003, seq_aux=True, hidden_act="silu", max_position_embeddings=163840,
    initializer_range=0.02, rms_norm_eps=1e-6, rope_theta=10000, attention_bias=False, bos_token_id=100000,
    eos_token_id=100001, pad_token_id=None,
    rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                      original_max_position_embeddings=4096, type="yarn"),
)
KIMI_K2_LIKE = dict(  # DeepseekV3ForCausalLM with one group, beta_fast == beta_slow, a larger vocabulary
    model_type="deepseek_v3", vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64,
    n_shared_experts=1, n_routed_experts=384, routed_scaling_factor=2.827, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=1, topk_group=1,
    num_experts_per_tok=8, first_k_dense_replace=1, norm_topk_prob=True, scoring_func="sigmoid",
    max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=50000.0, bos_token_id=163584,
    eos_token_id=163585, num_nextn_predict_layers=0,
    rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)


def official_demo_config(path: pathlib.Path) -> dict:
    """The official inference demo's ModelArgs JSON -> HF config.json fields (the demo's defaults for the rest)."""
    a = json.loads(path.read_text())
    d = dict(model_type="deepseek_v3", vocab_size=a["vocab_size"], hidden_size=a["dim"],
             intermediate_size=a["inter_dim"], moe_intermediate_size=a["moe_inter_dim"],
             num_hidden_layers=a["n_layers"], first_k_dense_replace=a["n_dense_layers"],
             num_attention_heads=a["n_heads"], n_routed_experts=a["n_routed_experts"],
             n_shared_experts=a["n_shared_experts"], num_experts_per_tok=a["n_activated_experts"],
             n_group=a.get("n_expert_groups", 1), topk_group=a.get("n_limited_groups", 1),
             routed_scaling_factor=a.get("route_scale", 1.0), scoring_func=a.get("score_func", "softmax"),
             q_lora_rank=a["q_lora_rank"], kv_lora_rank=a["kv_lora_rank"], qk_nope_head_dim=a["qk_nope_head_dim"],
             qk_rope_head_dim=a["qk_rope_head_dim"], v_head_dim=a["v_head_dim"], max_position_embeddings=163840,
             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                               beta_slow=1, mscale=a.get("mscale", 1.0), mscale_all_dim=a.get("mscale", 1.0)))
    if d["scoring_func"] == "softmax":  # V2: greedy or group-limited greedy
        d["topk_method"] = "group_limited_greedy" if d["n_group"] > 1 else "greedy"
    return d


def test_every_preset_and_real_config_loads():
    for name in dsv3.config.PRESETS:
        c = ModelConfig.preset(name)
        assert ModelConfig.from_hf(c.to_hf()) == c
    configs = [DEEPSEEK_V2, KIMI_K2_LIKE]
    configs += [json.loads(p.read_text()) for p in sorted(REFERENCE.glob("*.json"))]
    configs += [official_demo_config(p) for p in sorted(REFERENCE.glob("official-inference-configs/*.json"))]
    assert len(configs) >= 2 + 1 + 4 or not REFERENCE.exists()
    for d in configs:
        c = ModelConfig.from_hf(d)
        assert ModelConfig.from_hf(c.to_hf()) == c
        assert math.isfinite(c.softmax_scale) and c.eos_token_id is not None
