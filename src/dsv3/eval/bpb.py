"""Validation loss and bits per byte: the training run's held-out measure, and `dsv3 eval bpb`.

Bits per byte makes models with different tokenizers comparable: the mean next-token loss (nats per token)
in bits, times the tokens per byte of the text scored, i.e. the bits the model needs per byte of UTF-8 text.
When only the first sequences of the data are scored (`max_sequences`), the loss is their mean and the
tokens per byte are the whole data's, as a training run's `val_bpb` does it.

    dsv3 eval bpb --model runs/tiny --output bpb.json      # the built-in corpus's validation split
    dsv3 eval bpb --model DIR --data notes/ --seq-len 1024 --batches 16 --output bpb.json
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.dataset import PackedSequences
from ..model.model import DeepSeekV3
from ..model.moe import RoutingStats, moe_layers

DEFAULT_VAL_FRACTION = 0.02  # the share of the built-in corpus `dsv3 train` holds out by default


@dataclass
class LossResult:
    loss: float  # mean next-token cross-entropy, nats per token
    tokens: int  # predictions scored
    sequences: int
    loads: torch.Tensor | None = None  # (MoE layers, experts) tokens routed, when asked for


@torch.no_grad()
def next_token_loss(model: DeepSeekV3, data: PackedSequences, max_sequences: int | None, batch_size: int,
                    device: torch.device | str, count_loads: bool = False, score=None,
                    layers: list | None = None) -> LossResult:
    """The mean next-token loss over the first `max_sequences` sequences of `data` (all when None), in
    batches of `batch_size`, in float32 logits; with count_loads, the expert loads of those forwards too.
    The model is put in eval mode and returned to the mode it was in.

    score(batch, stats) -> (summed loss, tokens) replaces the model's forward (a pipeline runs it through its
    stages: parallel/pipeline.py); `layers` are the MoE layers whose loads are counted (default: the model's)."""
    was_training = model.training
    model.eval()
    layers = moe_layers(model) if layers is None else layers
    score = score or (lambda b, stats: _scored(model, b, stats))
    count = data.num_sequences if max_sequences is None else min(max_sequences, data.num_sequences)
    total, n, loads = 0.0, 0, None
    try:
        for start in range(0, count, batch_size):
            b = data.batch(start, min(batch_size, count - start)).to(device)
            stats = RoutingStats() if count_loads else None
            loss_sum, tokens = score(b, stats)
            total, n = total + loss_sum, n + tokens
            if stats is not None:
                loads = stats.loads(layers, b.device) + (0 if loads is None else loads)
    finally:
        model.train(was_training)
    return LossResult(loss=total / max(n, 1), tokens=n, sequences=count, loads=loads)


def _scored(model: DeepSeekV3, batch_BT: torch.Tensor, stats: RoutingStats | None) -> tuple[float, int]:
    """The summed next-token cross-entropy of a batch of T tokens a sequence (T - 1 predicted), and its count."""
    return summed_cross_entropy(model(batch_BT[:, :-1], stats=stats), batch_BT[:, 1:])


def summed_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[float, int]:
    """-> (the cross-entropy summed over the positions, in float32 logits; the number of positions). Labels
    of -100 (no loss there: a prompt's tokens in SFT, padding) are left out of both."""
    return (F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=-100,
                            reduction="sum").item(),
            int((labels_BT != -100).sum()))


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """Nats per token -> bits per byte of text."""
    return loss / math.log(2) * tokens_per_byte


# ---- `dsv3 eval bpb` -----------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer.json); "
                                                  "its own tokenizer reads the text")
    p.add_argument("--data", default=None,
                   help="text file, folder, or JSONL with a 'text' field: all of it is scored (default: the "
                        "validation split of the built-in corpus, as `dsv3 train` holds it out)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="score only the documents a `dsv3 train --val-fraction F` run holds out of --data "
                        f"(default: all of --data; the built-in corpus: {DEFAULT_VAL_FRACTION})")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per scored sequence (default: 1024, at most the model's context)")
    p.add_argument("--batches", type=int, default=None, help="score only the first N batches (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="weights' dtype: float32 (default) or bfloat16")
    p.add_argument("--output", required=True, help="JSON file to write (bits_per_byte, loss, tokens, bytes)")


def main(args: argparse.Namespace) -> dict:
    from ..ckpt.io import atomic_write_json
    from ..ckpt.pretrained import load_pretrained
    from ..data.corpus import builtin_corpus, load_corpus, split
    from ..data.dataset import tokenize
    from ..tokenizer import Tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = Tokenizer.from_dir(args.model)  # before the weights: a model without a tokenizer fails at once
    docs = load_corpus(args.data) if args.data else builtin_corpus()
    fraction = args.val_fraction if args.val_fraction is not None else (None if args.data else DEFAULT_VAL_FRACTION)
    if fraction is not None:
        docs = split(docs, fraction)[1]
    if not docs:
        raise ValueError(f"no documents to score in {args.data or 'the built-in corpus'}")
    model = load_pretrained(args.model, dtype=args.dtype, device=device, fp8=False)
    seq_len = args.seq_len or min(1024, model.config.max_position_embeddings)
    tokens = tokenize(docs, tok)
    data = PackedSequences(tokens, seq_len, seed=0, shuffle=False)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    t0 = time.perf_counter()
    r = next_token_loss(model, data, None if args.batches is None else args.batches * args.batch_size,
                        args.batch_size, device)
    result = {"bits_per_byte": bits_per_byte(r.loss, len(tokens) / n_bytes), "loss": r.loss, "tokens": r.tokens,
              "bytes": n_bytes, "data_tokens": int(len(tokens)), "sequences": r.sequences, "seq_len": seq_len,
              "documents": len(docs), "model": args.model, "data": args.data or "python-stdlib",
              "val_fraction": fraction, "seconds": time.perf_counter() - t0}
    atomic_write_json(args.output, result)
    print(f"{args.model}: {result['bits_per_byte']:.4f} bits per byte, loss {r.loss:.4f} nats/token over "
          f"{r.tokens} tokens ({r.sequences} sequences of {seq_len}); wrote {args.output}")
    return result
