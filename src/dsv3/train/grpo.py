"""`dsv3 grpo`: reinforcement learning with rule-based rewards, GRPO as V3 and R1 were trained (DeepSeekMath
eq. 3; the V3 report §5.2, eqs. 26-28).

    dsv3 grpo --init-from runs/sft --task arithmetic --out runs/grpo --steps 200
    dsv3 grpo --init-from DIR --data problems.jsonl --out runs/grpo --steps 500 --beta 0.04

Each step: P prompts (--prompts-per-step) each answered G times (--num-generations) by dsv3's own inference
engine on the current weights, in this process (no copy of the model: after every update the engine
re-derives its absorbed MLA weights and forgets its prefix cache, LLM.refresh_weights); the completions
scored by rule-based rewards (train/rewards.py: `accuracy`, a right answer in the required format — for math
records the last \\boxed{...} compared as a number or normalised string, for code records the code run
against the tests in a sandbox —, `format`, and `length`, DAPO's soft overlong penalty); advantages relative
to each prompt's group, A = (r - mean) / std; then --num-iterations optimizer steps on that batch with the
clipped objective (--epsilon, --epsilon-high), --beta x the k3 KL estimate to the frozen starting model (no
reference model is kept when beta is 0), normalised as --loss-type says (grpo | dr_grpo | dapo).

Records (--data, JSONL): {"prompt": str, "answer": str} or {"messages": [...], "answer": str} for math,
{"prompt": str, "tests": ["assert f(1) == 2", ...]} for code. --task NAME takes a built-in task (held-out
split for evaluation). Logged per step as TRL's GRPOTrainer logs (metrics.jsonl): reward, reward_std,
rewards/<name>/mean and std, frac_reward_zero_std, kl, entropy, clip_ratio/{low,high,region}_mean,
completions/{mean,min,max}_length, completions/clipped_ratio; and at evaluations eval_accuracy (greedy, on
held-out prompts). The RUN directory is a model directory with resumable checkpoints, as `dsv3 train`'s.
`--shuffle-rewards` is the control experiment: rewards permuted across the batch, so they carry no signal.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ckpt.pretrained import load_pretrained
from ..data.dataset import EpochOrder
from ..data.tasks import TASKS, load_records
from ..eval.tasks import live_engine, prompt_ids, task_accuracy
from ..infer.sampling import SamplingParams
from ..tokenizer import PAD
from . import balance
from .objectives import GRPO, LOSS_TYPES, SCALE_REWARDS, completion_logprobs, group_advantages
from .rewards import reward_functions
from .sft import check_source, held_out, task_of
from .trainer import PRECISIONS, Trainer, TrainConfig, export_model, run_tokenizer


@dataclass
class GRPOConfig(TrainConfig):
    """`dsv3 grpo`'s options: TrainConfig's (batch_size = prompts_per_step x num_generations completions),
    plus the rollouts, the rewards and the GRPO loss."""

    RUN_DEFINING: ClassVar[tuple[str, ...]] = (
        "init_from", "seed", "data", "task", "digits", "prompts_per_step", "num_generations", "max_new_tokens",
        "temperature", "top_p", "loss_type", "epsilon", "epsilon_high", "beta", "num_iterations", "scale_rewards",
        "rewards", "reward_weights", "length_cache", "shuffle_rewards", "micro_batch_size", "balance", "tokenizer")

    task: str | None = None  # a built-in task (data/tasks.py) instead of --data
    digits: int | None = None
    task_records: int = 5000  # the built-in task's training prompts
    eval_data: str | None = None  # --data: prompt records for eval_accuracy (default: a held-out share)
    eval_records: int = 200
    eval_max_new_tokens: int | None = None  # default: max_new_tokens
    prompts_per_step: int = 8
    num_generations: int = 8  # G
    max_new_tokens: int = 256  # TRL's max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # default: epsilon (DAPO's clip-higher: 0.28)
    beta: float = 0.0  # KL weight; 0 keeps no reference model
    num_iterations: int = 1  # optimizer steps per rollout batch (mu)
    scale_rewards: str = "group"
    rewards: tuple[str, ...] = ("accuracy", "format")
    reward_weights: tuple[float, ...] | None = None  # default 1 each
    length_cache: int | None = None  # the length reward's soft band (default: a quarter of max_new_tokens)
    shuffle_rewards: bool = False  # the control: rewards permuted across the batch
    lr_schedule: str = "constant"
    eval_every: int = 25
    fim_rate: float = 0.0
    val_fraction: float = 0.05  # --data without --eval-data: prompts held out for eval_accuracy

    def __post_init__(self) -> None:
        check_source(self, "dsv3 grpo trains a model", "prompt records")
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type {self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"--scale-rewards {self.scale_rewards!r}: expected one of {', '.join(SCALE_REWARDS)}")
        for name, v in (("--prompts-per-step", self.prompts_per_step), ("--num-generations", self.num_generations),
                        ("--max-new-tokens", self.max_new_tokens), ("--num-iterations", self.num_iterations)):
            if v < 1:
                raise ValueError(f"{name} {v}: must be at least 1")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations {self.num_generations}: GRPO compares samples within a group; "
                             "use at least 2")
        self.rewards = tuple(self.rewards)
        if self.reward_weights is not None:
            self.reward_weights = tuple(self.reward_weights)
            if len(self.reward_weights) != len(self.rewards):
                raise ValueError(f"--reward-weights {list(self.reward_weights)}: one per reward "
                                 f"({', '.join(self.rewards)})")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon

    def with_defaults(self, max_positions: int | None = None) -> "GRPOConfig":
        batch = self.prompts_per_step * self.num_generations
        if self.batch_size not in (None, batch):
            raise ValueError(f"--batch-size is --prompts-per-step x --num-generations ({batch}) in dsv3 grpo")
        # a rollout batch is checkpointed only at its start (its completions are not saved): saves every
        # multiple of num_iterations, so a resumed run regenerates exactly the same rollouts
        save_every = -(-self.save_every // self.num_iterations) * self.num_iterations
        seq_len = self.seq_len or min(max_positions or 1024, 1024)
        c = dataclasses.replace(self, batch_size=batch, save_every=save_every, seq_len=seq_len, lr=self.lr or 1e-6)
        return TrainConfig.with_defaults(c, max_positions)


@dataclass
class GRPOBatch:
    """A slice of a rollout batch: each row a prompt and one of its completions, right-padded."""

    input_ids: torch.Tensor  # (N, T) prompt + completion, pad after
    labels: torch.Tensor  # (N, T) the completion's tokens at the positions that predict them, -100 elsewhere
    advantages: torch.Tensor  # (N,)
    old_logp: torch.Tensor | None  # (N, T) log pi_old at the labels (None: one update per batch, pi_old = pi)
    ref_logp: torch.Tensor | None  # (N, T) log pi_ref at the labels (None: beta = 0)
    rollout_stats: dict  # the rollout's rewards and lengths (logged as given)

    def to(self, device) -> "GRPOBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                                   advantages=move(self.advantages), old_logp=move(self.old_logp),
                                   ref_logp=move(self.ref_logp))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_completion_tokens(self) -> int:
        return int((self.labels != -100).sum())


def rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion per row, right-padded (so causal attention needs no mask), and labels: the
    completion's tokens at the positions that predict them."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), T), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        if c:
            labels[i, len(p) - 1: len(p) + len(c) - 1] = torch.tensor(c, dtype=torch.long)
    return ids, labels


class Rollouts:
    """The training data of a GRPO run: rollout batch r is generated when first asked for, from the weights
    of that moment, and serves num_iterations optimizer steps. What it generates depends only on the weights,
    the seed and r (prompts in a seeded order, one sampling seed per completion), so a resumed run regenerates
    the same batch."""

    def __init__(self, data: "GRPOData", prompts: list[dict], seed: int):
        self.data, self.prompts = data, prompts
        self.order = EpochOrder(len(prompts), seed)
        self.index, self.current = None, None

    def batch(self, start: int, size: int) -> GRPOBatch:
        c = self.data.config
        per_step = c.batch_size
        r = start // per_step // c.num_iterations
        if r != self.index:
            self.current, self.index = self.data.generate(r, self._prompts_of(r)), r
        b, lo = self.current, start % per_step
        sl = slice(lo, lo + size)
        return GRPOBatch(b.input_ids[sl], b.labels[sl], b.advantages[sl],
                         None if b.old_logp is None else b.old_logp[sl], None if b.ref_logp is None else b.ref_logp[sl],
                         b.rollout_stats)

    def _prompts_of(self, r: int) -> list[dict]:
        """Prompts r*P .. r*P + P - 1 of the run's order: a fresh seeded permutation each epoch."""
        P = self.data.config.prompts_per_step
        return [self.prompts[self.order[i]] for i in range(r * P, (r + 1) * P)]


class GRPOData:
    """Prompts -> rollouts on the live policy -> rewards -> advantages; evaluation: greedy accuracy on held-out
    prompts."""

    def __init__(self) -> None:
        self.eval_prompts: list[dict] = []
        self.llm = self.ref = None
        self.config = self.trainer = None

    def prepare(self, c: GRPOConfig, run_dir: str):
        self.config = c
        tok = run_tokenizer(c, run_dir)
        if c.task is not None:
            task = task_of(c)
            prompts = task.records("train", c.task_records, c.seed)
            self.eval_prompts = task.records("test", c.eval_records, c.seed)
        else:
            records = load_records(c.data)
            if c.eval_data:
                prompts, self.eval_prompts = records, load_records(c.eval_data)[: c.eval_records]
            else:
                prompts = [r for r in records if not held_out(r, c.seed, c.val_fraction)]
                self.eval_prompts = [r for r in records if held_out(r, c.seed, c.val_fraction)][: c.eval_records]
            if not prompts:
                raise ValueError(f"--data {c.data}: no prompts left for training")
        self.tok = tok
        longest = max(len(prompt_ids(tok, r)) for r in prompts[:2000])
        if longest + c.max_new_tokens > c.seq_len:
            raise ValueError(f"prompts of up to {longest} tokens + --max-new-tokens {c.max_new_tokens} exceed "
                             f"--seq-len {c.seq_len}; raise --seq-len or shorten the answers")
        self.rewards = reward_functions(list(c.rewards), max_len=c.max_new_tokens,
                                        length_cache=c.length_cache or max(1, c.max_new_tokens // 4))
        self.weights = list(c.reward_weights or [1.0] * len(c.rewards))
        pad = tok.token_to_id(PAD)
        self.pad_id = pad if pad is not None else tok.eos_token_id
        info = {"source": c.data or f"task:{c.task}", "train_prompts": len(prompts),
                "eval_prompts": len(self.eval_prompts), "train_tokens": 0}
        return tok, Rollouts(self, prompts, c.seed), None, info

    def attach(self, trainer: Trainer) -> None:
        if trainer.par is not None:
            raise ValueError("dsv3 grpo runs in one process: its rollouts use the inference engine on the whole "
                             "model (under torchrun, use dsv3 sft)")
        self.trainer, c = trainer, self.config
        # the engine on the training model itself; all of a step's completions decoded together
        self.llm = live_engine(trainer.model, self.tok, c.seq_len, max_num_seqs=min(c.batch_size, 256))
        if c.beta:  # the frozen reference: the starting model (a resumed run reads it again from init_from)
            self.ref = load_pretrained(c.init_from, dtype=torch.float32, fp8=False).to(trainer.device).eval()
            self.ref.requires_grad_(False)
        trainer.model.train()

    def _key(self, r: int, i: int) -> int:
        return (self.config.seed * 1_000_003 + r * 10_007 + i) % (2 ** 31)

    @torch.no_grad()
    def generate(self, r: int, records: list[dict]) -> GRPOBatch:
        """Rollout batch r: G completions of each prompt from the current weights, their rewards, advantages,
        and (when needed) old and reference log-probabilities."""
        c, trainer, G = self.config, self.trainer, self.config.num_generations
        t0 = time.perf_counter()
        model = trainer.model
        self.llm.refresh_weights()
        prompts = [ids for rec in records for ids in [prompt_ids(self.tok, rec)] * G]  # rendered once each
        group_records = [rec for rec in records for _ in range(G)]
        params = [SamplingParams(temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                 seed=self._key(r, i)) for i in range(len(prompts))]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        model.train()
        t_gen = time.perf_counter() - t0
        texts, completions = [o.text for o in outs], [list(o.token_ids) for o in outs]

        scores = {}
        for name, fn in self.rewards:
            scores[name] = torch.tensor(fn(texts, group_records, completion_ids=completions), dtype=torch.float32)
        total = sum(w * scores[name] for (name, _), w in zip(self.rewards, self.weights))
        if c.shuffle_rewards:  # the control: the same rewards, dealt to random completions
            g = torch.Generator().manual_seed(self._key(r, -1))
            total = total[torch.randperm(total.numel(), generator=g)]
        adv = group_advantages(total, G, c.scale_rewards)

        ids, labels = rows(prompts, completions, self.pad_id)
        def logprobs(policy) -> torch.Tensor:  # (N, T) at the labels, in micro-batches as training runs them
            mb, dev = c.micro_batch_size, trainer.device
            with trainer.products, trainer.autocast:
                return torch.cat([completion_logprobs(policy(ids[i:i + mb].to(dev)), labels[i:i + mb].to(dev),
                                                      c.temperature)[0].cpu() for i in range(0, len(ids), mb)])

        # pi_old: the policy that sampled, as the training forward sees it (needed when it will have moved)
        old = logprobs(model) if c.num_iterations > 1 else None
        ref = logprobs(self.ref) if c.beta else None
        lengths = [len(x) for x in completions]
        grouped = total.view(-1, G)
        stats = {"reward": total.mean().item(), "reward_std": grouped.std(dim=1).mean().item() if G > 1 else 0.0,
                 "frac_reward_zero_std": (grouped.std(dim=1) < 1e-6).float().mean().item() if G > 1 else 1.0,
                 "completions/mean_length": statistics.fmean(lengths), "completions/min_length": min(lengths),
                 "completions/max_length": max(lengths),
                 "completions/clipped_ratio": statistics.fmean(o.finish_reason == "length" for o in outs),
                 "time/generation_s": t_gen, "time/rollout_s": time.perf_counter() - t0, "rollout": r}
        for name, v in scores.items():
            stats[f"rewards/{name}/mean"] = v.mean().item()
            stats[f"rewards/{name}/std"] = v.std().item() if v.numel() > 1 else 0.0
        if c.beta == 0:
            stats["kl"] = 0.0
        return GRPOBatch(ids, labels, adv, old, ref, stats)

    def evaluate(self, trainer: Trainer) -> dict:
        if not self.eval_prompts:
            return {}
        c = self.config
        self.llm.refresh_weights()
        r = task_accuracy(self.llm, self.eval_prompts, c.eval_max_new_tokens or c.max_new_tokens)
        trainer.model.train()
        return {"eval_accuracy": r["accuracy"], "eval_format": r["format"], "eval_length": r["mean_length"]}

    def summary(self, trainer: Trainer, last: dict) -> dict:
        found = {k: last[k] for k in ("reward", "eval_accuracy", "eval_format") if k in last}
        print(f"done: step {trainer.global_step}, " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()))
        return found


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--init-from", required=True, metavar="DIR", help="the policy to train (a model directory; "
                                                                     "typically an SFT run's)")
    g.add_argument("--out", required=True, help="run directory (also the model directory of the latest checkpoint)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    g.add_argument("--seed", type=int, default=0, help="seeds the prompt order, the sampling and a task's records")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps (rounded up to a multiple "
                                                              "of --num-iterations) and at the end")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots at the end")
    g = p.add_argument_group("prompts")
    g.add_argument("--task", default=None, choices=sorted(TASKS), help="a built-in task")
    g.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help="prompt records: {\"prompt\"|\"messages\", \"answer\"} (math) or {\"prompt\", \"tests\"} (code)")
    g.add_argument("--digits", type=int, default=None, help="--task arithmetic: digits per operand")
    g.add_argument("--task-records", type=int, default=5000, help="--task: training prompts (default 5000)")
    g.add_argument("--eval-data", default=None, metavar="FILE.jsonl", help="--data: prompt records for evaluation "
                                                                           "(default: --val-fraction held out)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="--data: prompts held out (default 0.05)")
    g.add_argument("--eval-records", type=int, default=200, help="held-out prompts answered per evaluation (200)")
    g.add_argument("--eval-every", type=int, default=25, help="evaluate every K steps (and at the end)")
    g.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: --init-from's)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="longest prompt + completion (default 1024, at most the model's context)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout batch (default 8)")
    g.add_argument("--num-generations", "-G", type=int, default=8, help="completions per prompt, G (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit (default 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    g = p.add_argument_group("rewards")
    g.add_argument("--rewards", nargs="+", default=["accuracy", "format"],
                   help="reward functions: accuracy (right answer in the required format), format, length "
                        "(DAPO's soft overlong penalty) (default: accuracy format)")
    g.add_argument("--reward-weights", type=float, nargs="+", default=None, help="one weight per reward (default 1)")
    g.add_argument("--length-cache", type=int, default=None,
                   help="length reward: the penalty ramps from --max-new-tokens minus this (default a quarter)")
    g.add_argument("--scale-rewards", choices=SCALE_REWARDS, default="group",
                   help="advantage = (r - group mean) / std of the group (default), of the batch, or not scaled "
                        "(Dr. GRPO)")
    g.add_argument("--shuffle-rewards", action="store_true",
                   help="control experiment: permute the rewards across the batch (no signal left)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default="grpo",
                   help="grpo: per-sequence mean then mean; dr_grpo: sum / (sequences x max length); dapo: sum / "
                        "tokens (default grpo)")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range below (and above) 1 (default 0.2)")
    g.add_argument("--epsilon-high", type=float, default=None, help="upper clip (DAPO: 0.28; default --epsilon)")
    g.add_argument("--beta", type=float, default=0.0,
                   help="KL weight against the frozen starting model, k3 estimator (default 0: none kept)")
    g.add_argument("--num-iterations", type=int, default=1,
                   help="optimizer steps per rollout batch, mu (default 1: ratio 1, no clipping)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--micro-batch-size", type=int, default=None, help="completions per forward (default: all)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-6, TRL's)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warmup: constant (default) or cosine to a tenth")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default: rollouts and training see the same weights and numbers), bf16, fp8")
    g.add_argument("--balance", choices=balance.MODES, default="aux-free", help="as dsv3 train's")


def main(args: argparse.Namespace) -> dict:
    args.rewards = tuple(args.rewards)
    config = GRPOConfig.from_args(args)
    objective = GRPO(config.loss_type, config.epsilon, config.epsilon_high or config.epsilon, config.beta,
                     config.temperature, config.max_new_tokens)
    return Trainer(config, objective=objective, export=export_model, data=GRPOData()).fit()
