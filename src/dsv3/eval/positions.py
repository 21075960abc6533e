"""`dsv3 eval loss-by-position`: the mean next-token loss at each position of windows of L tokens, the curve that
shows whether a model uses its context, and whether it holds up past the length it was trained at.

The documents are packed as `dsv3 train` packs them (BOS text EOS, one after the other) and cut into windows of
L tokens; position p's loss is the mean over the windows of -log p(t_p | t_<p), for p = 1..L-1, through the
scoring path (eval/scoring.py). Several models in one run share the windows and the plot: a model before and
after context extension is one command.

    dsv3 eval loss-by-position --model runs/demo --model runs/long/s2 --context 4096 --max-length 4096 \\
        --train-length 256 --plot positions.png --output positions.json

With `--train-length L0` each model also gets `loss_at_train_length` (the mean over positions 1..L0-1),
`loss_last_bucket` (the mean over the last bucket of positions) and their ratio.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_BUCKET = 64


def windows_of(docs: list[str], encode, bos: int | None, eos: int | None, length: int,
               max_windows: int | None) -> list[list[int]]:
    """The documents packed as training packs them (BOS text EOS), cut into full windows of `length` tokens."""
    ids: list[int] = []
    need = None if max_windows is None else max_windows * length
    for text in docs:
        ids += ([bos] if bos is not None else []) + encode(text) + ([eos] if eos is not None else [])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // length
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def loss_by_position(scorer, windows: list[list[int]]) -> list[float]:
    """-> the mean loss at positions 1..L-1 (L - 1 values) over the windows (all of length L)."""
    total = None
    for lps in scorer.logprobs(windows, desc="scoring windows"):
        total = [-x for x in lps] if total is None else [t - x for t, x in zip(total, lps)]
    return [t / len(windows) for t in total]


def summarise(losses: list[float], bucket: int, train_length: int | None) -> dict:
    """Bucketed curve (bucket b covers positions b*bucket+1 .. (b+1)*bucket) and, with train_length, the ratio of
    the last bucket's loss to the loss within the training length."""
    buckets = [sum(losses[i:i + bucket]) / len(losses[i:i + bucket]) for i in range(0, len(losses), bucket)]
    out = {"loss": sum(losses) / len(losses), "bucket_start": [1 + i for i in range(0, len(losses), bucket)],
           "bucket_loss": buckets, "loss_by_position": losses}
    if train_length is not None:
        within = losses[: max(1, train_length - 1)]
        out["loss_at_train_length"] = sum(within) / len(within)
        out["loss_last_bucket"] = buckets[-1]
        out["last_bucket_over_train_length"] = buckets[-1] / out["loss_at_train_length"]
    return out


def plot(results: list[dict], path: str, train_length: int | None, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'dsv3[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot([s + 0.5 * (r["bucket_start"][1] - 1 if len(r["bucket_start"]) > 1 else 0)
                 for s in r["bucket_start"]], r["bucket_loss"], label=r["label"])
    if train_length:
        ax.axvline(train_length, color="gray", linestyle=":", label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="model directory; repeat to compare models on the same windows")
    p.add_argument("--label", action="append", default=None, help="a name per --model for the plot (default: "
                                                                   "the directory)")
    p.add_argument("--server", default=None, metavar="URL", help="a running `dsv3 serve` instead of --model")
    p.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")
    p.add_argument("--context", type=int, default=None,
                   help="with --model: admit sequences this long even past the context config.json names "
                        "(default: --max-length when it is past it)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per engine batch or request (default 8)")
    p.add_argument("--dtype", default=None, help="with --model: weights' dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="with --model: cpu, cuda, ... (default: cuda if available)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, metavar="FILE",
                     help="text file, folder, or JSONL with a 'text' field, as `dsv3 train --data` reads it")
    src.add_argument("--builtin", action="store_true",
                     help="the built-in corpus's validation split, as `dsv3 train` holds it out (the default)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="only the documents a `dsv3 train --val-fraction F` run holds out of --data")
    p.add_argument("--max-length", type=int, required=True, metavar="L", help="tokens per window")
    p.add_argument("--windows", type=int, default=None, help="score at most this many windows (default: all)")
    p.add_argument("--bucket", type=int, default=DEFAULT_BUCKET,
                   help=f"positions per point of the curve (default {DEFAULT_BUCKET})")
    p.add_argument("--train-length", type=int, default=None, metavar="L0",
                   help="the length the model was trained at: adds the loss within it and the last bucket's ratio "
                        "to it")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the curves (needs matplotlib)")
    p.add_argument("--output", default=None, metavar="FILE", help="JSON file to write (default: standard output)")


def main(args: argparse.Namespace) -> dict:
    from .bpb import _documents, _write
    from .scoring import open_scorer

    if (not args.model) == (args.server is None):
        raise ValueError("give --model (one or more) or --server, not both or neither")
    if args.max_length < 2:
        raise ValueError(f"--max-length {args.max_length}: a window needs at least 2 tokens")
    if args.bucket < 1:
        raise ValueError(f"--bucket {args.bucket} must be >= 1")
    if args.train_length is not None and not 2 <= args.train_length <= args.max_length:
        raise ValueError(f"--train-length {args.train_length} must be in [2, --max-length {args.max_length}]")
    sources = [("model", m) for m in args.model] if args.model else [("server", args.server)]
    labels = args.label or []
    if len(labels) > len(sources):
        raise ValueError(f"{len(labels)} --label for {len(sources)} model(s)")
    docs, fraction = _documents(args)
    results, windows = [], None
    for i, (kind, where) in enumerate(sources):
        if kind == "model":
            context = args.context or args.max_length
            scorer = open_scorer(model=where, context=context, batch_size=args.batch_size, dtype=args.dtype,
                                 device=args.device)
        else:
            scorer = open_scorer(server=where, api_key=args.api_key, batch_size=args.batch_size)
        if args.max_length > scorer.max_length:
            raise ValueError(f"--max-length {args.max_length} is longer than {where} admits ({scorer.max_length}); "
                             "with --model, raise --context")
        if windows is None:  # the first model's tokenizer cuts the windows every model scores
            windows = windows_of([d.text for d in docs], scorer.encode, scorer.bos_token_id, scorer.eos_token_id,
                                 args.max_length, args.windows)
            if not windows:
                raise ValueError(f"the documents hold fewer than --max-length {args.max_length} tokens")
        r = summarise(loss_by_position(scorer, windows), args.bucket, args.train_length)
        r.update(label=labels[i] if i < len(labels) else where, model=where)
        results.append(r)
        tail = (f", last bucket / within {args.train_length}: {r['last_bucket_over_train_length']:.3f}"
                if args.train_length else "")
        print(f"{where}: mean loss {r['loss']:.4f} over {len(windows)} windows of {args.max_length}{tail}",
              file=sys.stderr)
    out = {"max_length": args.max_length, "windows": len(windows), "bucket": args.bucket,
           "train_length": args.train_length, "data": args.data or "python-stdlib", "val_fraction": fraction,
           "models": results}
    if args.plot:
        plot(results, args.plot, args.train_length,
             f"loss by position, windows of {args.max_length} ({len(windows)} windows)")
    _write(out, args.output)
    return out
