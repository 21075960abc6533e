"""`dsv3 sft`: supervised fine-tuning on chat records, as V3's post-training begins (§5.1).

    dsv3 sft --init-from runs/demo --task arithmetic --out runs/sft --steps 300 --lr 1e-3
    dsv3 sft --init-from DIR --data chats.jsonl --out runs/sft --steps 1000
    dsv3 sft --init-from runs/demo --task tool-use --out runs/tools --steps 1000 --lr 2e-3 --seq-len 1024

Records (JSONL, one per line): `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` or
`{"prompt": ..., "completion": ...}`. Each is rendered with the model's own chat template; the loss falls on
the assistant turns' tokens only, their end-of-sentence token included (data/chat.py). Records are packed
into rows of --seq-len tokens with sample masking: no attention across records, positions restarting at
each. `--task NAME` trains on a built-in task instead (data/tasks.py: generated from --seed, with a held-out
split): completions with step-by-step `<think>` reasoning (`--completions traces`, the default) or the answer
alone (`--completions answers`); its held-out prompts are then also answered greedily at each evaluation
and scored (`eval_accuracy`: right answers in the required format). `--task tool-use` is the built-in tool-use
conversations (data/tool_use.py: tool calls, tool results, answers); each held-out assistant turn is answered
and scored (`eval_accuracy`: the right calls, or the right text; `eval_format`: calls where calls are due).
Records may carry tools too (OpenAI's fine-tuning format: `"tools"`, assistant `"tool_calls"`, `"role": "tool"`
results); the loss then covers the assistant's tool-call tokens as well.

Everything else is `dsv3 train`'s Trainer: the RUN directory is a model directory of the latest checkpoint
with metrics.jsonl (loss, val_loss, eval_accuracy per step), plots and resumable checkpoints; the same
command again resumes; --precision and torchrun's --dp-shard/--ep/--tp carry over (--pp runs pretraining
only).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..data import chat, tool_use
from ..data.tasks import TASKS, Task, load_records, make_task
from ..eval.bpb import summed_cross_entropy
from ..eval.tasks import live_engine, task_accuracy
from ..parallel import mesh
from ..tokenizer import PAD
from . import balance
from .objectives import SFT
from .trainer import PRECISIONS, Trainer, TrainConfig, export_model, run_tokenizer

COMPLETIONS = ("traces", "answers")
CHAT_TASKS = {"tool-use": tool_use}  # built-in conversations for SFT alone (no verifier for GRPO)


@dataclass
class SFTConfig(TrainConfig):
    """`dsv3 sft`'s options: TrainConfig's, plus where the records come from and how the run is evaluated."""

    RUN_DEFINING: ClassVar[tuple[str, ...]] = (
        "init_from", "seed", "data", "task", "task_records", "completions", "digits", "seq_len", "batch_size",
        "micro_batch_size", "balance", "mtp_depth", "val_fraction", "bf16_moments", "tokenizer")

    task: str | None = None  # a built-in task (data/tasks.py) instead of --data
    task_records: int = 5000  # its training records
    completions: str = "traces"  # built-in task: step-by-step reasoning then the answer, or the answer alone
    digits: int | None = None  # arithmetic: the operands' digits (default: the task's)
    eval_data: str | None = None  # prompt records with answers, for eval_accuracy with --data
    eval_records: int = 200  # held-out prompts answered at each evaluation
    eval_max_new_tokens: int = 160
    lr_schedule: str = "cosine"  # V3's SFT: cosine decay from the peak to a fifth of it
    lr_floor: float = 0.2
    fim_rate: float = 0.0
    mtp_lambda: tuple[float, float] = (0.1, 0.1)

    def __post_init__(self) -> None:
        check_source(self, "dsv3 sft fine-tunes a model", "chat records", [*TASKS, *CHAT_TASKS])
        super().__post_init__()
        if self.task in CHAT_TASKS and self.digits is not None:
            raise ValueError(f"--digits is an arithmetic option, not one of --task {self.task}")
        if self.completions not in COMPLETIONS:
            raise ValueError(f"--completions {self.completions!r}: expected one of {', '.join(COMPLETIONS)}")

    def with_defaults(self, max_positions: int | None = None) -> "SFTConfig":
        # chat records are short next to pretraining documents: 1024-token rows (at most the model's context),
        # 16 rows a step, TRL's SFT learning rate
        seq_len = min(1024, max_positions or 1024)
        c = dataclasses.replace(self, seq_len=self.seq_len or seq_len, batch_size=self.batch_size or 16,
                                lr=self.lr or 2e-5)
        return TrainConfig.with_defaults(c, max_positions)


def check_source(c, what: str, records: str, tasks=TASKS) -> None:
    """A post-training run starts from a model (--init-from) and reads either a built-in task or --data."""
    if c.init_from is None:
        raise ValueError(f"{what}: give --init-from DIR (a model directory)")
    if (c.task is None) == (c.data is None):
        raise ValueError(f"give either --task NAME (a built-in task) or --data FILE.jsonl ({records})")
    if c.task is not None and c.task not in tasks:
        raise ValueError(f"--task {c.task!r}: expected one of {', '.join(sorted(tasks))}")


def held_out(record: dict, seed: int, fraction: float) -> bool:
    """Whether a user record is in the validation split: decided by a hash of its content, so the split does
    not change when records are added or reordered."""
    h = hashlib.sha256(f"{seed}:{record.get('messages') or (record.get('prompt'), record.get('completion'))}"
                       .encode()).digest()
    return int.from_bytes(h[:8], "little") / 2 ** 64 < fraction


def task_of(c) -> Task:
    """The run's built-in task, at its --digits difficulty (arithmetic)."""
    return make_task(c.task, digits=c.digits)


class SFTData:
    """Chat records -> packed rows (data/chat.py); evaluation: the loss on held-out records, and for a task
    the held-out prompts answered and scored."""

    def __init__(self) -> None:
        self.eval_prompts: list[dict] = []
        self.score = task_accuracy  # (llm, eval_prompts, max_new_tokens) -> accuracy, format, mean_length
        self.llm = None

    def prepare(self, c: SFTConfig, run_dir: str):
        tok = run_tokenizer(c, run_dir)
        if c.task in CHAT_TASKS:
            task = CHAT_TASKS[c.task]
            train_records = task.records("train", c.task_records, c.seed)
            self.eval_prompts = val_records = task.records("test", c.eval_records, c.seed)
            self.score = task.accuracy
            source = f"task:{c.task}"
        elif c.task is not None:
            task = task_of(c)
            completion = task.trace if c.completions == "traces" else task.answer_only
            def as_chat(r: dict) -> dict:
                return {"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": completion(r)}]}
            train_records = [as_chat(r) for r in task.records("train", c.task_records, c.seed)]
            self.eval_prompts = task.records("test", c.eval_records, c.seed)
            val_records = [{"messages": [{"role": "user", "content": r["prompt"]},
                                         {"role": "assistant", "content": task.trace(r)}]} for r in self.eval_prompts]
            source = f"task:{c.task}"
        else:
            records = chat.load_chat_records(c.data)
            val_records = [r for r in records if held_out(r, c.seed, c.val_fraction)]
            train_records = [r for r in records if not held_out(r, c.seed, c.val_fraction)]
            if not train_records:
                raise ValueError(f"--data {c.data}: no training records left after holding out --val-fraction "
                                 f"{c.val_fraction}")
            if c.eval_data:
                self.eval_prompts = load_records(c.eval_data)[: c.eval_records]
            source = c.data
        pad = tok.token_to_id(PAD)
        pad = pad if pad is not None else tok.eos_token_id
        train = chat.PackedChat(chat.records_to_examples(tok, train_records, progress=True), c.seq_len, c.seed,
                                shuffle=True, pad_id=pad)
        val = None
        if val_records:
            val = chat.PackedChat(chat.records_to_examples(tok, val_records), c.seq_len, c.seed, shuffle=False,
                                  pad_id=pad)
        info = {"source": source, "train_records": len(train_records), "val_records": len(val_records),
                "train_rows": train.num_sequences, "train_tokens": train.tokens, "train_loss_tokens": train.loss_tokens,
                "truncated": train.truncated, "eval_prompts": len(self.eval_prompts)}
        return tok, train, val, info

    def attach(self, trainer: Trainer) -> None:
        self.llm = None  # built at the first evaluation that needs it, on the model itself

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict:
        """val_loss: the SFT loss on the held-out records (their assistant tokens); eval_accuracy, eval_format,
        eval_length: the held-out prompts answered greedily by the engine on the current weights."""
        c, model, out = trainer.config, trainer.model, {}
        if trainer.val_data is not None:
            total, count = 0.0, 0
            was_training = model.training
            model.eval()
            with trainer.products, trainer.autocast:
                for start in range(0, trainer.val_data.num_sequences, c.micro_batch_size):
                    b = trainer.val_data.batch(start, min(c.micro_batch_size, trainer.val_data.num_sequences - start))
                    b = b.to(trainer.device)
                    loss, n = summed_cross_entropy(model(b.input_ids, positions=b.positions,
                                                         mask=b.attention_mask()), b.labels)
                    total, count = total + loss, count + n
            model.train(was_training)
            out["val_loss"] = total / max(count, 1)
        if self.eval_prompts and trainer.par is None:
            if self.llm is None:
                self.llm = live_engine(model, trainer.tok, c.seq_len + c.eval_max_new_tokens)
            else:
                self.llm.refresh_weights()
            r = self.score(self.llm, self.eval_prompts, c.eval_max_new_tokens)
            model.train()
            out.update(eval_accuracy=r["accuracy"], eval_format=r["format"], eval_length=r["mean_length"])
            out.update({f"eval_{k}": r[k] for k in ("call_accuracy", "answer_accuracy") if r.get(k) is not None})
        return out

    def summary(self, trainer: Trainer, last: dict) -> dict:
        keys = ("val_loss", "eval_accuracy", "eval_format")
        found = {k: last[k] for k in keys if k in last}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in found.items())
        print(f"done: step {trainer.global_step}, train loss {last['loss']:.3f}" + (f", {shown}" if shown else ""))
        return found


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--init-from", required=True, metavar="DIR",
                   help="the model to fine-tune: a model directory (ours, transformers-saved or an official "
                        "DeepSeek-V3 checkpoint) with its tokenizer and chat template")
    g.add_argument("--out", required=True, help="run directory (also the model directory of the latest checkpoint)")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order and a built-in task's records")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots at the end")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help="chat records: {\"messages\": [...]} or {\"prompt\", \"completion\"} per line")
    g.add_argument("--task", default=None, choices=sorted([*TASKS, *CHAT_TASKS]),
                   help="a built-in task instead of --data (tool-use: conversations with tool calls)")
    g.add_argument("--task-records", type=int, default=5000, help="--task: training records (default 5000)")
    g.add_argument("--completions", choices=COMPLETIONS, default="traces",
                   help="--task: train on step-by-step reasoning then the answer (traces, default) or on the "
                        "answer alone (answers)")
    g.add_argument("--digits", type=int, default=None, help="--task arithmetic: digits per operand")
    g.add_argument("--val-fraction", type=float, default=0.02,
                   help="--data: share of records held out for val_loss (default 0.02)")
    g.add_argument("--eval-data", default=None, metavar="FILE.jsonl",
                   help="--data: prompt records with answers ({\"prompt\", \"answer\"}) scored at evaluations")
    g.add_argument("--eval-records", type=int, default=200, help="held-out prompts answered per evaluation (200)")
    g.add_argument("--eval-max-new-tokens", type=int, default=160, help="answer length limit at evaluations")
    g.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: --init-from's)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 1024, at most the "
                                                             "model's context)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="packed rows per optimizer step (default 16)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward (default: the batch)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5)")
    g.add_argument("--lr-floor", type=float, default=0.2,
                   help="cosine decay to this fraction of the peak (default 0.2, V3's 5e-6 -> 1e-6)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--precision", choices=PRECISIONS, default="auto", help="as dsv3 train's (default auto)")
    g.add_argument("--recompute", action="store_true", help="recompute each block in backward (less memory)")
    g.add_argument("--balance", choices=balance.MODES, default="aux-free", help="as dsv3 train's")
    g.add_argument("--mtp-lambda", type=float, default=0.1,
                   help="weight of the MTP modules' loss on the same tokens (default 0.1; 0: leave them)")
    g.add_argument("--eval-every", type=int, default=50, help="evaluate every K steps (and at the end)")
    g = p.add_argument_group("many processes", "under torchrun, as dsv3 train (--pp is pretraining only)")
    g.add_argument("--dp-shard", type=int, default=-1, metavar="D")
    g.add_argument("--ep", type=int, default=1, metavar="E")
    g.add_argument("--tp", type=int, default=1, metavar="T")


def main(args: argparse.Namespace) -> dict:
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")
    args.mtp_lambda = (args.mtp_lambda, args.mtp_lambda)
    config = SFTConfig.from_args(args)
    try:
        return Trainer(config, objective=SFT(config.mtp_lambda[0]), export=export_model, data=SFTData()).fit()
    finally:
        mesh.stop()
