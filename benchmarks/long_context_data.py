"""The data of the context-extension experiment (benchmarks/long_context.py): the built-in corpus, with
key-value retrievals planted in some of its files.

A model learns to use a long context only from text whose later tokens depend on far earlier ones. Python
sources have some (a name defined at the top, used further down) but the `make demo` model, trained for 250
steps, copies nothing yet: it retrieves no key even within its 256 training tokens. So, as long-context
recipes mix synthetic retrieval into their extension data, `--plant F` files get 1 to `--keys` module constants
(`SOME_NAME = 48213`) at random lines, each checked later in the file (`assert SOME_NAME == 48213`). The
evaluation then asks for a key at lengths and depths the model never trained at; the control run trains on the
same data without extending the context, to separate what the extension does from what the planted keys teach.

    python benchmarks/long_context_data.py --out runs/long/extend.jsonl --plant 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import random

from dsv3.data.corpus import builtin_corpus, split

WORDS = ["SECRET", "KEY", "MAGIC", "NUMBER", "PASS", "CODE", "TOKEN", "PORT", "LIMIT", "SEED", "MAX", "MIN",
         "DEFAULT", "BUFFER", "SIZE", "TIMEOUT", "RETRY", "COUNT", "LEVEL", "MODE", "FLAG", "OFFSET", "BASE", "ID"]


def plant(text: str, rng: random.Random, max_keys: int = 4) -> str:
    lines = text.split("\n")
    k = rng.randint(1, max_keys)
    inserts: list[tuple[int, str]] = []
    for _ in range(k):
        name = "_".join(rng.sample(WORDS, rng.randint(1, 3)))
        value = rng.randint(10000, 99999)
        at = rng.randint(0, max(0, len(lines) - 1))
        use = rng.randint(at, len(lines))
        inserts += [(at, f"{name} = {value}"), (use, f"assert {name} == {value}")]
    for at, line in sorted(inserts, key=lambda x: -x[0]):  # from the end, so earlier indices stay valid
        lines.insert(at, line)
    return "\n".join(lines)


PASSKEY_FILLERS = [  # haystacks of the passkey documents: the evaluation's filler, and others like it
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
    "The river is long. The road is wide. The night is dark. On we go. Step by step again. ",
    "A cat sat on a mat. A dog ran in the park. Birds sing in the morning. The day goes on. ",
]


def passkey_document(rng: random.Random, max_chars: int) -> str:
    """A haystack of filler sentences with the pass key sentence at a random depth, the question, and its
    answer: the evaluation's text format, answered (`dsv3 eval passkey`'s prompt plus the key)."""
    filler = rng.choice(PASSKEY_FILLERS)
    n = rng.randint(1, max(1, max_chars // len(filler)))
    depth = rng.randint(0, n)
    value = rng.randint(10000, 99999)
    needle = f"\nThe pass key is {value}. Remember it. {value} is the pass key.\n"
    return filler * depth + needle + filler * (n - depth) + f"\nWhat is the pass key? The pass key is {value}.\n"


def copy_document(rng: random.Random, max_numbers: int) -> str:
    """A list of random 5-digit numbers, then the same list again: every token of the repeat can be predicted
    by finding where it occurred before and copying what followed (what an induction head does, and what
    retrieving a pass key needs), a dense signal that the pass key's few digits are not."""
    numbers = " ".join(str(rng.randint(10000, 99999)) for _ in range(rng.randint(2, max_numbers)))
    return f"numbers: {numbers}\nagain: {numbers}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL to write ({'text': ...} per file)")
    ap.add_argument("--plant", type=float, default=0.5, help="share of files that get planted keys (default 0.5)")
    ap.add_argument("--keys", type=int, default=4, help="most keys planted in one file (default 4; 1 to this many)")
    ap.add_argument("--passkey", type=int, default=0, metavar="N",
                    help="also write N passkey documents (filler, the key at a random depth, the question and its "
                         "answer), up to --passkey-chars characters each")
    ap.add_argument("--passkey-chars", type=int, default=4000)
    ap.add_argument("--copy", type=int, default=0, metavar="N",
                    help="also write N copy documents (random numbers, then the same again), up to --copy-numbers")
    ap.add_argument("--copy-numbers", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    docs = split(builtin_corpus(), 0.02)[0]  # the files `dsv3 train` trains on: its validation split, which the
    planted = 0                              # evaluations score, stays unseen by every stage
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        for d in docs:
            text = d.text
            if rng.random() < args.plant:
                text, planted = plant(text, rng, args.keys), planted + 1
            f.write(json.dumps({"name": d.name, "text": text}) + "\n")
        for i in range(args.copy):
            f.write(json.dumps({"name": f"copy-{i}", "text": copy_document(rng, args.copy_numbers)}) + "\n")
        for i in range(args.passkey):
            f.write(json.dumps({"name": f"passkey-{i}", "text": passkey_document(rng, args.passkey_chars)}) + "\n")
    os.replace(tmp, args.out)
    print(f"{len(docs)} files (the built-in corpus less its validation split), {planted} with planted keys, "
          f"{args.passkey} passkey documents, {args.copy} copy documents -> {args.out}")


if __name__ == "__main__":
    main()
