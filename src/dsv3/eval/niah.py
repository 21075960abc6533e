"""`dsv3 eval niah` and `dsv3 eval passkey`: can the model find one fact at any depth of a long context?

Needle in a haystack (as the DeepSeek-V3 report's figure): a needle holding a random 5-digit value is put at
each depth (a fraction of the haystack) of a haystack of each length in tokens, a question follows, and the
model answers greedily; a sample counts when the first number of its answer is the value (exact retrieval).
The heatmap has the length across and the depth down.

Passkey retrieval (Mohtashami & Jaggi, 2023) is the same test on its own haystack (the repeated filler
sentences below) with its own needle and question; it also reports the likelihood-ranked choice of the true key
among `--choices` candidates (chance 1/choices), since a small model may rank before it can generate.

`--format code` swaps the sentences for Python (`SECRET_KEY = 48213` ... `assert SECRET_KEY ==`): a model
trained only on source code, as the `make demo` model is, has never seen the text form's question. The
needle goes in at the line break nearest its depth, so that it is a line of its own.

    dsv3 eval niah --model runs/long/s2 --lengths 256,1024,4096 --depths 0,0.25,0.5,0.75,1 --plot niah.png
    dsv3 eval passkey --model runs/demo --context 4096 --lengths 1024,4096 --format code
"""

from __future__ import annotations

import argparse
import random
import re
import sys

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FORMATS = {  # (needle, question) per test and format; {value} is the key
    ("niah", "text"): ("\nThe special magic number is: {value}.\n",
                       "\nWhat is the special magic number mentioned above? The special magic number is:"),
    ("niah", "code"): ("\nSECRET_KEY = {value}\n", "\nassert SECRET_KEY =="),
    ("passkey", "text"): ("\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
                          "\nWhat is the pass key? The pass key is"),
    ("passkey", "code"): ("\nPASS_KEY = {value}  # remember it: {value} is the pass key\n", "\nassert PASS_KEY =="),
}
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def haystack_text(kind: str, data: str | None) -> str:
    if kind == "filler":
        return FILLER * 4000
    if kind == "builtin":
        from ..data.corpus import builtin_corpus, split
        return "\n".join(d.text for d in split(builtin_corpus(), 0.02)[1])
    from ..data.corpus import load_corpus
    return "\n".join(d.text for d in load_corpus(data))


def build_prompt(hay: list[int], start: int, length: int, depth: float, needle: list[int], question: list[int],
                 bos: int | None, newline_ids: set[int]) -> tuple[list[int], int]:
    """A prompt of exactly `length` tokens: [BOS] haystack[:d] needle haystack[d:] question, the haystack taken
    from hay[start:], d the depth's token offset moved to just after the nearest line break (if any within 64
    tokens). -> (prompt, the needle's first token index)."""
    head = [bos] if bos is not None else []
    n = length - len(head) - len(needle) - len(question)
    if n < 0:
        raise ValueError(f"length {length} is shorter than the needle and question ({len(needle) + len(question)} "
                         "tokens)")
    h = hay[start:start + n]
    if len(h) < n:
        raise ValueError(f"the haystack has {len(hay)} tokens, fewer than the {n} a prompt of {length} needs")
    d = round(depth * n)
    near = [i for i in range(max(0, d - 64), min(n, d + 64) + 1) if i == 0 or i == n or h[i - 1] in newline_ids]
    if near:
        d = min(near, key=lambda i: abs(i - d))
    return head + h[:d] + needle + h[d:] + question, len(head) + d


def run(scorer, test: str, fmt: str, lengths: list[int], depths: list[float], samples: int, seed: int,
        hay_text: str, choices: int = 0, max_new_tokens: int = 8) -> dict:
    needle_t, question_t = FORMATS[(test, fmt)]
    hay = scorer.encode(hay_text)
    newline_ids = {i for i in set(hay[:20000]) if "\n" in scorer.decode([i])}
    question = scorer.encode(question_t)
    rng = random.Random(seed)
    cases, prompts = [], []
    for L in lengths:
        if L > scorer.max_length:
            raise ValueError(f"length {L} is longer than the scorer admits ({scorer.max_length}); with --model, "
                             "raise --context")
        for depth in depths:
            for _ in range(samples):
                value = rng.randint(10000, 99999)
                needle = scorer.encode(needle_t.format(value=value))
                start = rng.randint(0, max(0, len(hay) - L))
                prompt, at = build_prompt(hay, start, L, depth, needle, question, scorer.bos_token_id, newline_ids)
                cases.append({"length": L, "depth": depth, "value": value, "needle_at": at})
                prompts.append(prompt)
    answers = scorer.greedy(prompts, max_new_tokens, desc=f"{test} answers")
    for c, a in zip(cases, answers):
        c["answer"], c["correct"] = a, first_number(a) == str(c["value"])
    if choices > 1:  # the true key against choices - 1 others, by the likelihood of each key after the question
        seqs, owners = [], []
        for i, (c, prompt) in enumerate(zip(cases, prompts)):
            keys = [c["value"]]
            while len(keys) < choices:  # distinct random keys of the same form
                k = rng.randint(10000, 99999)
                if k not in keys:
                    keys.append(k)
            for k in keys:
                seqs.append(prompt + scorer.encode(f" {k}"))
                owners.append((i, len(prompt)))
        lps = scorer.logprobs(seqs, desc=f"{test} choices")
        for i, c in enumerate(cases):
            start = owners[i * choices][1] - 1  # the first key token's log-probability
            scores = [sum(lp[start:]) for lp in lps[i * choices:(i + 1) * choices]]
            c["choice_correct"] = all(scores[0] > x for x in scores[1:])  # a tie is not a retrieval
    grid = [[_mean([c["correct"] for c in cases if c["length"] == L and c["depth"] == d]) for L in lengths]
            for d in depths]
    out = {"test": test, "format": fmt, "lengths": lengths, "depths": depths, "samples": samples, "seed": seed,
           "accuracy": _mean([c["correct"] for c in cases]), "accuracy_by_depth_length": grid,
           "accuracy_by_length": {str(L): _mean([c["correct"] for c in cases if c["length"] == L]) for L in lengths},
           "chance": 1e-5, "cases": cases}
    if choices > 1:
        out.update(choices=choices, choice_accuracy=_mean([c["choice_correct"] for c in cases]),
                   choice_chance=1 / choices,
                   choice_accuracy_by_length={str(L): _mean([c["choice_correct"] for c in cases if c["length"] == L])
                                              for L in lengths})
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(map(float, xs)) / len(xs) if xs else float("nan")


def heatmap(result: dict, path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'dsv3[plot]'") from None
    grid = result["accuracy_by_depth_length"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["lengths"]), 1.2 + 0.5 * len(result["depths"])))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(L) for L in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="exact retrieval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser, test: str) -> None:
    from .scoring import add_scorer_args

    add_scorer_args(p)
    p.add_argument("--lengths", required=True, help="context lengths in tokens, comma-separated (e.g. 256,1024,4096)")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"needle depths in [0, 1] (default {DEFAULT_DEPTHS})")
    p.add_argument("--samples", type=int, default=4, help="needles per (length, depth) cell (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the values and the haystack's offsets")
    p.add_argument("--format", choices=("text", "code"), default="text",
                   help="text (default: the published sentences) or code (a Python constant and an assert, for "
                        "models trained on source code)")
    p.add_argument("--haystack", default="filler" if test == "passkey" else "builtin",
                   help="builtin (the built-in corpus's validation split), filler (the passkey sentences), or a "
                        f"file/folder (default {'filler' if test == 'passkey' else 'builtin'})")
    p.add_argument("--choices", type=int, default=10 if test == "passkey" else 0,
                   help="also rank the true key among this many by likelihood (default "
                        f"{10 if test == 'passkey' else 0}; 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens of each greedy answer (default 8)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the heatmap (needs matplotlib)")
    p.add_argument("--output", default=None, metavar="FILE", help="JSON file to write (default: standard output)")


def main(args: argparse.Namespace, test: str) -> dict:
    from .bpb import _write
    from .scoring import scorer_from_args

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {args.lengths!r} / --depths {args.depths!r}: comma-separated numbers") from None
    if not lengths or any(L < 8 for L in lengths):
        raise ValueError(f"--lengths {args.lengths!r}: give lengths of at least 8 tokens")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths {args.depths!r}: give fractions in [0, 1]")
    if args.samples < 1:
        raise ValueError(f"--samples {args.samples} must be >= 1")
    if args.model is not None and args.context is None:
        args.context = max(lengths) + args.max_new_tokens  # room for the answer, past the config if needed
    hay_kind = args.haystack if args.haystack in ("builtin", "filler") else "file"
    hay_text = haystack_text(hay_kind, args.haystack if hay_kind == "file" else None)
    scorer = scorer_from_args(args)
    r = run(scorer, test, args.format, lengths, depths, args.samples, args.seed, hay_text, args.choices,
            args.max_new_tokens)
    r.update(model=args.model or args.server, haystack=args.haystack)
    if args.plot:
        heatmap(r, args.plot, f"{test} ({args.format}), {args.model or args.server}: {r['accuracy']:.0%}")
    _write(r, args.output)
    extra = (f"; ranked among {args.choices}: {r['choice_accuracy']:.1%} (chance {1 / args.choices:.0%})"
             if args.choices > 1 else "")
    print(f"{r['model']}: {test} exact retrieval {r['accuracy']:.1%} over {len(r['cases'])} needles{extra}",
          file=sys.stderr)
    return r
