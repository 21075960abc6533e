"""GRPO on a CPU: `dsv3 grpo` against TRL's GRPOTrainer, in one run, on the same model directory (transformers
reads ours), the same train prompts in the same order, the same rewards (dsv3.train.rewards, called by both
through a thin adapter on TRL's side) and the same hyperparameters. It prints the time of each optimizer step
(generation, rewards, forward/backward and optimizer: the whole step) and its mean reward for both, the median
and mean step time without the first step (warm-up: the first products, first allocations, dsv3's kernel
choice), their ratio, the reward over the last five steps, and how close each side comes to the step's
floor: its FLOPs over this machine's fp32 matmul peak, measured in the same run.

dsv3 runs first, as a subprocess (`python -m dsv3 grpo`, its metrics read from RUN/metrics.jsonl); TRL then
runs in this process, on the same number of torch threads (both take torch's default unless --threads).
Both start from the model directory's weights and use the same AdamW (torch's fused kernel; weight decay 0.1
on matrices and embeddings, none on norms; betas 0.9, 0.95; gradient clip 1.0) and the same learning-rate
schedule (dsv3's function, given to TRL's Trainer as its scheduler).

How TRL's batch settings are mapped (TRL 1.x counts rows, i.e. completions, not prompts): one optimizer step
takes P prompts x G completions, generated once, in micro-batches of M completions:
    num_generations = G, per_device_train_batch_size = M, gradient_accumulation_steps = P*G/M,
    steps_per_generation = P*G/M (TRL's default: = gradient_accumulation_steps), so generation_batch_size = P*G,
    num_iterations = mu: both sides then sample once every mu optimizer steps and take the sampling policy's
    log-probabilities in an extra forward (TRL does when gradient_accumulation_steps % (steps_per_generation * mu)
    != 0, i.e. whenever mu > 1).
The prompts are a datasets.Dataset in dsv3's order with shuffle_dataset=False: TRL's RepeatSampler hands rollout r
the rows r*P .. r*P+P-1, each G times. The reward functions are given TRL's completion text, which, like dsv3's,
has the special tokens (the end of sentence) removed. fp32 (bf16=False), no gradient checkpointing (TRL's default
is on; dsv3 does not recompute), no vLLM, logging every step, nothing saved.

    python benchmarks/bench_grpo.py --model runs/demo [--steps 20] [--json out.json]
    python benchmarks/bench_grpo.py --model runs/sft --steps 20 --num-generations 8 --prompts-per-step 4 \\
        --micro-batch-size 8 --max-new-tokens 48 --lr 1e-5 --beta 0.04 --loss-type dapo
    python benchmarks/bench_grpo.py --only trl --steps 5        # one side alone
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import dsv3  # noqa: E402
from dsv3.data.dataset import EpochOrder  # noqa: E402
from dsv3.data.tasks import TASKS, make_task, to_messages  # noqa: E402
from dsv3.eval.tasks import prompt_ids  # noqa: E402
from dsv3.tokenizer import Tokenizer  # noqa: E402
from dsv3.train.grpo import GRPOConfig  # noqa: E402
from dsv3.train.cpu import retain_freed_memory  # noqa: E402
from dsv3.train.optim import build_optimizer  # noqa: E402
from dsv3.train.rewards import REWARDS  # noqa: E402
from dsv3.train.schedules import default_warmup, lr_for  # noqa: E402
from bench_train import matmul_peak  # noqa: E402
from common import print_machine  # noqa: E402

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))


# ---- the prompts, in the order both sides see them ------------------------------------------------------------

def step_records(args) -> list[dict]:
    """The prompt records `dsv3 grpo --task` trains on, in its order (its own code: the task's train records,
    a seeded permutation per epoch), P per step: TRL is given them in this order, unshuffled."""
    pool = make_task(args.task, digits=args.digits).records("train", args.task_records, args.seed)
    order = EpochOrder(len(pool), args.seed)  # dsv3 grpo's Rollouts read prompt r*P + k through it
    rollouts = -(-args.steps // args.num_iterations)  # each serves num_iterations optimizer steps, on both sides
    return [pool[order[i]] for i in range(rollouts * args.prompts_per_step)]


# ---- dsv3 ------------------------------------------------------------------------------------------------------

def dsv3_argv(args, out: str) -> list[str]:
    """`dsv3 grpo`'s command line for the benchmark's settings."""
    argv = ["grpo", "--init-from", args.model, "--task", args.task, "--task-records", str(args.task_records),
            "--out", out, "--steps", str(args.steps), "--num-generations", str(args.num_generations),
            "--prompts-per-step", str(args.prompts_per_step), "--micro-batch-size", str(args.micro_batch_size),
            "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
            "--top-p", str(args.top_p), "--lr", str(args.lr), "--lr-schedule", args.lr_schedule,
            "--beta", str(args.beta), "--epsilon", str(args.epsilon), "--loss-type", args.loss_type,
            "--num-iterations", str(args.num_iterations), "--scale-rewards", args.scale_rewards,
            "--rewards", *args.rewards, "--seed", str(args.seed), "--balance", args.balance, "--precision", "fp32",
            "--eval-every", str(args.steps), "--eval-records", str(args.eval_records), "--no-plots"]
    if args.epsilon_high is not None:
        argv += ["--epsilon-high", str(args.epsilon_high)]
    if args.digits is not None:
        argv += ["--digits", str(args.digits)]
    return argv


def dsv3_row(r: dict) -> dict:
    """A `dsv3 grpo` metrics record -> the benchmark's row."""
    return {"step": int(r["step"]), "step_time_s": r["step_time_s"], "generate_s": r.get("time/generation_s"),
            "reward": r["reward"], "completion_length": r.get("completions/mean_length"), "kl": r.get("kl"),
            "loss": r.get("loss"), "lr": r.get("lr"), **{k: r[k] for k in r if k.startswith("rewards/")}}


def run_dsv3(args, out: str) -> list[dict]:
    """`python -m dsv3 grpo` in a subprocess -> its metrics.jsonl rows, one per optimizer step."""
    cmd = [sys.executable, "-m", "dsv3", *dsv3_argv(args, out)]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print("dsv3:", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(f"dsv3: {len(rows)} steps in {wall:.1f} s wall (process start and model load included)", flush=True)
    return [dsv3_row(r) for r in rows if "step_time_s" in r]


def dsv3_trainer(args, out: str):
    """`dsv3 grpo`'s trainer in this process, from the same command line parsed by dsv3's own parser and built
    as grpo.main builds it; the benchmark calls its step() between TRL's steps instead of its fit()."""
    from dsv3.cli import build_parser
    from dsv3.train.grpo import GRPOData
    from dsv3.train.objectives import GRPO
    from dsv3.train.trainer import Trainer, export_model

    argv = dsv3_argv(args, out)
    print("dsv3:", " ".join(argv), "(in this process, one step after each of TRL's)", flush=True)
    ns = build_parser().parse_args(argv)
    ns.rewards = tuple(ns.rewards)
    config = GRPOConfig.from_args(ns)
    objective = GRPO(config.loss_type, config.epsilon, config.epsilon_high or config.epsilon, config.beta,
                     config.temperature, config.max_new_tokens)
    return Trainer(config, objective=objective, export=export_model, data=GRPOData())


# ---- TRL -------------------------------------------------------------------------------------------------------

def reward_adapter(name: str):
    """TRL calls fn(prompts, completions, completion_ids, **dataset_columns) -> list[float], a completion of a
    conversational prompt being [{"role": "assistant", "content": text}]; ours take the completions' text and
    the task records (here the dataset's "record" column, as JSON, repeated by TRL for each completion)."""
    fn = REWARDS[name]

    def reward(prompts, completions, completion_ids, record, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(r) for r in fn(texts, [json.loads(r) for r in record], completion_ids=completion_ids)]

    reward.__name__ = name  # TRL logs rewards/<name>/mean, as dsv3 does
    return reward


def run_trl(args, records: list[dict], after_step=None) -> tuple[list[dict], dict]:
    """TRL's GRPOTrainer on the same directory, prompts, rewards and settings -> (one row per optimizer step,
    the settings TRL ran with). after_step() is called after each step's clock has stopped."""
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renamings, said at each step
    transformers.logging.set_verbosity_error()  # "UNEXPECTED" for the MTP layer's weights, which HF does not use
    transformers.logging.disable_progress_bar()
    P, G, M = args.prompts_per_step, args.num_generations, args.micro_batch_size
    if (P * G) % M:
        raise ValueError(f"--micro-batch-size {M} must divide prompts x generations = {P * G}")
    ds = datasets.Dataset.from_list([{"prompt": to_messages(r), "record": json.dumps(r)} for r in records])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    accumulation = P * G // M
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=args.seed, data_seed=args.seed, shuffle_dataset=False,
        num_generations=G, per_device_train_batch_size=M, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, max_steps=args.steps,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=0,
        learning_rate=args.lr, max_grad_norm=1.0, beta=args.beta, epsilon=args.epsilon,
        epsilon_high=args.epsilon_high, loss_type=args.loss_type, num_iterations=args.num_iterations,
        scale_rewards=args.scale_rewards, use_vllm=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    # dsv3's optimizer and schedule on the HF model's parameters (TRL's default AdamW decays a different set)
    optimizer = build_optimizer(model, lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = default_warmup(args.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_for(args.lr_schedule, s, args.steps, 1.0,
                                                                              warmup))

    rows: list[dict] = []

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, from the first micro-batch (generation included) to after
        optimizer.step(); TRL's logged metrics of that step."""

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            rows.append({"step": state.global_step, "step_time_s": time.perf_counter() - self.t,
                         "generate_s": generate_s.pop()})
            generate_s.append(0.0)
            if after_step is not None:
                after_step()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs and rows and rows[-1]["step"] == state.global_step:
                rows[-1].update({"reward": logs["reward"], "completion_length": logs.get("completions/mean_length"),
                                 "kl": logs.get("kl"), "loss": logs.get("loss"), "lr": logs.get("learning_rate"),
                                 **{k: v for k, v in logs.items() if k.startswith("rewards/")}})

    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward_adapter(n) for n in args.rewards], args=config,
                              train_dataset=ds, processing_class=tokenizer, callbacks=[StepClock()],
                              optimizers=(optimizer, scheduler))
    generate_s = [0.0]
    generate = trainer._generate

    def timed_generate(prompts):  # TRL's sampling (tokenize, model.generate, decode), timed apart
        t = time.perf_counter()
        try:
            return generate(prompts)
        finally:
            generate_s[-1] += time.perf_counter() - t

    trainer._generate = timed_generate
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its dict per step; ours is below
    print(f"TRL {trl.__version__} (transformers {transformers.__version__}): num_generations={G}, "
          f"per_device_train_batch_size={M}, gradient_accumulation_steps={accumulation}, "
          f"steps_per_generation={config.steps_per_generation}, generation_batch_size={config.generation_batch_size}, "
          f"num_iterations={args.num_iterations}, loss_type={args.loss_type}, scale_rewards={args.scale_rewards}, "
          f"beta={args.beta}, epsilon={args.epsilon}, epsilon_high={config.epsilon_high}", flush=True)
    t = time.perf_counter()
    trainer.train()
    print(f"TRL: {len(rows)} steps in {time.perf_counter() - t:.1f} s", flush=True)
    settings = {"trl": trl.__version__, "transformers": transformers.__version__,
                "num_generations": G, "per_device_train_batch_size": M, "gradient_accumulation_steps": accumulation,
                "steps_per_generation": config.steps_per_generation,
                "generation_batch_size": config.generation_batch_size, "num_iterations": args.num_iterations,
                "loss_type": args.loss_type, "scale_rewards": args.scale_rewards, "beta": args.beta,
                "epsilon": args.epsilon, "epsilon_high": config.epsilon_high, "warmup_steps": warmup}
    return rows, settings


# ---- the floor -------------------------------------------------------------------------------------------------

def step_flops(cfg: dsv3.ModelConfig, prompt_lens: list[int], completion_tokens: float, G: int, beta: float,
               mu: int, generates: bool) -> float:
    """The products an optimizer step cannot avoid, over its P prompts (lengths prompt_lens) and the G
    completions of each (completion_tokens in all): the policy's forward and backward over every
    prompt+completion row (6 x active parameters A per token); and in a step that samples (one in mu), each
    prompt read once into the cache (2 x A per token), each completion token decoded (2 x A), the reference
    model's forward when beta > 0 and the sampling policy's log-probabilities when mu > 1 (2 x A per token
    each). A prompt position needs no output head (vocab x hidden of A): only completion tokens are scored.
    Attention's score and value products are left out (see attention_share)."""
    A = cfg.num_active_params()
    body = A - cfg.vocab_size * cfg.hidden_size  # the output head runs only where a next token is scored
    prompt_tokens = sum(prompt_lens)
    forward = 2 * (G * prompt_tokens * body + completion_tokens * A)  # one forward over the step's rows
    flops = 3 * forward
    if generates:  # (the last prompt token's head is counted as the last decode step's, which never runs)
        flops += 2 * body * prompt_tokens + 2 * A * completion_tokens + forward * ((beta > 0) + (mu > 1))
    return flops


def attention_share(cfg: dsv3.ModelConfig, length: int) -> float:
    """Attention's score and value products per token over the other products, at a context of `length`."""
    per_token = 2 * 2 * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_attention_heads * length * cfg.num_hidden_layers
    return per_token / (2 * cfg.num_active_params())


# ---- the report ------------------------------------------------------------------------------------------------

def summary(rows: list[dict]) -> dict:
    times = [r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]]
    rewards = [r.get("reward") for r in rows]
    last = [x for x in rewards[-5:] if x is not None]
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "best_s": min(times),
            "first_s": rows[0]["step_time_s"],
            "reward_first": rewards[0], "reward_last5": statistics.fmean(last) if last else None,
            "reward_mean": statistics.fmean(x for x in rewards if x is not None),
            "completion_length": statistics.fmean(r["completion_length"] for r in rows if r.get("completion_length"))}


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo", help="a model directory written by dsv3 (both sides load it)")
    ap.add_argument("--task", default="arithmetic", choices=sorted(TASKS))
    ap.add_argument("--digits", type=int, default=None, help="arithmetic: the operands' digits (default: the task's)")
    ap.add_argument("--task-records", type=int, default=GRPOConfig.__dataclass_fields__["task_records"].default,
                    help="the task's train prompts, drawn in dsv3's seeded order (default: dsv3 grpo's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-generations", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="P: prompts per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="M: completions per forward/backward")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-6, help="peak learning rate (default 1e-6, both tools' default)")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="after dsv3's warmup (5%% of the steps): constant (default) or cosine; TRL is given "
                         "dsv3's schedule function")
    ap.add_argument("--balance", default="none", choices=["none", "aux-free"],
                    help="dsv3's expert-bias balancing during GRPO; none (default) as transformers has no such update")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (a reference model when > 0)")
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--epsilon-high", type=float, default=None)
    ap.add_argument("--loss-type", choices=["grpo", "dr_grpo", "dapo"], default="grpo",
                    help="default grpo (dsv3's default; TRL's is dapo)")
    ap.add_argument("--num-iterations", type=int, default=1, help="mu: policy updates per generation")
    ap.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group")
    ap.add_argument("--rewards", nargs="+", default=["accuracy", "format"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--eval-records", type=int, default=0,
                    help="dsv3 only: held-out prompts answered greedily after the last step (default 0: none; "
                         "TRL has no such evaluation, and it is outside the step times either way)")
    ap.add_argument("--trl-malloc", choices=["retain", "default"], default="retain",
                    help="retain (default): this process's malloc keeps freed memory, as `dsv3 grpo` sets it on a "
                         "CPU, so both run under the same allocator settings; default: as the C library does "
                         "(--order sequential only: in one process dsv3's trainer sets it for both)")
    ap.add_argument("--order", choices=["interleaved", "sequential"], default="interleaved",
                    help="interleaved (default): one process, dsv3's trainer (built from the same `dsv3 grpo` command "
                         "line by dsv3's parser) takes a step after each of TRL's, so a slow spell of a shared "
                         "machine falls on both; sequential: `python -m dsv3 grpo` as a subprocess, then TRL")
    ap.add_argument("--dsv3-out", default=None, help="keep dsv3's run directory here (default: a temporary one)")
    ap.add_argument("--only", choices=["both", "dsv3", "trl"], default="both")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = print_machine()
    cfg = dsv3.ModelConfig.from_hf(args.model)
    peak = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"model {args.model}: {cfg.num_params() / 1e6:.2f}M parameters, {cfg.num_active_params() / 1e6:.2f}M active "
          f"(MTP not used); fp32; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    print(f"GRPO: {args.steps} steps x {args.prompts_per_step} prompts x {args.num_generations} completions "
          f"(<= {args.max_new_tokens} tokens, T={args.temperature}, top_p={args.top_p}), micro-batch "
          f"{args.micro_batch_size}, lr {args.lr}, beta {args.beta}, epsilon {args.epsilon}, loss {args.loss_type}, "
          f"mu {args.num_iterations}, scale_rewards {args.scale_rewards}, rewards {' + '.join(args.rewards)}, "
          f"seed {args.seed}", flush=True)
    records = step_records(args)
    from transformers import AutoTokenizer
    hf_tok, tok = AutoTokenizer.from_pretrained(args.model), Tokenizer.from_dir(args.model)
    ids = [prompt_ids(tok, r) for r in records]  # what dsv3 grpo samples from
    trl_ids = hf_tok.apply_chat_template([to_messages(r) for r in records], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]  # what TRL does
    differ = sum(a != list(b) for a, b in zip(ids, trl_ids))
    prompt_lens = [len(x) for x in ids]
    print(f"{len(records)} prompts ({min(prompt_lens)}-{max(prompt_lens)} tokens): "
          + ("the same tokens on both sides" if not differ else f"{differ} tokenised differently by TRL's path!"))
    sides = {}
    if args.only == "dsv3" or args.order == "sequential" and args.only == "both":
        if args.dsv3_out:
            sides["dsv3"] = run_dsv3(args, args.dsv3_out)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_grpo_dsv3_") as out:
                sides["dsv3"] = run_dsv3(args, out)
    trl_settings = None
    if args.only in ("both", "trl"):
        retained = args.trl_malloc == "retain" and retain_freed_memory()
        malloc = "keeps freed memory (as dsv3 grpo sets it)" if retained else "as the C library does"
        print(f"TRL's process: malloc {malloc}"
              + (" (dsv3 in this process too)" if args.order == "interleaved" and args.only == "both" else ""))
        if args.order == "interleaved" and args.only == "both":
            out = args.dsv3_out or tempfile.mkdtemp(prefix="bench_grpo_dsv3_")
            trainer = dsv3_trainer(args, out)
            dsv3_rows = []
            sides["trl"], trl_settings = run_trl(args, records,
                                                 after_step=lambda: dsv3_rows.append(dsv3_row(trainer.step())))
            while trainer.global_step < args.steps:  # (TRL stopped early: should not happen)
                dsv3_rows.append(dsv3_row(trainer.step()))
            trainer.metrics.close()
            if not args.dsv3_out:
                shutil.rmtree(out, ignore_errors=True)
            sides = {"dsv3": dsv3_rows, **sides}
        else:
            sides["trl"], trl_settings = run_trl(args, records)
    peak_after = matmul_peak(torch.device("cpu"), torch.float32)

    P, G = args.prompts_per_step, args.num_generations
    mu = args.num_iterations
    for rows in sides.values():
        for i, r in enumerate(rows):
            if r.get("completion_length") is None and i:  # TRL logs lengths at the step that sampled them
                r["completion_length"] = rows[i - 1]["completion_length"]
            rollout = (r["step"] - 1) // mu
            lens = prompt_lens[rollout * P:(rollout + 1) * P]
            toks = (r.get("completion_length") or 0) * P * G
            r["gflop"] = step_flops(cfg, lens, toks, G, args.beta, mu, (r["step"] - 1) % mu == 0) / 1e9
            r["floor_s"] = r["gflop"] * 1e9 / peak

    names = list(sides)
    print(f"\nper step: wall seconds (generation, rewards, forward/backward, optimizer) and mean reward of the step's "
          f"{P * G} completions")
    head = "".join(f"{n + ' s':>10}{n + ' reward':>14}{n + ' len':>10}" for n in names)
    print(f"{'step':>5}{head}")
    for i in range(max(len(r) for r in sides.values())):
        line = f"{i + 1:5d}"
        for n in names:
            r = sides[n][i] if i < len(sides[n]) else {}
            line += (f"{fmt(r.get('step_time_s')):>10}{fmt(r.get('reward')):>14}"
                     f"{fmt(r.get('completion_length'), '.1f'):>10}")
        print(line)
    summ = {n: summary(rows) for n, rows in sides.items()}
    print("\nstep time without step 1 (warm-up)")
    for n in names:
        s, rows = summ[n], sides[n]
        floor = statistics.fmean(r["floor_s"] for r in rows[1:] or rows)
        s["floor_s"] = floor
        s["floor_fraction"] = floor / s["median_s"]
        print(f"  {n:5} median {s['median_s']:.3f} s, mean {s['mean_s']:.3f} s, best {s['best_s']:.3f} s "
              f"(step 1: {s['first_s']:.3f} s); "
              f"reward step 1 {fmt(s['reward_first'])}, last 5 steps {fmt(s['reward_last5'])}, all "
              f"{fmt(s['reward_mean'])}; mean completion "
              f"{s['completion_length']:.1f} tokens; floor {floor * 1e3:.1f} ms "
              f"({statistics.fmean(r['gflop'] for r in rows):.2f} GFLOP/step) = {s['floor_fraction']:.1%} of its "
              f"median step")
    if len(names) == 2:
        ratio = summ["trl"]["median_s"] / summ["dsv3"]["median_s"]
        print(f"  TRL / dsv3: {ratio:.2f}x (median), {summ['trl']['mean_s'] / summ['dsv3']['mean_s']:.2f}x (mean), "
              f"{summ['trl']['best_s'] / summ['dsv3']['best_s']:.2f}x (best)")
        summ["ratio_median"] = ratio
    for n in names:
        gen = [r["generate_s"] / r["step_time_s"] for r in sides[n][1:] if r.get("generate_s") is not None]
        if gen:
            s = summ[n]
            s["generate_share"] = statistics.fmean(gen)
            s["generate_median_s"] = statistics.median(r["generate_s"] for r in sides[n][1:])
            print(f"  {n:5} sampling {s['generate_median_s']:.3f} s (median) = {s['generate_share']:.0%} of its step "
                  f"(dsv3: its engine's generate; TRL: tokenise, model.generate, decode)")
    longest = max(prompt_lens) + args.max_new_tokens
    print(f"floor: FLOPs / {peak / 1e9:.1f} GFLOP/s (fp32 matmul peak measured before; {peak_after / 1e9:.1f} after); "
          f"attention products left out: <= {attention_share(cfg, longest):.1%} more at {longest} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "peak_flops": peak, "peak_flops_after": peak_after,
                       "trl_settings": trl_settings, "summary": summ, "steps": sides}, f, indent=2)


if __name__ == "__main__":
    main()
