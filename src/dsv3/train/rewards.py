"""Rule-based rewards for GRPO (DeepSeek-R1 §2.2.2: accuracy and format rewards, no neural reward model),
plus DAPO's soft overlong punishment (Yu et al. 2025, §3.4).

A reward function is `fn(completions, records, **kw) -> list[float]`, one float per completion, where
`records[i]` is the prompt record (data/tasks.py) that completion i answers. `kw` may carry
`completion_ids` (list[list[int]], the completions' tokens); functions ignore what they do not use. Each
record is judged by its own kind, so one batch may mix them:

- math (`"answer"`): the last `\\boxed{}` compared with the answer (`answers_match`);
- countdown (`"numbers"`, `"target"`): the boxed equation reaches the target with the given numbers;
- code (`"tests"`): the fenced code block after `</think>` run against the tests in the sandbox.

Accuracy needs the format too: a correct answer outside the R1 format (one `<think>` block at the start,
then the box, or for code a fenced block) earns 0, so the policy cannot drift out of the format GRPO reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..data.tasks import is_well_formed, record_kind, split_think, verify

RewardFn = Callable[..., list[float]]
_FENCED = re.compile(r"```[^\n`]*\n.*?```", re.DOTALL)  # ```python\n...``` (the language tag optional)


def is_well_formed_code(completion: str) -> bool:
    """One `<think>` block at the start, then a complete fenced code block."""
    parts = split_think(completion)
    return parts is not None and _FENCED.search(parts[1]) is not None


def _check(completions: list[str], records: list[dict]) -> None:
    if len(completions) != len(records):
        raise ValueError(f"{len(completions)} completions but {len(records)} records: one record per completion")


def accuracy_reward(completions: list[str], records: list[dict], code_limits: dict | None = None,
                    **kw) -> list[float]:
    """1.0 for a well-formed, correct completion, else 0.0; for a well-formed code completion, the score
    `dsv3.train.sandbox.code_reward` gives its tests. `code_limits` are passed on to `code_reward`."""
    _check(completions, records)
    out = [0.0] * len(completions)
    code = []  # (index, the answer part) of well-formed code completions: run in one sandbox batch
    for i, (c, r) in enumerate(zip(completions, records)):
        if record_kind(r) == "code":
            if is_well_formed_code(c):
                code.append((i, split_think(c)[1]))  # code in the reasoning is not the answer
        elif is_well_formed(c) and verify(c, r):
            out[i] = 1.0
    if code:
        from .sandbox import code_reward  # only code records need the sandbox
        scores = code_reward([a for _, a in code], [records[i]["tests"] for i, _ in code], **(code_limits or {}))
        for (i, _), s in zip(code, scores):
            out[i] = float(s)
    return out


def format_reward(completions: list[str], records: list[dict], **kw) -> list[float]:
    """1.0 when the completion has the R1 format (`is_well_formed`; code: `is_well_formed_code`), else 0.0."""
    _check(completions, records)
    return [float(is_well_formed_code(c) if record_kind(r) == "code" else is_well_formed(c))
            for c, r in zip(completions, records)]


def length_penalty(max_len: int, cache: int) -> RewardFn:
    """DAPO's soft overlong punishment on the completion's token count L: 0 while L <= max_len - cache,
    then falling linearly to -1 at max_len, and -1 beyond. The function needs `completion_ids=`."""
    if not 0 <= cache <= max_len or max_len <= 0:
        raise ValueError(f"length penalty: need 0 <= cache <= max_len and max_len > 0; got {max_len=} {cache=}")
    free = max_len - cache

    def length_reward(completions: list[str], records: list[dict], completion_ids: list[list[int]] | None = None,
                      **kw) -> list[float]:
        if completion_ids is None:
            raise ValueError("the length penalty counts tokens: call it with completion_ids=[[token ids], ...]")
        if len(completion_ids) != len(completions):
            raise ValueError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= free else -1.0 if n >= max_len else (free - n) / cache)
        return out

    return length_reward


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}
CHOICES = (*REWARDS, "length")


def reward_functions(names: list[str], max_len: int | None = None,
                     length_cache: int | None = None) -> list[tuple[str, RewardFn]]:
    """(name, fn) for each name in `names`, in order; "length" is built from `max_len` and `length_cache`."""
    out = []
    for name in names:
        if name not in CHOICES:
            raise ValueError(f"unknown reward {name!r}: choose from {', '.join(CHOICES)}")
        if name in dict(out):
            raise ValueError(f"reward {name!r} is named twice")
        if name == "length":
            if max_len is None or length_cache is None:
                raise ValueError(f"the length reward needs max_len and length_cache; got {max_len=} {length_cache=}")
            out.append((name, length_penalty(max_len, length_cache)))
        else:
            out.append((name, REWARDS[name]))
    return out


def combine(rewards: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """sum over names of weights[name] * rewards[name][i], per completion i. A reward without a weight
    counts once (weight 1); a weight for a reward not given is refused (a misspelt name would silently
    count for nothing)."""
    if extra := sorted(set(weights) - set(rewards)):
        raise ValueError(f"weights for {extra}, which are not among the rewards {sorted(rewards)}")
    if not rewards:
        raise ValueError("no rewards to combine")
    lengths = {name: len(v) for name, v in rewards.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"rewards of different lengths: {lengths}")
    n = next(iter(lengths.values()))
    return [sum(weights.get(name, 1.0) * v[i] for name, v in rewards.items()) for i in range(n)]
