"""Shared helpers: tiny random configs and models with every weight non-trivial (norms and balancing biases
randomised too, so a swapped or dropped tensor shows in the logits)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig, init_weights

# A small V3 with q_lora, 4 groups of 2 experts (keep 2), a shared expert, one MTP module, and widths that do
# not divide by 128 (so FP8 edge blocks are partial).
TINY = dict(
    vocab_size=300, hidden_size=200, intermediate_size=136, num_hidden_layers=3, num_attention_heads=3,
    max_position_embeddings=512, q_lora_rank=72, kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=24, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=40, num_experts_per_tok=3,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
    torch_dtype="float32",
)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.05) -> DeepSeekV3:
    g = torch.Generator().manual_seed(seed)
    model = DeepSeekV3(config)
    init_weights(model, std=std, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped without it (benchmarks/gpu_checks.sh runs them on a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """Engines calibrate their CPU kernels into a cache of the test session's own, not the user's."""
    old = os.environ.get("DSV3_CACHE_DIR")
    os.environ["DSV3_CACHE_DIR"] = str(tmp_path_factory.mktemp("dsv3-cache"))
    yield
    if old is None:
        os.environ.pop("DSV3_CACHE_DIR", None)
    else:
        os.environ["DSV3_CACHE_DIR"] = old


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP thread that loses
# its core stalls every parallel region: one thread keeps the suite fast and steady. (Tests never time.)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A JSONL corpus of a few built-in documents (json/, email/, string.py, textwrap.py): small training runs."""
    import json

    from dsv3.data.corpus import builtin_corpus
    docs = [d for d in builtin_corpus() if d.name.startswith(("json/", "email/", "string.py", "textwrap.py"))]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return str(path)
