"""`dsv3 eval mc`: multiple choice by log-likelihood, as lm-eval scores its `multiple_choice` tasks.

Each JSONL record is `{"context" (or "query"): str, "choices": [str, ...], "gold" (or "label"): int}`. Each
choice's continuation is scored after the context: the context and context + choice are encoded, the
continuation is the tokens past the context's (lm-eval's split), and its log-likelihood the sum of their
log-probabilities. `acc`: the most likely choice is the gold one; `acc_norm`: the same with each sum divided by
the choice's length in UTF-8 bytes (lm-eval's acc_norm). Standard errors as lm-eval's (sample standard
deviation over sqrt(n)).

    dsv3 eval mc --model runs/demo --data questions.jsonl --output mc.json
"""

from __future__ import annotations

import argparse
import math
import sys


def load_records(path: str) -> list[dict]:
    from ..data.corpus import jsonl_lines

    records = []
    for where, obj in jsonl_lines(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be an object with context, choices and gold")
        context = obj.get("context", obj.get("query"))
        choices, gold = obj.get("choices"), obj.get("gold", obj.get("label"))
        if not isinstance(context, str):
            raise ValueError(f"{where}: 'context' (or 'query') must be a string")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
            raise ValueError(f"{where}: 'gold' (or 'label') must be an index into choices, not {gold!r}")
        records.append({"context": context, "choices": choices, "gold": gold})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def continuation_split(scorer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's: encode(context + continuation) cut at len(encode(context)) (trailing spaces of the context
    moved onto the continuation first, as lm-eval does); the context starts after BOS when the model has one."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = scorer.encode(context + continuation)
    ctx = scorer.encode(context)
    head = [scorer.bos_token_id] if scorer.bos_token_id is not None else []
    return head + whole[:len(ctx)], whole[len(ctx):]


def score(scorer, records: list[dict]) -> dict:
    seqs, spans = [], []
    for r in records:
        for c in r["choices"]:
            ctx, cont = continuation_split(scorer, r["context"], c)
            if not cont:
                raise ValueError(f"choice {c!r} adds no token to its context")
            seqs.append(ctx + cont)
            spans.append(len(ctx))
    lps = scorer.logprobs(seqs, desc="scoring choices")
    acc, acc_norm, k = [], [], 0
    for r in records:
        ll = [sum(lps[k + j][spans[k + j] - 1:]) for j in range(len(r["choices"]))]
        norm = [x / len(c.encode("utf-8")) for x, c in zip(ll, r["choices"])]
        k += len(r["choices"])
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == r["gold"]))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == r["gold"]))
        r["loglikelihoods"] = ll
    n = len(records)

    def stderr(xs):
        if n < 2:
            return float("nan")
        mean = sum(xs) / n
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)

    return {"acc": sum(acc) / n, "acc_stderr": stderr(acc), "acc_norm": sum(acc_norm) / n,
            "acc_norm_stderr": stderr(acc_norm), "records": n,
            "chance": sum(1 / len(r["choices"]) for r in records) / n,
            "loglikelihoods": [r["loglikelihoods"] for r in records]}  # per record, per choice


def add_args(p: argparse.ArgumentParser) -> None:
    from .scoring import add_scorer_args

    add_scorer_args(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='records {"context": str, "choices": [str, ...], "gold": int} ("query"/"label" also read)')
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--output", default=None, metavar="FILE", help="JSON file to write (default: standard output)")


def main(args: argparse.Namespace) -> dict:
    from .bpb import _write
    from .scoring import scorer_from_args

    records = load_records(args.data)[: args.limit]
    scorer = scorer_from_args(args)
    r = score(scorer, records)
    r.update(model=args.model or args.server, data=args.data)
    _write(r, args.output)
    print(f"{r['model']}: acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, acc_norm {r['acc_norm']:.4f} over {r['records']} "
          f"records (chance {r['chance']:.3f})", file=sys.stderr)
    return r
