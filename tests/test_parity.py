"""The model's ground truth: float32 logits within 1e-5 (max abs error over max abs logit) of
transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on the same weights, read from the same files."""

from __future__ import annotations

import logging

import pytest
import torch

import dsv3
from dsv3.ckpt.convert import fp8_cast

from conftest import random_model, rel_err, tiny_config

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
TOL = 1e-5

CONFIGS = {
    "q_lora+groups": dict(),
    "no_q_lora+one_group": dict(q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=2,
                                n_routed_experts=6, n_shared_experts=2, num_nextn_predict_layers=2),
    "no_norm_topk+scale1": dict(norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=0),
    "yarn": dict(rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
                 beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707, max_position_embeddings=128),
    "yarn+unequal_mscale": dict(rope_type="yarn", rope_factor=8.0, original_max_position_embeddings=16,
                                mscale=1.0, mscale_all_dim=0.5, max_position_embeddings=128, rope_theta=500.0),
    "attention_bias": dict(attention_bias=True),
}


def hf_logits(path, x, cls=None):
    cls = cls or transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path, quiet):
    config = tiny_config(**CONFIGS[name])
    model = random_model(config, seed=1)
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float32)
    # sequences longer than YaRN's original context, so the interpolated frequencies matter
    x = torch.randint(0, config.vocab_size, (2, 100 if config.rope_type == "yarn" else 37),
                      generator=torch.Generator().manual_seed(0))
    ours = dsv3.load_pretrained(tmp_path)
    with torch.no_grad():
        a = ours(x)
        assert torch.equal(a, model(x))  # save -> load is exact
    b = hf_logits(tmp_path, x)
    assert rel_err(a, b) <= TOL, rel_err(a, b)


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path, quiet):
    config = tiny_config()
    model = random_model(config, seed=2)
    fp8_dir, deq_dir = tmp_path / "fp8", tmp_path / "deq"
    dsv3.save_pretrained(model, fp8_dir, dtype=torch.float32, fp8=True)
    fp8_cast(fp8_dir, deq_dir, dtype=torch.float32)
    x = torch.randint(0, config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    kept = dsv3.load_pretrained(fp8_dir)  # FP8 weights stay FP8, dequantised per layer at run time
    assert kept.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert kept.layers[1].ffn.experts.w1.dtype == torch.float8_e4m3fn
    deq = dsv3.load_pretrained(fp8_dir, fp8=False)  # dequantised at load
    assert deq.layers[0].attn.wq_a.weight.dtype == torch.float32
    with torch.no_grad():
        a, a2 = kept(x), deq(x)
        # FP8 is a (slightly) different model: ~3% weight error, compounded through random layers
        b_full = model(x)
        assert 1e-3 < ((a - b_full).norm() / b_full.norm()).item() < 0.25
    assert rel_err(a, a2) <= 1e-5  # same weights; the FP8 experts run per expert, the plain ones grouped
    b = hf_logits(deq_dir, x)
    assert rel_err(a, b) <= TOL, rel_err(a, b)


def test_deepseek_v2_matches_transformers(tmp_path, quiet):
    for i, over in enumerate([
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),  # V2 (236B) style
        dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None),  # V2-Lite style
    ]):
        config = tiny_config(model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False,
                             routed_scaling_factor=1.5, num_nextn_predict_layers=0, n_shared_experts=2,
                             num_attention_heads=4,  # transformers checks hidden % heads for V2
                             rope_type="yarn", rope_factor=4.0, original_max_position_embeddings=32,
                             mscale=0.707, mscale_all_dim=0.707, **over)
        model = random_model(config, seed=3 + i)
        assert model.layers[1].ffn.gate.bias is None  # V2 has no balancing bias
        d = tmp_path / str(i)
        dsv3.save_pretrained(model, d, dtype=torch.float32)
        x = torch.randint(0, config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = dsv3.load_pretrained(d)(x)
        b = hf_logits(d, x, transformers.DeepseekV2ForCausalLM)
        assert rel_err(a, b) <= TOL, (over, rel_err(a, b))


def test_transformers_checkpoint_loads_in_dsv3(tmp_path, quiet):
    """The reverse direction: a checkpoint written by transformers (its own config layout, no MTP weights)."""
    hf_config = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=96, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    x = torch.randint(0, 320, (2, 64))
    with torch.no_grad():
        b = hf(x).logits
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.num_nextn_predict_layers == 0 and ours.config.rope_type == "yarn"
    with torch.no_grad():
        a = ours(x)
    assert rel_err(a, b) <= TOL, rel_err(a, b)



@pytest.mark.parametrize("name", ["q_lora+groups", "no_q_lora+one_group"])
def test_training_gradients_match_transformers(name, tmp_path, quiet):
    """The training path (grad enabled: RMSNorm's written-out backward, the gate-weighted grouped experts):
    the next-token loss and every parameter's gradient against transformers' autograd on the same weights."""
    from dsv3.ckpt.hf import hf_to_ours
    config = tiny_config(**CONFIGS[name])
    model = random_model(config, seed=4)
    dsv3.save_pretrained(model, tmp_path, dtype=torch.float32)
    ours = dsv3.load_pretrained(tmp_path).train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()
    x = torch.randint(0, config.vocab_size, (3, 41), generator=torch.Generator().manual_seed(0))
    losses = []
    for logits in (ours(x[:, :-1]), hf(x[:, :-1]).logits):
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=TOL)

    def our_grad(hf_name: str) -> torch.Tensor:
        layer, _, rest = hf_name.removeprefix("model.layers.").partition(".")
        if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # transformers' in-memory expert layout
            ex = ours.layers[int(layer)].ffn.experts
            return torch.cat([ex.w1.grad, ex.w3.grad], 1) if rest.endswith("gate_up_proj") else ex.w2.grad
        our_name, expert = hf_to_ours(hf_name, config.num_hidden_layers)
        g = ours.get_parameter(our_name).grad
        return g if expert is None else g[expert]

    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    assert len(hf_grads) == sum(1 for p in hf.parameters() if p.requires_grad)
    for hf_name, g in hf_grads.items():
        # sums over every token: float32 reassociation, relative to the tensor's largest entry
        assert rel_err(our_grad(hf_name), g) <= 1e-5, (hf_name, rel_err(our_grad(hf_name), g))
