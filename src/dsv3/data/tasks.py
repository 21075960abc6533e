"""Built-in tasks with checkable answers, for SFT, R1-style distillation and GRPO on a tiny model: generated
from a seed (nothing to download), each with a reasoning-trace writer (the "teacher") and a verifier.

- `arithmetic`: "What is 347 + 589?" (addition and subtraction; `ops="+-*"` adds multiplication by one
  digit). Difficulty: the operands' number of digits (default 2 to 3).
- `countdown`: make a target from 3-4 small numbers with + - *, each number at most once; the answer is the
  equation, checked by walking its syntax tree (never `eval`). Every target has a solution.

The answer format (DeepSeek-R1's): `<think>\\n...\\n</think>\\n` then `\\boxed{answer}`. `Task.trace` writes
a completion with a short derivation a tiny model can imitate, `Task.answer_only` the same format with an
empty think (the "answers alone" baseline of the distillation experiment), `Task.verify` reads the last box.

A problem belongs to the train or the test split by a hash of its canonical form (347+589 and 589+347 are one
problem), so the splits are disjoint for every n, seed and difficulty.

    dsv3 tasks --task arithmetic --split train -n 5000 --out arith.jsonl --format sft-traces
    dsv3 tasks --task countdown --split test -n 500 --out countdown-test.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .corpus import jsonl_lines

SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # the share of each task's problems that only the test split draws
INSTRUCTION = "Think step by step, then answer in \\boxed{}."  # the same sentence ends every prompt
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_TEXT_BEFORE_BOX = 100  # a well-formed answer may say "The answer is" before its box ...
MAX_TEXT_AFTER_BOX = 16  # ... and end with a period or a closing "$" after it, no more


# ---- the answer format -----------------------------------------------------------------------------------

def format_completion(think: str, answer: str) -> str:
    """The R1 format; an empty `think` gives `<think>\\n</think>\\n\\boxed{answer}`."""
    think = f"{think.strip()}\n" if think.strip() else ""
    return f"{THINK_OPEN}\n{think}{THINK_CLOSE}\n\\boxed{{{answer}}}"


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each complete `\\boxed{...}` (balanced braces), in order. A box still open at
    the end of the text (a truncated completion) is not one."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append((m.start(), i + 1, text[m.end():i]))
                break
    return out


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (nested braces kept: `\\boxed{\\frac{1}{2}}` gives
    `\\frac{1}{2}`), or None."""
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


def split_think(completion: str) -> tuple[str, str] | None:
    """(reasoning, answer part) when the completion opens with exactly one closed `<think>` block (leading
    whitespace allowed) and has no other think tag; else None."""
    text = completion.lstrip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return None
    think, answer = text[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    return think, answer


def is_well_formed(completion: str) -> bool:
    """One `<think>...</think>` block at the start (it may be empty), then exactly one non-empty `\\boxed{}`
    with at most a short phrase before it and a period or so after it."""
    parts = split_think(completion)
    if parts is None:
        return False
    answer = parts[1]
    boxes = _boxes(answer)
    if len(boxes) != 1 or len(re.findall(r"\\boxed", answer)) != 1:  # a second, unclosed box is a hedge too
        return False
    start, end, content = boxes[0]
    return (bool(content.strip()) and len(answer[:start].strip()) <= MAX_TEXT_BEFORE_BOX
            and len(answer[end:].strip()) <= MAX_TEXT_AFTER_BOX)


# ---- comparing answers -----------------------------------------------------------------------------------

_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # 1,234,567.5: commas only as thousands separators
_RATIO = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_MAX_EXPONENT = 100  # "1e999999999" is text, not a number a billion digits long


def _strip_decoration(s: str) -> str:
    s = s.strip()
    while len(s) > 1 and s[0] == s[-1] == "$":  # $...$ and $$...$$
        s = s[1:-1].strip()
    return s.rstrip(".").strip()


def parse_number(s: str) -> Fraction | None:
    """`s` as an exact number, or None: integers and decimals (a leading +, thousands commas, an exponent
    up to 1e100, the Unicode minus sign "−" all read), `a/b` and `\\frac{a}{b}`."""
    t = _strip_decoration(s).replace("\u2212", "-")
    if _GROUPED.fullmatch(t):
        t = t.replace(",", "")
    if m := _DECIMAL.fullmatch(t):
        if m.group(1) is not None and abs(int(m.group(1))) > _MAX_EXPONENT:
            return None
        try:
            return Fraction(Decimal(t))
        except (InvalidOperation, ValueError):
            return None
    if (m := _RATIO.fullmatch(t)) and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    if (m := _FRAC.fullmatch(t)) and int(m.group(3)) != 0:
        return Fraction(int(m.group(1) + m.group(2)), int(m.group(3)))
    return None


def _format_number(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # a terminating decimal: 0.25, not 1/4
        return format(Decimal(x.numerator) / Decimal(x.denominator), "f")
    return f"{x.numerator}/{x.denominator}"


def normalize_answer(s: str) -> str:
    """A number in one canonical spelling ("1,234.0" -> "1234", "+0.50" -> "0.5", "2/4" -> "0.5"); other text
    whitespace-collapsed and lowercased, with surrounding `$` and a trailing period removed."""
    x = parse_number(s)
    if x is not None:
        return _format_number(x)
    return " ".join(_strip_decoration(s).split()).lower()


def answers_match(pred: str | None, gold: str) -> bool:
    """Equal as numbers when both read as numbers (so 3.0 matches 3, and "−5" matches "-5"), else equal
    after `normalize_answer`. No prediction (None) matches nothing."""
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(str(gold))
    if a is not None and b is not None:
        return a == b
    return normalize_answer(pred) == normalize_answer(str(gold))


# ---- countdown equations, checked without eval ----------------------------------------------------------

_EQUATION_CHARS = set("0123456789+-*() ")
_MAX_EQUATION = 200  # characters: a 4-number equation is far shorter
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _plain(expr: str) -> str:
    return expr.replace("\u2212", "-").replace("\u00d7", "*").strip()  # the Unicode minus and times signs


def eval_equation(expr: str) -> tuple[int, list[int]]:
    """(value, the numbers it uses) of an equation of non-negative integers, + - * and parentheses. Anything
    else (names, calls, powers, division, unary minus, floats, hex) raises ValueError saying what."""
    s = _plain(expr)
    if len(s) > _MAX_EQUATION:
        raise ValueError(f"equation of {len(s)} characters (at most {_MAX_EQUATION})")
    if bad := sorted(set(s) - _EQUATION_CHARS):
        raise ValueError(f"characters {''.join(bad)!r} are not allowed (only digits, + - * and parentheses)")
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an equation: {s!r} ({type(e).__name__})") from None
    used: list[int] = []

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _apply(_OPS[type(node.op)], value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return node.value
        what = type(node.op).__name__ if isinstance(node, ast.BinOp) else type(node).__name__
        raise ValueError(f"{what} is not allowed in an equation (only + - * on the given numbers)")

    return value(tree.body), used


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def check_countdown(answer: str | None, numbers: list[int], target: int) -> bool:
    """The equation (optionally written `... = target`) evaluates to `target` and uses each of `numbers` at
    most once (a number given twice may be used twice)."""
    if answer is None:
        return False
    lhs, eq, rhs = answer.partition("=")
    if eq:
        try:
            if int(rhs.strip()) != target:
                return False
        except ValueError:
            return False
    try:
        got, used = eval_equation(lhs)
    except ValueError:
        return False
    return got == target and not Counter(used) - Counter(numbers)


def _show(tree) -> str:
    """An equation from a tree of ints and (op, left, right), with only the parentheses it needs."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    prec = 2 if op == "*" else 1
    ls, rs = _show(left), _show(right)
    if not isinstance(left, int) and (2 if left[0] == "*" else 1) < prec:
        ls = f"({ls})"
    if not isinstance(right, int) and ((2 if right[0] == "*" else 1) < prec or (op == "-" and right[0] != "*")):
        rs = f"({rs})"
    return f"{ls}{op}{rs}"


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An equation for `target` using the fewest of `numbers` (deterministic), or None. Intermediate values
    stay positive, as in the game; the search combines two values at a time (at most 4 numbers: ~1000 nodes)."""
    if target in numbers:
        return str(target)

    def search(items: list, steps: int):
        if steps == 0:
            return None
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (a, ta), (b, tb) = items[i], items[j]
                if a < b:
                    (a, ta), (b, tb) = (b, tb), (a, ta)
                rest = items[:i] + items[i + 1:j] + items[j + 1:]
                for op in "+*-":
                    if (op == "-" and a == b) or (op == "*" and b == 1):
                        continue  # 0 and x*1 never shorten a solution
                    v = _apply(op, a, b)
                    if v == target:
                        return (op, ta, tb)
                    found = search(rest + [(v, (op, ta, tb))], steps - 1)
                    if found is not None:
                        return found
        return None

    items = [(x, x) for x in numbers]
    for steps in range(1, len(numbers)):  # iterative deepening: the first found uses the fewest numbers
        found = search(items, steps)
        if found is not None:
            return _show(found)
    return None


def equation_steps(expr: str) -> list[str]:
    """The equation's operations innermost first, as `a op b=value` lines ("7*6+3" -> ["7*6=42", "42+3=45"])."""
    eval_equation(expr)  # refuses anything that is not a plain + - * equation before walking it
    tree = ast.parse(_plain(expr), mode="eval").body
    lines: list[str] = []

    def walk(node) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        a, b = walk(node.left), walk(node.right)
        op = _OPS[type(node.op)]
        v = _apply(op, a, b)
        lines.append(f"{a}{op}{b}={v}")
        return v

    walk(tree)
    return lines


# ---- records ---------------------------------------------------------------------------------------------

def record_kind(record: dict) -> str:
    """The record's kind: "code" (has "tests"), "countdown" (has "numbers" and "target") or "math" (has
    "answer"). A countdown record's "answer" is one solution, not the only one, so "numbers" decide first."""
    if "tests" in record:
        return "code"
    if "numbers" in record and "target" in record:
        return "countdown"
    if "answer" in record:
        return "math"
    raise ValueError(f"a record needs 'answer', 'tests' or 'numbers' and 'target'; this one has {sorted(record)}")


def verify(completion: str, record: dict) -> bool:
    """The completion's last box answers a math or countdown record (format not checked: see is_well_formed)."""
    kind = record_kind(record)
    if kind == "code":
        raise ValueError("code records are checked by running their tests (dsv3.train.sandbox.code_reward)")
    if kind == "countdown":
        return check_countdown(extract_boxed(completion), record["numbers"], record["target"])
    return answers_match(extract_boxed(completion), str(record["answer"]))


def to_messages(record: dict) -> list[dict]:
    """The chat a record's prompt is: its "messages", or one user turn holding its "prompt"."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    return [{"role": "user", "content": record["prompt"]}]


def write_jsonl(records: list[dict], path: str | os.PathLike) -> None:
    """One JSON object a line, written atomically (a kill leaves the old file or the new one)."""
    from ..ckpt.io import atomic_write_text
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def load_records(path: str | os.PathLike) -> list[dict]:
    """User prompt records from JSONL: "prompt" (str) or "messages" (a chat ending in a user turn), and
    "answer" (a math answer, str or number), "tests" (code: a list of test source strings), or "numbers" and
    "target" (countdown, as `dsv3 tasks` writes it). Other fields are kept. Blank lines are skipped; a bad
    line raises ValueError naming `path:line`."""
    records = []
    for where, rec in jsonl_lines(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: each line must be a JSON object, not {type(rec).__name__}")
        records.append(_check_record(rec, where))
    if not records:
        raise ValueError(f"{os.fspath(path)}: no records (expected JSONL, one object a line)")
    return records


def _check_record(rec: dict, where: str) -> dict:
    if ("prompt" in rec) == ("messages" in rec):
        raise ValueError(f"{where}: needs exactly one of 'prompt' (a string) or 'messages' (a chat); "
                         f"has {sorted(rec)}")
    if "prompt" in rec and not (isinstance(rec["prompt"], str) and rec["prompt"].strip()):
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, not {rec['prompt']!r}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for k, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: messages[{k}] must be {{\"role\": system|user|assistant, \"content\": "
                                 f"str}}, not {m!r}")
        if msgs[-1]["role"] != "user":
            raise ValueError(f"{where}: the last message must be the user's (the model writes the reply), "
                             f"not {msgs[-1]['role']!r}")
    has_answer, has_tests = "answer" in rec, "tests" in rec
    has_countdown = "numbers" in rec and "target" in rec
    if has_tests and (has_answer or has_countdown):
        raise ValueError(f"{where}: has both 'tests' (code) and an answer; give one")
    if has_tests:
        tests = rec["tests"]
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise ValueError(f"{where}: 'tests' must be a non-empty list of strings (test code)")
    elif has_countdown:
        nums, target = rec["numbers"], rec["target"]
        if not (isinstance(nums, list) and nums and all(type(x) is int and x >= 0 for x in nums)):
            raise ValueError(f"{where}: 'numbers' must be a non-empty list of non-negative integers, not {nums!r}")
        if type(target) is not int:
            raise ValueError(f"{where}: 'target' must be an integer, not {target!r}")
    elif has_answer:
        a = rec["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
            raise ValueError(f"{where}: 'answer' must be a non-empty string or a number, not {a!r}")
        rec["answer"] = str(a)
    else:
        raise ValueError(f"{where}: needs 'answer' (math), 'tests' (code) or 'numbers' and 'target' (countdown); "
                         f"has {sorted(rec)}")
    return rec


# ---- tasks -----------------------------------------------------------------------------------------------

def _in_test_split(key: str) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h % 10_000 < TEST_FRACTION * 10_000


class Task:
    """A generator of problems with checkable answers. Subclasses define `draw`, `trace` and `verify`."""

    name = ""

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        """One random problem: (its canonical key, which decides its split; its record)."""
        raise NotImplementedError

    def trace(self, record: dict) -> str:
        """The full completion: a step-by-step derivation in `<think>`, then `\\boxed{answer}`."""
        raise NotImplementedError

    def verify(self, completion: str, record: dict) -> bool:
        """The answer in the completion's last box is correct (format not checked)."""
        return verify(completion, record)

    def answer_only(self, record: dict) -> str:
        """The completion without reasoning: `<think>\\n</think>\\n\\boxed{answer}`."""
        return format_completion("", record["answer"])

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """`n` distinct problems of `split` ("train" or "test"), the same for the same (split, n, seed)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        rng = random.Random(f"{self.name}:{split}:{seed}")  # a str seed hashes the same in every process
        want_test = split == "test"
        seen: set[str] = set()
        out = []
        draws, max_draws = 0, 200 * n + 10_000
        while len(out) < n:
            draws += 1
            if draws > max_draws:
                raise ValueError(f"{self.name}: found only {len(out)} distinct {split} problems in {max_draws} "
                                 f"draws (asked for {n}); ask for fewer or make the problems harder")
            key, rec = self.draw(rng)
            if key in seen or _in_test_split(key) != want_test:
                continue
            seen.add(key)
            out.append(rec)
        return out


_ARITH_PROMPT = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


@dataclass(frozen=True)
class Arithmetic(Task):
    """Addition and subtraction of numbers of `digits` (min, max) digits; "*" in `ops` adds a multi-digit
    number times one digit (2-9). Subtraction results may be negative."""

    digits: tuple[int, int] = (2, 3)
    ops: str = "+-"
    name = "arithmetic"

    def __post_init__(self):
        lo, hi = self.digits
        if not 1 <= lo <= hi <= 18:
            raise ValueError(f"digits={self.digits}: need 1 <= min <= max <= 18")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops={self.ops!r}: a non-empty selection of '+', '-', '*'")

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        def number() -> int:
            d = rng.randint(*self.digits)
            return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

        op = rng.choice(self.ops)
        a = number()
        b = rng.randint(2, 9) if op == "*" else number()
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        # a + b and b + a are one problem, so they never straddle the splits
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        return key, {"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "answer": str(answer)}

    @staticmethod
    def parse(record: dict) -> tuple[int, str, int]:
        m = _ARITH_PROMPT.match(record["prompt"])
        if not m:
            raise ValueError(f"not an arithmetic prompt (expected 'What is A op B?'): {record['prompt']!r}")
        return int(m.group(1)), m.group(2), int(m.group(3))

    def trace(self, record: dict) -> str:
        """Column by column from the right, one line per column, the carry (borrow) in as the third term:
        `7+9+0=16` (digit 6, carry 1); `3-8-0=-5=5-10` (digit 5, borrow 1); `7*6+4=46`. Subtraction with
        the larger number second is first turned round: `347<589 so -(589-347)`. The box reads the digits
        off the lines bottom to top (no line restating the sum: it would cost ~12 of the ~100 tokens)."""
        a, op, b = self.parse(record)
        lines = []
        x, y, sign = a, b, ""
        if op == "-" and a < b:
            lines.append(f"{a}<{b} so -({b}-{a})")
            x, y, sign = b, a, "-"
        xs = str(x)[::-1]
        if op == "*":
            carry = 0
            for dx in xs:
                v = int(dx) * y + carry
                lines.append(f"{dx}*{y}+{carry}={v}")
                carry = v // 10
        else:
            ys = str(y)[::-1]
            carry = 0
            for k in range(max(len(xs), len(ys))):
                dx = int(xs[k]) if k < len(xs) else 0
                dy = int(ys[k]) if k < len(ys) else 0
                if op == "+":
                    v = dx + dy + carry
                    lines.append(f"{dx}+{dy}+{carry}={v}")
                    carry = v // 10
                else:
                    v = dx - dy - carry
                    lines.append(f"{dx}-{dy}-{carry}={v}" + (f"={v + 10}-10" if v < 0 else ""))
                    carry = int(v < 0)
        result = _apply(op, x, y)
        answer = f"{sign}{result}" if result else "0"
        assert answer == record["answer"], f"{record=} {answer=}"
        return format_completion("\n".join(lines), answer)


@dataclass(frozen=True)
class Countdown(Task):
    """Make `target` from `count` (min, max) numbers in 1..`max_number` with + - *, each number at most once.
    Targets lie in [10, `max_target`], are none of the numbers, and are built from the numbers, so each has a
    solution; the record's "answer" is one using the fewest numbers."""

    count: tuple[int, int] = (3, 4)
    max_number: int = 10
    max_target: int = 100
    name = "countdown"

    def __post_init__(self):
        lo, hi = self.count
        if not 2 <= lo <= hi <= 5:
            raise ValueError(f"count={self.count}: need 2 <= min <= max <= 5 numbers (the solver is exhaustive)")
        if self.max_number < 2 or self.max_target < 10:
            raise ValueError(f"max_number={self.max_number} (>= 2), max_target={self.max_target} (>= 10)")

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.count))]
            # a random equation over a random subset of 2 or more numbers, its intermediates positive
            pool = rng.sample(numbers, rng.randint(2, len(numbers)))
            while len(pool) > 1:
                a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
                a, b = max(a, b), min(a, b)
                op = rng.choice("+-*" if a > b else "+*")
                pool.append(_apply(op, a, b))
            target = pool[0]
            if 10 <= target <= self.max_target and target not in numbers:
                break
        answer = solve_countdown(numbers, target)
        assert answer is not None, f"{numbers=} {target=}"
        prompt = (f"Use {', '.join(map(str, numbers))} to make {target} with + - *, each number at most once. "
                  f"{INSTRUCTION}")
        key = f"{sorted(numbers)}->{target}"
        return key, {"prompt": prompt, "answer": answer, "numbers": numbers, "target": target}

    def trace(self, record: dict) -> str:
        """One line per operation of a solution, innermost first (`7*6=42`, `42+3=45`), then the equation."""
        answer = record.get("answer") or solve_countdown(record["numbers"], record["target"])
        if answer is None:
            raise ValueError(f"no solution: {record['numbers']} -> {record['target']}")
        return format_completion("\n".join(equation_steps(answer)), answer)


TASKS: dict[str, Task] = {"arithmetic": Arithmetic(), "countdown": Countdown()}


# ---- `dsv3 tasks` ----------------------------------------------------------------------------------------

FORMATS = ("prompts", "sft-traces", "sft-answers")


def add_args(p: argparse.ArgumentParser) -> None:
    p.description = p.description or (
        "Write problems of a built-in task as JSONL. --format prompts: records {prompt, answer, ...} for GRPO "
        "and evaluation (countdown also has numbers and target). sft-traces: chats {messages: [user, assistant]} "
        "whose reply reasons step by step in <think> and ends in \\boxed{answer}; sft-answers: the same reply "
        "with an empty <think> (the answers-alone baseline). The test split never holds a train problem.")
    p.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="arithmetic: 'What is 347 + 589?'; countdown: make a target from 3-4 numbers with + - *")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help=f"train, or test: the {TEST_FRACTION * 100:.0f}%% of problems held out (default train)")
    p.add_argument("-n", type=int, default=1000, help="number of records (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same records (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    p.add_argument("--format", default="prompts", choices=FORMATS, help="what each line holds (default prompts)")
    p.add_argument("--digits", type=int, default=None, metavar="N",
                   help="arithmetic: digits of each operand (default: 2 or 3); the difficulty knob")
    p.add_argument("--ops", default=None, metavar="OPS",
                   help="arithmetic: operations, a selection of '+-*' ('*' is times one digit; default '+-')")
    p.add_argument("--numbers", type=int, default=None, metavar="N",
                   help="countdown: how many numbers are given (default: 3 or 4); the difficulty knob")


def make_task(name: str, digits: int | None = None, ops: str | None = None, numbers: int | None = None) -> Task:
    """A built-in task, its difficulty changed by the options that apply to it (others raise ValueError)."""
    if name not in TASKS:
        raise ValueError(f"task {name!r}: choose from {', '.join(sorted(TASKS))}")
    task = TASKS[name]
    if isinstance(task, Arithmetic):
        if numbers is not None:
            raise ValueError("--numbers is a countdown option; arithmetic's difficulty is --digits")
        if digits is not None:
            task = replace(task, digits=(digits, digits))
        return replace(task, ops=ops) if ops is not None else task
    if digits is not None or ops is not None:
        raise ValueError("--digits and --ops are arithmetic options; countdown's difficulty is --numbers")
    return replace(task, count=(numbers, numbers)) if numbers is not None else task


def main(args: argparse.Namespace) -> dict:
    task = make_task(args.task, args.digits, args.ops, args.numbers)
    records = task.records(args.split, args.n, args.seed)
    replies = [task.answer_only(r) if args.format == "sft-answers" else task.trace(r) for r in records]
    if args.format == "prompts":
        rows = records
    else:
        rows = [{"messages": to_messages(r) + [{"role": "assistant", "content": c}]} for r, c in zip(records, replies)]
    write_jsonl(rows, args.out)
    chars = [len(r["prompt"]) + len(c) for r, c in zip(records, replies)]  # with prompts: as sft-traces would be
    result = {"task": args.task, "split": args.split, "n": len(rows), "seed": args.seed, "format": args.format,
              "out": args.out, "mean_chars": sum(chars) / max(1, len(chars)), "max_chars": max(chars, default=0)}
    print(f"wrote {len(rows)} {args.task} {args.split} records ({args.format}) to {args.out}; prompt+reply "
          f"{result['mean_chars']:.0f} characters on average, at most {result['max_chars']}")
    return result
