"""dsv3 sft / grpo / distill end to end on a micro model: run directories, metrics, resumption to the same
numbers, the SFT loss's normalisation over micro-batches, and errors for bad input."""

import argparse
import json
import os

import pytest
import torch

import dsv3
from dsv3.data.chat import PackedChat, records_to_examples
from dsv3.data.tasks import TASKS
from dsv3.tokenizer import Tokenizer
from dsv3.train import distill, grpo, sft
from dsv3.train.objectives import SFT
from dsv3.train.train import add_args as train_args, main as train_main


def _parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    """A micro model pretrained for a few steps: a model directory with a tokenizer and chat template."""
    out = tmp_path_factory.mktemp("base") / "run"
    train_main(_parse(train_args, ["--preset", "micro", "--out", str(out), "--data", corpus_file, "--steps", "2",
                                   "--eval-every", "2", "--eval-batches", "1", "--no-plots", "--precision", "fp32"]))
    return str(out)


def _sft_args(base, out, steps, *extra):
    return _parse(sft.add_args, ["--init-from", base, "--out", str(out), "--task", "arithmetic", "--steps",
                                 str(steps), "--task-records", "64", "--seq-len", "128", "--batch-size", "4",
                                 "--micro-batch-size", "2", "--lr", "1e-3", "--eval-every", "2", "--eval-records", "4",
                                 "--eval-max-new-tokens", "8", "--save-every", "2", "--no-plots", "--precision", "fp32",
                                 *extra])


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_runs_resumes_to_the_same_losses_and_is_a_model_directory(base, tmp_path):
    whole = tmp_path / "whole"
    sft.main(_sft_args(base, whole, 4))
    parts = tmp_path / "parts"
    sft.main(_sft_args(base, parts, 2))
    sft.main(_sft_args(base, parts, 4))  # the same command with more steps: resumes at step 2
    a, b = _metrics(whole), _metrics(parts)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert all(k in a[-1] for k in ("val_loss", "eval_accuracy", "eval_format", "eval_length"))
    assert a[-1]["loss"] < a[0]["loss"]
    model = dsv3.load_pretrained(str(whole))  # the run directory is a model directory
    assert model.config.num_nextn_predict_layers == 1
    assert Tokenizer.from_dir(str(whole)).chat_template


def test_sft_refuses_a_changed_run_and_bad_records(base, tmp_path):
    run = tmp_path / "run"
    sft.main(_sft_args(base, run, 2))
    with pytest.raises(ValueError, match="other options"):
        sft.main(_sft_args(base, run, 4, "--completions", "answers"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    args = _sft_args(base, tmp_path / "r2", 2)
    args.task, args.data = None, str(bad)
    with pytest.raises(ValueError, match=f"{bad}:1"):
        sft.main(args)
    with pytest.raises(ValueError, match="--init-from"):
        sft.SFTConfig(out=str(tmp_path / "r3"), task="arithmetic")


def test_sft_loss_is_the_mean_over_the_steps_assistant_tokens_whatever_the_micro_batching(base):
    """SFT.prepare_step shares the step's token count out: two micro-batches give the loss of one."""
    tok = Tokenizer.from_dir(base)
    task = TASKS["arithmetic"]
    recs = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": task.trace(r)}]}
            for r in task.records("train", 12, 0)]
    for seed in range(20):  # a packing whose two halves hold different numbers of assistant tokens
        data = PackedChat(records_to_examples(tok, recs), 96, seed=seed, pad_id=2)
        whole = data.batch(0, 4)
        halves = [data.batch(0, 2), data.batch(2, 2)]
        if halves[0].num_loss_tokens != halves[1].num_loss_tokens:
            break
    model = dsv3.load_pretrained(base, dtype=torch.float32)
    trainer = argparse.Namespace(par=None, dp=1)
    obj = SFT(mtp_lambda=0.0, alpha=0.0)
    obj.prepare_step([whole], trainer)
    obj.prepare_step(halves, trainer)
    l_whole = obj(model, whole, None, 0)[0]
    l_halves = sum(obj(model, h, None, 0)[0] for h in halves) / 2
    assert halves[0].num_loss_tokens != halves[1].num_loss_tokens  # else a plain mean would agree too
    torch.testing.assert_close(l_halves, l_whole, rtol=1e-5, atol=0)
    # by hand: the summed cross-entropy over every label, over their count
    logits = model(whole.input_ids, positions=whole.positions, mask=whole.attention_mask())
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), whole.labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(l_whole, ce, rtol=1e-5, atol=0)


def _grpo_args(init, out, steps, *extra):
    return _parse(grpo.add_args, ["--init-from", init, "--out", str(out), "--task", "arithmetic", "--steps",
                                  str(steps), "--prompts-per-step", "2", "-G", "3", "--max-new-tokens", "12",
                                  "--seq-len", "64", "--micro-batch-size", "3", "--lr", "1e-3", "--eval-every", "2",
                                  "--eval-records", "3", "--save-every", "2", "--no-plots", "--task-records", "50",
                                  *extra])


def test_grpo_runs_logs_trls_metrics_and_resumes_to_the_same_numbers(base, tmp_path):
    whole = tmp_path / "whole"
    grpo.main(_grpo_args(base, whole, 4, "--num-iterations", "2", "--beta", "0.1"))
    parts = tmp_path / "parts"
    grpo.main(_grpo_args(base, parts, 2, "--num-iterations", "2", "--beta", "0.1"))
    grpo.main(_grpo_args(base, parts, 4, "--num-iterations", "2", "--beta", "0.1"))
    a, b = _metrics(whole), _metrics(parts)
    for key in ("loss", "reward", "kl", "completions/mean_length", "entropy"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for key in ("reward_std", "rewards/accuracy/mean", "rewards/format/std", "frac_reward_zero_std",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/max_length",
                "completions/clipped_ratio", "step_time_s"):
        assert key in a[0], key
    assert "eval_accuracy" in a[1] and "eval_accuracy" in a[3]
    assert a[0]["rollout"] == a[1]["rollout"] == 0 and a[2]["rollout"] == 1  # two updates per rollout batch
    assert a[0]["kl"] == 0.0  # the first update: the policy is still the reference
    assert a[0]["clip_ratio/region_mean"] == 0.0  # ... and pi_old
    assert a[1]["kl"] > 0.0


def test_grpo_checks_its_options(base, tmp_path):
    with pytest.raises(ValueError, match="num-generations"):
        grpo.main(_grpo_args(base, tmp_path / "a", 2, "-G", "1"))
    with pytest.raises(ValueError, match="task|data"):
        args = _grpo_args(base, tmp_path / "b", 2)
        args.task = None
        grpo.main(args)
    with pytest.raises(ValueError, match="seq-len"):
        grpo.main(_grpo_args(base, tmp_path / "c", 2, "--seq-len", "16"))


def test_distill_keeps_only_verified_well_formed_completions(base, tmp_path, monkeypatch):
    """A teacher whose answers are right for every other prompt: exactly those are kept, as chat records."""
    from dsv3.infer.engine import RequestOutput
    recs = TASKS["arithmetic"].records("train", 6, 0)

    class Teacher:
        tokenizer = Tokenizer.from_dir(base)

        def generate(self, prompts, params, use_tqdm=None):
            outs = []
            for i, _ in enumerate(prompts):
                r = recs[i]
                text = TASKS["arithmetic"].trace(r) if i % 2 == 0 else "<think>\n</think>\n\\boxed{0}"
                outs.append(RequestOutput(i, [], [5, 6, 1], text, "stop"))
            return outs

    kept, summary = distill.distill(Teacher(), recs)
    assert summary["kept"] == 3 and summary["acceptance_rate"] == 0.5
    assert [k["messages"][0]["content"] for k in kept] == [recs[i]["prompt"] for i in (0, 2, 4)]
    assert all(k["messages"][-1]["role"] == "assistant" for k in kept)
    # and the command end to end on the micro model (which answers nothing right): an empty, valid file
    out = tmp_path / "traces.jsonl"
    distill.main(_parse(distill.add_args, ["--teacher", base, "--task", "arithmetic", "-n", "4", "--out", str(out),
                                           "--max-new-tokens", "8"]))
    assert out.exists() and json.loads((tmp_path / "traces.jsonl.summary.json").read_text())["prompts"] == 4


def test_sft_under_torchrun_gives_one_process_losses(base, tmp_path):
    """dsv3 sft on two processes (FSDP2, each rank its own micro-batches, the loss normalised over both
    ranks' assistant tokens): the same losses as one process, to float32 reordering."""
    from multiproc import torchrun
    one = tmp_path / "one"
    sft.main(_sft_args(base, one, 3))
    two = tmp_path / "two"
    argv = ["--init-from", base, "--out", str(two), "--task", "arithmetic", "--steps", "3", "--task-records", "64",
            "--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--eval-every", "2",
            "--eval-records", "4", "--eval-max-new-tokens", "8", "--save-every", "2", "--no-plots", "--precision",
            "fp32", "--dp-shard", "2"]
    torchrun(["-m", "dsv3", "sft", *argv], nproc=2)
    a, b = _metrics(str(one)), _metrics(str(two))
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-5)
    assert os.path.isfile(two / "model.safetensors")  # rank 0 wrote the gathered model
