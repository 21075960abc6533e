"""`dsv3 train`: pretrain a DeepSeek-V3 with the V3 recipe (the technical report, §4), resumable to the bit.

    dsv3 train --preset tiny --out runs/tiny            # the built-in corpus, a few minutes on a laptop CPU
    dsv3 train --preset tiny --out runs/tiny            # the same command again: resumes where it stopped

The run directory is itself a model directory of the latest checkpoint (config.json, model.safetensors
with the MTP weights, tokenizer, generation_config.json), loadable by dsv3 and transformers; beside it:
metrics.jsonl (one JSON object per optimizer step), run.json, PNG plots, data/ (cached token ids) and
checkpoints/ (full training state, written atomically).

The step, in `main()`: batch -> forward (main head + MTP heads) -> loss terms (next-token CE, lambda x MTP CE,
alpha x balance loss) -> backward (gradient accumulation) -> clip -> AdamW -> balancing-bias update -> log,
evaluate, save.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ckpt.io import atomic_write_json
from ..ckpt.pretrained import save_pretrained
from ..ckpt.state import (exported_step, list_checkpoints, load_checkpoint, mark_exported, remove_stale,
                          save_checkpoint)
from ..config import PRESETS, ModelConfig
from ..data.corpus import builtin_corpus, corpus_hash, load_corpus, split
from ..data.dataset import PackedSequences, cached_tokens, tokenize, unigram_entropy
from ..model.model import DeepSeekV3, init_weights
from ..model.mtp import mtp_loss
from ..tokenizer import Tokenizer, train_bpe
from . import balance, cpu
from .metrics import MetricsLog, plot_run, read_metrics
from .optim import build_optimizer
from .schedules import default_warmup, gamma_at, lr_at, mtp_lambda_at

# options that define a run: resuming with different values would not continue the same run
RUN_DEFINING = ("preset", "seed", "data", "tokenizer", "seq_len", "batch_size", "micro_batch_size", "balance",
                "mtp_depth", "fim_rate", "val_fraction", "init_std", "bf16_moments")

# per-preset defaults: (sequence length, sequences per step, peak learning rate)
PRESET_TRAINING = {"micro": (64, 8, 3e-3), "tiny": (256, 16, 2e-3), "bench-small": (256, 16, 1.5e-3), "125M": (1024, 64, 1e-3),
                   "1B": (2048, 256, 4e-4), "671B": (4096, 15360, 2.2e-4)}


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory (also the model directory of the latest checkpoint)")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default tiny)")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300); the schedules scale to it")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and FIM (default 0)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every K steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots at the end")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="text file, folder, or JSONL with a 'text' field (default: the "
                                                "Python standard library's sources, built in)")
    g.add_argument("--tokenizer", default=None, help="reuse this tokenizer directory (default: train a BPE)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default per preset)")
    g.add_argument("--fim-rate", type=float, default=0.1, help="share of documents in FIM form (default 0.1)")
    g.add_argument("--val-fraction", type=float, default=0.02, help="documents held out (default 0.02)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (default per preset)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward; gradients accumulate over batch/micro (default: the batch)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default per preset)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps, at most 2000")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--bf16-moments", action="store_true", help="keep AdamW's moments in BF16 (as V3)")
    g.add_argument("--init-std", type=float, default=0.006, help="weight init std (V3: 0.006)")
    g.add_argument("--recompute", action="store_true", help="recompute each block in backward (less memory)")
    g.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast: auto = on CUDA with bf16 support, and on a CPU whose bf16 matrix products "
                        "measure at least twice as fast as its float32 ones (AMX); a resumed run keeps its choice")
    g = p.add_argument_group("recipe")
    g.add_argument("--balance", choices=balance.MODES, default="aux-free",
                   help="aux-free: bias updates + sequence-wise loss (V3); aux-loss: the classic auxiliary loss; none")
    g.add_argument("--gamma", type=float, default=0.001, help="bias update speed (V3: 0.001)")
    g.add_argument("--alpha", type=float, default=None,
                   help="balance-loss weight (default 0.0001 for aux-free as V3, 0.001 for aux-loss)")
    g.add_argument("--mtp-depth", type=int, default=None, help="MTP modules (default: the preset's, 1)")
    g.add_argument("--mtp-lambda", type=float, nargs=2, default=(0.3, 0.1), metavar=("FIRST", "THEN"),
                   help="MTP loss weight for the first 2/3 of training, then (V3: 0.3 0.1)")
    g.add_argument("--eval-every", type=int, default=50, help="validation every K steps (and at the end)")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")


def _prepare_data(args, run_dir: str):
    """Corpus -> split -> tokenizer (trained or reused) -> cached token ids."""
    docs = load_corpus(args.data) if args.data else builtin_corpus()
    train_docs, val_docs = split(docs, args.val_fraction)
    if args.tokenizer:
        tok = Tokenizer.from_dir(args.tokenizer)
    elif os.path.isfile(os.path.join(run_dir, "tokenizer.json")):
        tok = Tokenizer.from_dir(run_dir)  # a resumed run keeps its tokenizer
    else:
        vocab = PRESETS[args.preset]["vocab_size"]
        tok = train_bpe((d.text for d in train_docs), vocab_size=vocab)
        tok.save_pretrained(run_dir)
    key = {"format": 2, "corpus": corpus_hash(docs), "tokenizer": hash_text(tok.tok.to_str()), "fim_rate": args.fim_rate,
           "seed": args.seed, "val_fraction": args.val_fraction}
    data_dir = os.path.join(run_dir, "data")
    train = cached_tokens(os.path.join(data_dir, "train.npy"), dict(key, split="train"),
                          lambda: tokenize(train_docs, tok, args.fim_rate, args.seed))
    val = cached_tokens(os.path.join(data_dir, "val.npy"), dict(key, split="val"), lambda: tokenize(val_docs, tok))
    val_bytes = sum(len(d.text.encode("utf-8")) for d in val_docs)
    info = {"documents": len(docs), "train_documents": len(train_docs), "val_documents": len(val_docs),
            "corpus_sha256": key["corpus"], "source": args.data or "python-stdlib", "train_tokens": int(len(train)),
            "val_tokens": int(len(val)), "val_bytes": val_bytes, "unigram_entropy": unigram_entropy(train)}
    return tok, train, val, info


def hash_text(s: str) -> str:
    import hashlib
    return hashlib.sha256(s.encode()).hexdigest()


def bf16_autocast(choice: str, device: torch.device, resumed: bool | None = None) -> bool:
    """--autocast: "bf16" / "off" as told; "auto": what a resumed run chose (a run keeps its precision), else on
    CUDA with bf16 support and on a CPU whose bf16 matrix products measure fast enough (train/cpu.py)."""
    if choice != "auto":
        return choice == "bf16"
    if resumed is not None:
        return resumed
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        pays, speedup = cpu.bf16_autocast_pays()
        print(f"bf16 autocast {'on' if pays else 'off'}: this CPU multiplies bf16 matrices at {speedup:.2f}x its "
              "float32 speed")
        return pays
    return False


@torch.no_grad()
def evaluate(model: DeepSeekV3, val: PackedSequences, batches: int, batch_size: int, device) -> tuple[float, torch.Tensor]:
    """Mean next-token loss over the first batches*batch_size validation sequences, and the expert loads."""
    model.eval()
    balance.take_loads(model)
    total, n = 0.0, 0
    count = min(batches * batch_size, val.num_sequences)
    for start in range(0, count, batch_size):
        b = val.batch(start, min(batch_size, count - start)).to(device)
        logits = model(b[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum").item()
        n += b[:, 1:].numel()
    loads = balance.take_loads(model)
    model.train()
    return total / n, loads


def _export(model, run_dir: str, tok, step: int) -> None:
    """The run directory's model := checkpoint `step`'s weights, recorded as such once complete."""
    save_pretrained(model, run_dir, dtype=torch.float32, tokenizer=tok)
    mark_exported(run_dir, step)


RUN_MARKS = ("checkpoints", "run.json", "metrics.jsonl", "data")  # what makes a directory a run directory of ours


def _claim_run_dir(run_dir: str) -> None:
    """--out is a new or empty directory, or one of our runs: anything else (a model directory someone made,
    a folder of data) is refused, since the trainer writes its tokenizer and model over what is there."""
    os.makedirs(run_dir, exist_ok=True)
    entries = sorted(os.listdir(run_dir))
    if entries and not any(m in entries for m in RUN_MARKS):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"--out {run_dir} is not empty ({shown}) and is not a dsv3 run directory (it has none of "
                         f"{', '.join(RUN_MARKS)}): training would write its tokenizer and model over what is "
                         "there; choose a new or empty directory")
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)  # ours from now on, even if stopped at once


def main(args: argparse.Namespace) -> dict:
    run_dir = args.out
    _claim_run_dir(run_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seq_len0, batch0, lr0 = PRESET_TRAINING.get(args.preset, (1024, 32, 1e-3))
    args.seq_len = args.seq_len or seq_len0
    args.batch_size = args.batch_size or batch0
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    args.lr = args.lr or lr0
    if args.batch_size % args.micro_batch_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size}")
    accum = args.batch_size // args.micro_batch_size
    alpha = args.alpha if args.alpha is not None else {"aux-free": 1e-4, "aux-loss": 1e-3, "none": 0.0}[args.balance]
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        cpu.retain_freed_memory()  # each step reuses the last one's pages instead of faulting in fresh ones

    # ---- data, tokenizer, model, optimizer ----------------------------------------------------------------
    tok, train_tokens, val_tokens, data_info = _prepare_data(args, run_dir)
    train_data = PackedSequences(train_tokens, args.seq_len, args.seed)
    val_data = PackedSequences(val_tokens, args.seq_len, args.seed, shuffle=False)
    overrides = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     max_position_embeddings=max(PRESETS[args.preset].get("max_position_embeddings", 0), args.seq_len),
                     initializer_range=args.init_std, quantization_config=None)
    if args.mtp_depth is not None:
        overrides["num_nextn_predict_layers"] = args.mtp_depth
    if args.balance == "aux-loss":
        overrides["seq_aux"] = False
    config = ModelConfig.preset(args.preset).replace(**overrides)
    depth = config.num_nextn_predict_layers
    model = DeepSeekV3(config)
    init_weights(model, std=args.init_std, generator=torch.Generator().manual_seed(args.seed))
    model.to(device)
    model.recompute = args.recompute
    balance.configure(model, args.balance, alpha)
    optimizer = build_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, bf16_moments=args.bf16_moments)
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup(args.steps)

    # ---- resume --------------------------------------------------------------------------------------------
    run_args = {k: getattr(args, k) for k in RUN_DEFINING}
    step, samples, resumed, state = 0, 0, None, {}
    for path in remove_stale(run_dir):
        print(f"removed {path}, left half-written by a run that was stopped")
    saved = list_checkpoints(run_dir)
    if saved:
        state = load_checkpoint(run_dir, saved[-1], model, optimizer)
        changed = {k: (state["args"].get(k), v) for k, v in run_args.items() if state["args"].get(k) != v}
        if changed:
            raise ValueError(f"{run_dir} holds a run made with other options ({', '.join(f'{k}: was {a!r}, now {b!r}' for k, (a, b) in changed.items())}); "
                             "use another --out, or the same options")
        step, samples, resumed = state["step"], state["samples"], state["step"]
        if exported_step(run_dir) != step:  # stopped between its last checkpoint and that checkpoint's export
            print(f"exporting checkpoint {step} to {run_dir} (the model there was not that checkpoint's)")
            _export(model, run_dir, tok, step)
        if step >= args.steps:
            print(f"{run_dir} has already trained {step} of {args.steps} steps")
    use_autocast = bf16_autocast(args.autocast, device, state.get("bf16_autocast"))
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), resume_step=resumed)
    atomic_write_json(os.path.join(run_dir, "run.json"), {
        "args": {k: v for k, v in vars(args).items() if k != "func"}, "data": data_info,
        "model": {"parameters": config.num_params(), "active_parameters": config.num_active_params()},
        "accumulation": accum, "warmup_steps": warmup, "alpha": alpha, "bf16_autocast": use_autocast})
    moe_names = [n for n, m in model.named_modules() if m in balance.moe_layers(model)]
    tokens_per_step = args.batch_size * args.seq_len
    val_tokens_per_byte = data_info["val_tokens"] / max(data_info["val_bytes"], 1)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext())
    print(f"training {args.preset}: {config.num_params() / 1e6:.2f}M parameters ({config.num_active_params() / 1e6:.2f}M "
          f"active), {data_info['train_tokens'] / 1e6:.2f}M training tokens, {tokens_per_step} tokens per step, "
          f"{args.steps} steps" + (f", resuming at step {step}" if resumed else ""))

    # ---- the loop ------------------------------------------------------------------------------------------
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    skipped, last = 0, {}
    while step < args.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, args.steps, args.lr, warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        lam = mtp_lambda_at(step, args.steps, *args.mtp_lambda) if depth else 0.0
        model.train()
        sums = {"loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        loads = 0
        for _ in range(accum):
            batch = train_data.batch(samples, args.micro_batch_size).to(device)
            samples += args.micro_batch_size
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast:
                logits, mtp_logits = model.forward_with_mtp(x)
                main_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                loss = main_loss
                if mtp_logits:
                    l_mtp = mtp_loss(mtp_logits, x, labels=y)
                    loss = loss + lam * l_mtp
                    sums["mtp_loss"] += l_mtp.item() / accum
                l_bal = balance.balance_loss(model)
                if l_bal is not None:
                    loss = loss + alpha * l_bal
                    sums["balance_loss"] += l_bal.item() / accum
            loads = loads + balance.take_loads(model)  # taken before backward: recomputation would count again
            (loss / accum).backward()
            balance.take_loads(model)
            sums["loss"] += main_loss.item() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            if args.balance == "aux-free":
                balance.update_bias(model, loads, gamma_at(step, args.steps, args.gamma))
        else:  # a bad step is skipped, not applied: the run goes on from the weights it had
            skipped += 1
            tqdm.write(f"step {step + 1}: loss {sums['loss']} / grad norm {grad_norm} not finite; step skipped")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0

        mv = balance.maxvio(loads)
        record = {"step": step, "loss": sums["loss"], "mtp_loss": sums["mtp_loss"] if depth else None,
                  "balance_loss": sums["balance_loss"], "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_step / dt, "maxvio": mv.nanmean().item(), "maxvio_layers": mv.tolist(),
                  "expert_load": (loads.float() / loads.sum(-1, keepdim=True).clamp(min=1)).tolist(),
                  "moe_layers": moe_names, "mtp_lambda": lam, "skipped": not finite}
        if step % args.eval_every == 0 or step == args.steps:
            val_loss, val_loads = evaluate(model, val_data, args.eval_batches, args.micro_batch_size, device)
            record.update(val_loss=val_loss, val_bpb=val_loss / math.log(2) * val_tokens_per_byte,
                          maxvio_global=balance.maxvio(val_loads).nanmean().item(),
                          unigram_entropy=data_info["unigram_entropy"])
        metrics.write(record)
        last = record
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", maxvio=f"{record['maxvio']:.2f}",
                        tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(run_dir, step, model, optimizer, {"samples": samples, "args": run_args, "skipped": skipped,
                                                              "bf16_autocast": use_autocast}, keep=args.keep)
            _export(model, run_dir, tok, step)
    bar.close()
    metrics.close()
    if not args.no_plots:
        try:
            paths = plot_run(run_dir)
            print("plots: " + ", ".join(os.path.basename(p) for p in paths))
        except (RuntimeError, ValueError) as e:
            print(f"no plots: {e}")
    if not last:  # nothing left to train: report the finished run's last step from its log
        last = next((r for r in reversed(read_metrics(metrics.path)) if r.get("step") == step), {})
    summary = {"steps": step, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
               "val_bpb": last.get("val_bpb"), "unigram_entropy": data_info["unigram_entropy"],
               "maxvio": last.get("maxvio"), "maxvio_global": last.get("maxvio_global"), "skipped_steps": skipped}
    if last:
        print(f"done: step {step}, train loss {last['loss']:.3f}, validation loss {last.get('val_loss', float('nan')):.3f} "
              f"({last.get('val_bpb', float('nan')):.3f} bits/byte) against a unigram entropy of "
              f"{data_info['unigram_entropy']:.3f} nats/token; batch MaxVio {last['maxvio']:.3f}")
    return summary
