"""Bits per byte: `dsv3 eval bpb`, and the validation loss a training run reports.

Bits per byte makes models with different tokenizers comparable: the text's negative log-likelihood in bits,
divided by its length in UTF-8 bytes.

`dsv3 eval bpb --max-length L` (the default mode) computes it exactly as lm-eval's `loglikelihood_rolling`
does for its `local-completions` model with `max_length=L` (TemplateAPI.loglikelihood_rolling over
lm_eval.utils.get_rolling_token_windows and make_disjoint_window), so its figure is the one lm-eval reports
against `dsv3 serve` or vLLM:
- each document is encoded alone, without special tokens;
- its tokens are scored in windows (`rolling_windows`): every request is a sequence of at most L - 1 tokens
  and asks one generated token, so the model's context must hold L; the first window is a prefix token and
  the document's first L - 2 tokens, each next one predicts the next L - 2 tokens from the one token before
  them (the last window, shorter, from as many as fill it to L - 1); every token is predicted exactly once;
- the prefix token is lm-eval's: BOS, but EOS when BOS is missing or has id 0 (lm-eval takes
  `bos_token_id or eos_token_id`; DeepSeek-V3's BOS is id 0, so lm-eval starts its documents from EOS);
  `--prefix-token` overrides it, as lm-eval's `custom_prefix_token_id` does;
- the metrics aggregate over documents as lm-eval's do: bits_per_byte = -sum(log-likelihood) / sum(bytes)
  / ln 2, byte_perplexity = exp(-sum(ll) / sum(bytes)), word_perplexity = exp(-sum(ll) / sum(words)), words
  counted as lm-eval counts them (`re.split(r"\\s+", text)`).
All windows go through the scoring path in batches (eval/scoring.py): a model directory (`--model`, any
context: past the one its config names too) or a running server (`--server`).

`--seq-len N` instead scores the documents as a training run does for its val_loss and val_bpb (packed
sequences of N tokens, each document as BOS text EOS, the mean loss of the first `--batches` batches times the
whole data's tokens per byte): with the run's --seq-len and --eval-batches it reproduces the run's figures.

    dsv3 eval bpb --model runs/tiny --builtin --max-length 1024               # to standard output
    dsv3 eval bpb --server http://127.0.0.1:8000 --data notes/ --max-length 4096 --output bpb.json
    dsv3 eval bpb --model runs/tiny --seq-len 256 --batches 8 --output val.json  # the run's own val_bpb
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
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


# ---- lm-eval's rolling windows ----------------------------------------------------------------------------

def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], int]]:
    """The windows lm-eval's local-completions scores a document's tokens in at its `max_length`, as
    (sequence, n_context): the sequence's tokens after its first n_context are predicted, each once over all
    windows. No tokens, no windows. (get_rolling_token_windows(tokens, prefix_token, max_seq_len=max_length - 2,
    context_len=1) through make_disjoint_window, as TemplateAPI.loglikelihood_rolling calls them.)"""
    if max_length < 3:
        raise ValueError(f"max_length={max_length} must be >= 3 (a window holds max_length - 1 tokens, one of them "
                         "context, and a request asks one more)")
    span, pred = max_length - 1, max_length - 2  # tokens per sequence; predicted per window
    if not tokens:
        return []
    first = tokens[:pred]
    out = [([prefix_token] + first, 1)]
    done = len(first)
    while done < len(tokens):
        end = min(done + pred, len(tokens))
        seq = tokens[end - span:end]  # (end >= span: at least pred + 1 tokens were there)
        out.append((seq, span - (end - done)))
        done = end
    return out


def lm_eval_prefix_token(bos_token_id: int | None, eos_token_id: int | None) -> int:
    """The token lm-eval's local-completions puts before a document: `bos_token_id or eos_token_id`, so EOS
    when BOS is missing or has id 0 (TemplateAPI.prefix_token_id)."""
    token = bos_token_id or eos_token_id
    if token is None:
        raise ValueError("the tokenizer names neither a BOS nor an EOS token to start documents from: give "
                         "--prefix-token ID")
    return token


@dataclass
class RollingResult:
    loglikelihood: float  # summed over every document's tokens, nats
    tokens: int  # tokens predicted (every document's tokens)
    bytes: int  # UTF-8 bytes of the documents
    words: int  # as lm-eval counts them
    documents: int
    windows: int

    @property
    def metrics(self) -> dict:
        """lm-eval's aggregates of loglikelihood_rolling (lm_eval/api/metrics.py)."""
        nll = -self.loglikelihood
        return {"bits_per_byte": nll / self.bytes / math.log(2), "byte_perplexity": math.exp(nll / self.bytes),
                "word_perplexity": math.exp(nll / self.words), "loss": nll / self.tokens}


def rolling_loglikelihood(scorer, texts: list[str], max_length: int, prefix_token: int) -> RollingResult:
    """Every text's log-likelihood over lm-eval's rolling windows, all windows batched through the scorer."""
    if max_length - 1 > scorer.max_length:
        raise ValueError(f"max_length={max_length} needs sequences of {max_length - 1} tokens and one generated; "
                         f"{scorer.name} scores at most {scorer.max_length} (with --model, --context raises it)")
    from tqdm import tqdm

    encoded = [scorer.encode(t, add_special_tokens=False)
               for t in tqdm(texts, desc="tokenizing", unit="doc", disable=len(texts) < 64)]
    windows = [rolling_windows(ids, prefix_token, max_length) for ids in encoded]
    flat = [w for ws in windows for w in ws]
    lps = iter(scorer.logprobs([seq for seq, _ in flat], desc="scoring windows"))
    total = 0.0
    for ws in windows:
        # as lm-eval sums them: each window's logprobs, then the windows, then the documents
        total += sum(sum(next(lps)[n_context - 1:]) for _, n_context in ws)
    return RollingResult(loglikelihood=total, tokens=sum(map(len, encoded)),
                         bytes=sum(len(t.encode("utf-8")) for t in texts),
                         words=sum(len(re.split(r"\s+", t)) for t in texts), documents=len(texts),
                         windows=len(flat))


# ---- `dsv3 eval bpb` -----------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    from .scoring import add_scorer_args

    add_scorer_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, metavar="FILE",
                     help="text file, folder of text files, or JSONL with a 'text' field, as `dsv3 train --data` "
                          "reads it: every document is scored")
    src.add_argument("--builtin", action="store_true",
                     help="the built-in corpus's validation split, as `dsv3 train` holds it out (the default)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="score only the documents a `dsv3 train --val-fraction F` run holds out of --data "
                        f"(default: all of --data; the built-in corpus: {DEFAULT_VAL_FRACTION})")
    p.add_argument("--max-length", type=int, default=None, metavar="L",
                   help="lm-eval's max_length: rolling windows of L - 1 tokens per request, each asking one more "
                        "(default: the context of the model or server). With --model, a length past the config's "
                        "context is admitted (as --context L-1)")
    p.add_argument("--prefix-token", default=None, metavar="ID|bos|eos",
                   help="the token each document is scored after (default: lm-eval's choice for local-completions: "
                        "BOS, or EOS when BOS has id 0, as DeepSeek-V3's has)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="instead of rolling windows: packed sequences of N tokens, as a training run's val_loss "
                        "and val_bpb (with --model only)")
    p.add_argument("--batches", type=int, default=None,
                   help="with --seq-len: score only the first N batches of --batch-size (default: all)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="JSON file to write (default: standard output): bits_per_byte, byte_perplexity, "
                        "word_perplexity, loss, tokens, bytes, documents, max_length, model")


def _documents(args: argparse.Namespace):
    from ..data.corpus import builtin_corpus, load_corpus, split

    docs = load_corpus(args.data) if args.data else builtin_corpus()
    fraction = args.val_fraction if args.val_fraction is not None else (None if args.data else DEFAULT_VAL_FRACTION)
    if fraction is not None:
        docs = split(docs, fraction)[1]
    if not docs:
        raise ValueError(f"no documents to score in {args.data or 'the built-in corpus'}")
    return docs, fraction


def _prefix_token(spec: str | None, scorer) -> int:
    if spec is None:
        return lm_eval_prefix_token(scorer.bos_token_id, scorer.eos_token_id)
    named = {"bos": scorer.bos_token_id, "eos": scorer.eos_token_id}
    if spec.lower() in named:
        if named[spec.lower()] is None:
            raise ValueError(f"--prefix-token {spec}: the tokenizer has no {spec.upper()} token")
        return named[spec.lower()]
    try:
        return int(spec)
    except ValueError:
        raise ValueError(f"--prefix-token {spec!r}: give a token id, bos or eos") from None


def main(args: argparse.Namespace) -> dict:
    if args.seq_len is not None:
        if args.max_length is not None or args.prefix_token is not None:
            raise ValueError("--seq-len (packed sequences, as a training run) and --max-length/--prefix-token "
                             "(lm-eval's rolling windows) are two ways of scoring: give one")
        return _packed_main(args)
    if args.batches is not None:
        raise ValueError("--batches applies to --seq-len (packed sequences); rolling windows score every document")
    from .scoring import scorer_from_args

    docs, fraction = _documents(args)
    if args.model is not None and args.context is None and args.max_length is not None:
        args.context = args.max_length - 1  # the engine admits what the windows need, past the config if asked
    scorer = scorer_from_args(args)
    max_length = args.max_length or scorer.max_length + 1
    prefix = _prefix_token(args.prefix_token, scorer)
    t0 = time.perf_counter()
    r = rolling_loglikelihood(scorer, [d.text for d in docs], max_length, prefix)
    result = {**r.metrics, "tokens": r.tokens, "bytes": r.bytes, "words": r.words, "documents": r.documents,
              "windows": r.windows, "max_length": max_length, "prefix_token_id": prefix,
              "model": args.model or getattr(scorer, "model", None), "server": args.server,
              "data": args.data or "python-stdlib", "val_fraction": fraction, "seconds": time.perf_counter() - t0}
    _write(result, args.output)
    print(f"{result['model']}: {result['bits_per_byte']:.4f} bits per byte over {r.tokens} tokens of {r.documents} "
          f"documents ({r.windows} windows, max_length {max_length})"
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return result


def _write(result: dict, output: str | None) -> None:
    if output is None:
        print(json.dumps(result, indent=2))
    else:
        from ..ckpt.io import atomic_write_json
        atomic_write_json(output, result)


def _packed_main(args: argparse.Namespace) -> dict:
    """Packed sequences of --seq-len through the model's forward, as the training run scores its validation."""
    from ..ckpt.pretrained import load_pretrained
    from ..data.dataset import tokenize
    from ..tokenizer import Tokenizer

    if args.model is None:
        raise ValueError("--seq-len scores a model directory's forward as its training run did: give --model (a "
                         "server is scored with --max-length)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = Tokenizer.from_dir(args.model)  # before the weights: a model without a tokenizer fails at once
    docs, fraction = _documents(args)
    # float32 unless asked otherwise: the training run scores its float32 master weights
    model = load_pretrained(args.model, dtype=args.dtype or "float32", device=device, fp8=False)
    seq_len = args.seq_len
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
    _write(result, args.output)
    print(f"{args.model}: {result['bits_per_byte']:.4f} bits per byte, loss {r.loss:.4f} nats/token over "
          f"{r.tokens} tokens ({r.sequences} sequences of {seq_len})"
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return result
