"""Model-parallel inference (parallel/inference.py): each rank's shard of a model directory against the whole
model, `torchrun -m dsv3 generate --tp/--ep` against one process (greedy tokens identical, plain and
speculative, FP32, BF16 and FP8), and `dsv3 serve` under torchrun through the openai client tests of
test_serve.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dsv3
from dsv3.ckpt.pretrained import load_pretrained, model_bytes
from dsv3.cli import main
from dsv3.infer import LLM, SamplingParams
from dsv3.parallel.inference import Sharding, check_layout
from dsv3.tokenizer import train_bpe

from conftest import random_model, tiny_config
from multiproc import free_port, torchrun

CORPUS = ["the cat sat on the mat. the dog ate the bone! hello world " * 20]
PROMPTS = ["hello world", "the cat sat", "dog"]


def make_model_dir(path, config, fp8: bool = False, std: float = 0.2):
    tok = train_bpe(CORPUS, vocab_size=300)
    dsv3.save_pretrained(random_model(config, std=std), path, dtype=torch.bfloat16, fp8=fp8, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def micro_dirs(tmp_path_factory):
    """The micro preset (2 heads, 8 experts) in BF16 and FP8; widths under 128, so every TP slice of an FP8
    projection cuts its scale blocks and is held dequantised."""
    config = dsv3.ModelConfig.preset("micro")
    d = tmp_path_factory.mktemp("mp")
    return {kind: make_model_dir(d / kind, config, fp8=kind == "fp8") for kind in ("bf16", "fp8")}


@pytest.fixture(scope="module")
def bench_small_fp8(tmp_path_factory):
    """bench-small in FP8: wkv_b, wo, the MLPs split on 128-block boundaries over 2 (kept FP8 with their scales
    sliced), wq_b (384 rows) does not (dequantised)."""
    return make_model_dir(tmp_path_factory.mktemp("mp") / "bench-small-fp8", dsv3.ModelConfig.preset("bench-small"),
                          fp8=True, std=0.1)


def shard_of(path, rank, tp, ep, world=2):
    config = dsv3.ModelConfig.from_hf(path)
    return load_pretrained(path, shard=Sharding(config, rank, world, tp, ep))


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2), (2, 2)])
def test_shards_are_exact_slices_and_hold_their_share(micro_dirs, bench_small_fp8, tp, ep):
    """Every tensor of rank 0 and rank 1 put back together (along the split dimension, experts in rank order) is
    the whole model's; replicated tensors are equal; the bytes per rank are the replicated ones plus half of
    the split ones."""
    for path in (micro_dirs["bf16"], micro_dirs["fp8"], bench_small_fp8):
        whole = load_pretrained(path)
        ranks = [shard_of(path, r, tp, ep) for r in (0, 1)]
        shards = [dict(m.state_dict()) for m in ranks]
        split_bytes = 0
        for name, full in whole.state_dict().items():
            if name not in shards[0]:  # the scale of an FP8 projection held dequantised
                assert name.endswith("_scale_inv") and shards[0][name[:-len("_scale_inv")]].dtype == whole.dtype
                continue
            parts = [s[name] for s in shards]
            dim = 0 if ".experts.w" in name and ep > 1 else (
                None if ".experts.w" in name else Sharding(whole.config, 0, 2, tp, ep).split_dim(name))
            if parts[0].dtype != full.dtype:  # an FP8 slice that would cut its scale blocks: held dequantised
                assert full.dtype == torch.float8_e4m3fn and tp > 1, name
                scale = whole.state_dict()[name + "_scale_inv"]
                full = dsv3.quant.fp8.weight_dequant(full, scale, parts[0].dtype)
            if dim is None:
                assert all(torch.equal(p, full) for p in parts), name
            else:
                assert all(p.shape[dim] * 2 == full.shape[dim] for p in parts), name
                assert torch.equal(torch.cat(parts, dim).float(), full.float()), name
                split_bytes += full.numel() * full.element_size()
        if path == bench_small_fp8 and tp > 1:  # split on 128-blocks: still FP8, scales sliced with the rows
            assert shards[0]["layers.1.attn.wkv_b.weight"].dtype == torch.float8_e4m3fn
            assert shards[0]["layers.1.attn.wq_b.weight"].dtype == torch.bfloat16  # 384 rows: 192 cut a block
        if path == micro_dirs["bf16"]:  # (no FP8 projections held dequantised: the share is exact)
            assert model_bytes(ranks[0]) == model_bytes(ranks[1]) == model_bytes(whole) - split_bytes // 2
            if ep > 1:  # each rank's routed experts: exactly half of them
                experts = [sum(t.numel() for n, t in s.items() if ".experts.w" in n) for s in shards]
                assert experts[0] == experts[1] == sum(t.numel() for n, t in whole.state_dict().items()
                                                       if ".experts.w" in n) // 2


def test_layouts_that_do_not_split_are_refused():
    c = tiny_config()  # 3 heads, 8 experts, vocabulary 300
    with pytest.raises(ValueError, match="num_attention_heads=3 divisible by 2"):
        check_layout(c, 2, 2, 1)
    with pytest.raises(ValueError, match="n_routed_experts divisible by 3"):
        check_layout(c, 3, 1, 3)
    with pytest.raises(ValueError, match="expected 1 or the number of processes"):
        check_layout(c, 4, 2, 1)
    with pytest.raises(ValueError, match="pass --tp 2"):
        check_layout(c, 2, 1, 1)
    check_layout(c, 2, 1, 2)


def generate(args, tmp_path, name, nproc=None):
    """`dsv3 generate` on the prompts, greedy -> token ids per prompt (in-process, or under torchrun)."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / f"{name}.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cmd = ["generate", "--input-file", str(prompts), "--raw", "--temperature", "0", "--max-new-tokens", "12",
           "--output-file", str(out), *args]
    if nproc is None:
        assert main(cmd) == 0
        log = ""
    else:
        log = torchrun(["-m", "dsv3", *cmd], nproc=nproc).stderr
    return [json.loads(line)["token_ids"] for line in out.read_text().splitlines()], log


# Computed in float32 (a BF16 checkpoint's weights are exact in it, an FP8 one's dequantised per layer as one
# process does): the split sums differ from one process's only by float32 reordering, far below the gaps
# between a random model's top logits. In bfloat16 each partial sum is rounded before the all-reduce adds it (one
# process rounds once), a difference of a few bf16 ulps that can turn a near-tie, so tokens are not compared there.
@pytest.mark.parametrize("kind, layout, spec", [
    ("bf16", ["--tp", "2"], []),
    ("bf16", ["--ep", "2"], []),
    ("bf16", ["--tp", "2", "--ep", "2"], ["--speculative", "mtp", "--speculative-policy", "always"]),
    ("fp8", ["--tp", "2"], []),
    ("fp8", ["--ep", "2"], ["--speculative", "mtp", "--speculative-policy", "always"]),
])
def test_torchrun_generate_equals_one_process(micro_dirs, tmp_path, quiet, kind, layout, spec):
    args = ["--model", str(micro_dirs[kind]), "--dtype", "float32", *spec]
    one, _ = generate(args, tmp_path, "one")
    two, log = generate(args + layout, tmp_path, "two", nproc=2)
    assert two == one
    sizes = [float(x) for x in log.split("weights per process ")[1].split(" MiB")[0].split(", ")]
    assert len(sizes) == 2 and sizes[0] == sizes[1]  # (the micro model splits evenly)


def test_torchrun_generate_fp8_blocks_kept(bench_small_fp8, tmp_path, quiet):
    """bench-small in FP8 under --tp 2 --ep 2: the projections whose slices fall on 128-blocks stay FP8."""
    args = ["--model", str(bench_small_fp8), "--dtype", "float32"]
    one, _ = generate(args, tmp_path, "one")
    two, _ = generate(args + ["--tp", "2", "--ep", "2"], tmp_path, "two", nproc=2)
    assert two == one


# ---- redundant experts (EPLB) ----------------------------------------------------------------------------------

def test_set_placement_holds_each_slots_expert(micro_dirs):
    """A rank's slots after a re-placement hold exactly the experts the placement names: kept, copied from
    another of its slots, or read from the model directory (BF16 and FP8 experts with their scales)."""
    from types import SimpleNamespace

    from dsv3.parallel.inference import initial_placement, install, set_placement

    for kind in ("bf16", "fp8"):
        path = micro_dirs[kind]
        config = dsv3.ModelConfig.from_hf(path)
        whole = load_pretrained(path)
        skew = torch.tensor([[40., 1, 1, 1, 1, 1, 1, 8], [1, 1, 30, 1, 1, 12, 1, 1]])
        first = initial_placement(config, 2, 2)  # equal loads: experts 0 and 1 replicated
        then = initial_placement(config, 2, 2, skew)
        for rank in (0, 1):
            shard = Sharding(config, rank, 2, 1, 2, first)
            model = install(load_pretrained(path, shard=shard), shard)
            for placement in (first, then, first):  # (the first call changes nothing)
                set_placement(SimpleNamespace(sharding=shard, model=model, model_path=str(path)), placement)
                for j, (moe, full) in enumerate(zip(moe_of(model), moe_of(whole))):
                    held = placement[j, 5 * rank: 5 * rank + 5].tolist()
                    assert moe.dispatcher.placement.tolist() == placement[j].tolist()
                    for name in ("w1", "w2", "w3", "w1_scale_inv"):
                        t, want = getattr(moe.experts, name), getattr(full.experts, name)
                        if want is not None:
                            assert all(torch.equal(t[slot], want[e]) for slot, e in enumerate(held)), (kind, name)
        assert not torch.equal(first, then)  # (the skew moved experts)


def moe_of(model):
    from dsv3.model.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def test_redundant_experts_even_out_a_skewed_load():
    """Pairs routed by a skewed load (Zipf over 16 experts, 4 groups, top-4) through the dispatcher of 2 ranks:
    with 4 redundant experts placed by EPLB on that load, the busiest rank carries <= 1.1x the mean; with
    none, far more. (Counting only: the counts are what every rank sees, no process group needed.)"""
    from dsv3.parallel.eplb import rebalance_experts
    from dsv3.parallel.inference import PlacedExperts

    E, K, N = 16, 4, 4096
    g = torch.Generator().manual_seed(0)
    p = 1.0 / torch.arange(1, E + 1).double() ** 1.2
    p = p[torch.randperm(E, generator=g)]
    experts = torch.stack([torch.multinomial(p, K, generator=g) for _ in range(N)])  # (N, K) distinct per token
    load = torch.bincount(experts.flatten(), minlength=E).double()[None]
    ratios = {}
    for R in (0, 4):
        placement = rebalance_experts(load, E + R, 4, 1, 2)[0][0] if R else torch.arange(E)
        d = PlacedExperts(E, K, placement, rank=0, world=2)
        for step in range(8):  # a step's batch of 512 tokens at a time
            d.dispatch(torch.zeros(512, 1), torch.ones(512, K), experts[step * 512:(step + 1) * 512])
        per_rank = d.slot_load.view(2, -1).sum(-1)
        assert per_rank.sum() == N * K and torch.equal(d.load, load[0])
        ratios[R] = (per_rank.max() / per_rank.mean()).item()
    assert ratios[4] <= 1.1 < 1.2 < ratios[0], ratios


def test_torchrun_redundant_experts_keep_greedy_output(micro_dirs, tmp_path, quiet):
    """Replicas hold the same weights: with redundant experts, an initial placement from expert loads, and
    re-placements every 2 forwards (experts read from the directory mid-generation), greedy tokens are one
    process's."""
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps([[40, 1, 1, 1, 1, 1, 1, 8], [1, 1, 30, 1, 1, 12, 1, 1]]))
    for kind in ("bf16", "fp8"):
        args = ["--model", str(micro_dirs[kind]), "--dtype", "float32"]
        one, _ = generate(args, tmp_path, "one")
        two, log = generate(args + ["--ep", "2", "--num-redundant-experts", "2", "--expert-loads", str(loads),
                                    "--eplb-interval", "2"], tmp_path, "two", nproc=2)
        assert two == one
        assert "10 slots for 8 experts" in log


def test_redundant_expert_flags_need_expert_parallelism(micro_dirs, tmp_path, quiet, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    assert main(["generate", "--model", str(micro_dirs["bf16"]), "--input-file", str(prompts),
                 "--num-redundant-experts", "2"]) == 2
    assert "--ep N" in capsys.readouterr().err


# ---- dsv3 serve under torchrun, through test_serve.py's openai client tests ------------------------------------

from test_serve import (CONTEXT, MODEL, test_chat_equals_engine_and_streaming_equals_non_streaming,  # noqa: E402,F401
                        test_chat_logprobs, test_completions_string_token_ids_and_n, test_echo_logprobs_are_the_models_own,
                        test_models, test_seed_reproducibility, test_stop_strings)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


class TorchrunServer:
    """`torchrun --nproc-per-node 2 -m dsv3 serve --tp 2 --ep 2 --num-redundant-experts 2` on a free port of
    127.0.0.1."""

    def __init__(self, model_dir, log_path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--max-restarts=0", "-m", "dsv3", "serve", "--model", str(model_dir),
               "--port", str(port), "--served-model-name", MODEL, "--max-model-len", str(CONTEXT),
               "--tp", "2", "--ep", "2", "--num-redundant-experts", "2", "--threads", "1", "--log-level", "warning"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.http = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, f"the server exited: {open(log_path).read()[-4000:]}"
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the server did not start: {open(log_path).read()[-4000:]}"
            time.sleep(0.5)

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        """SIGTERM as a user's Ctrl-C would send: rank 0's server shuts down and releases rank 1."""
        self.http.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_bpe(CORPUS, vocab_size=300)
    model = random_model(tiny_config(vocab_size=300, num_attention_heads=4), std=0.2)  # (300: splits over 2)
    d = tmp_path_factory.mktemp("serve-mp") / MODEL
    dsv3.save_pretrained(model, d, dtype=torch.float32, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = TorchrunServer(model_dir, tmp_path_factory.mktemp("log") / "serve.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def ref(model_dir):
    return LLM(model_dir, max_model_len=CONTEXT, kv_cache_tokens=1024)


@pytest.fixture(scope="module")
def model(model_dir):
    return dsv3.load_pretrained(model_dir)


def test_rebalance_re_places_experts_and_keeps_greedy_output(server, client, ref):
    """POST /rebalance: the redundant experts placed by the loads served so far before the next step; the greedy
    reply is the one-process engine's before and after. /metrics reports the balance."""
    def reply():
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the cat"}],
                                           temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
        return r.choices[0].message.content
    want = ref.generate([ref.tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=True)],
                        SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0].text
    assert reply() == want
    r = server.http.post("/rebalance")
    assert r.status_code == 200 and r.json()["status"] == "scheduled", r.text
    assert r.json()["before"] >= 1.0
    assert reply() == want  # (the re-placement ran before this reply's first step)
    metrics = server.http.get("/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("dsv3_expert_load_max_over_mean "))
    assert float(line.split()[1]) >= 1.0
    assert "dsv3_expert_slots 10" in metrics and "dsv3_expert_rebalances_total 1" in metrics
