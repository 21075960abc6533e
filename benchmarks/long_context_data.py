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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL to write ({'text': ...} per file)")
    ap.add_argument("--plant", type=float, default=0.5, help="share of files that get planted keys (default 0.5)")
    ap.add_argument("--keys", type=int, default=4, help="most keys planted in one file (default 4; 1 to this many)")
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
    os.replace(tmp, args.out)
    print(f"{len(docs)} files (the built-in corpus less its validation split), {planted} with planted keys -> {args.out}")


if __name__ == "__main__":
    main()
