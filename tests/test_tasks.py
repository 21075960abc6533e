"""Built-in tasks: deterministic, train and test disjoint, traces that verify, and the answer checks (boxes,
numbers, countdown equations) refusing what they should."""

from __future__ import annotations

import argparse
import json

import pytest

from dsv3.data.tasks import (TASKS, Arithmetic, _show, Countdown, answers_match, check_countdown, equation_steps,
                             eval_equation, extract_boxed, is_well_formed, load_records, main, add_args, make_task,
                             normalize_answer, solve_countdown, to_messages, write_jsonl)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_records_are_deterministic_per_seed(name):
    task = TASKS[name]
    a = task.records("train", 200, seed=3)
    assert a == task.records("train", 200, seed=3)
    assert a != task.records("train", 200, seed=4)
    assert a[:50] == task.records("train", 50, seed=3)  # a longer list extends a shorter one
    assert len({r["prompt"] for r in a}) == len(a)  # distinct problems
    assert all(set(r) >= {"prompt", "answer"} for r in a)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_test_are_disjoint(name):
    task = TASKS[name]
    key = _arith_key if name == "arithmetic" else _countdown_key
    train = {key(r) for seed in (0, 1) for r in task.records("train", 2000, seed)}
    test = {key(r) for seed in (0, 1) for r in task.records("test", 500, seed)}
    assert len(test) > 300 and not train & test


def _arith_key(r):
    a, op, b = Arithmetic.parse(r)
    return (op, *sorted((a, b))) if op in "+*" else (op, a, b)  # 3+5 and 5+3 are one problem


def _countdown_key(r):
    return tuple(sorted(r["numbers"])), r["target"]


def test_difficulty_changes_the_problems_not_the_split():
    hard = make_task("arithmetic", digits=4)
    for r in hard.records("test", 100, 0):
        a, _, b = Arithmetic.parse(r)
        assert 1000 <= a <= 9999 and 1000 <= b <= 9999
    easy = make_task("arithmetic", digits=1)  # a problem is in one split whatever the difficulty that drew it
    small = {_arith_key(r) for r in easy.records("test", 10, 0)}
    assert not small & {_arith_key(r) for r in Arithmetic(digits=(1, 2)).records("train", 2000, 0)}
    with pytest.raises(ValueError, match="distinct test problems"):
        easy.records("test", 500, 0)  # there are not that many one-digit problems
    assert all(len(r["numbers"]) == 4 for r in make_task("countdown", numbers=4).records("train", 50, 0))
    with pytest.raises(ValueError, match="countdown option"):
        make_task("arithmetic", numbers=3)
    with pytest.raises(ValueError, match="digits"):
        Arithmetic(digits=(3, 2))


@pytest.mark.parametrize("task", [TASKS["arithmetic"], Arithmetic(digits=(1, 5), ops="+-*"), TASKS["countdown"],
                                  Countdown(count=(2, 5))], ids=["arith", "arith-hard", "countdown", "countdown-2-5"])
def test_traces_and_answers_alone_verify(task):
    for r in task.records("train", 400, seed=1):
        for completion in (task.trace(r), task.answer_only(r)):
            assert is_well_formed(completion), completion
            assert task.verify(completion, r), (r, completion)
        assert task.answer_only(r) == f"<think>\n</think>\n\\boxed{{{r['answer']}}}"


def test_arithmetic_traces():
    t = TASKS["arithmetic"]
    rec = lambda a, op, b, ans: {"prompt": f"What is {a} {op} {b}? x", "answer": str(ans)}  # noqa: E731
    assert t.trace(rec(347, "+", 589, 936)) == (
        "<think>\n7+9+0=16\n4+8+1=13\n3+5+1=9\n</think>\n\\boxed{936}")
    assert t.trace(rec(523, "-", 178, 345)) == (
        "<think>\n3-8-0=-5=5-10\n2-7-1=-6=4-10\n5-1-1=3\n</think>\n\\boxed{345}")
    assert t.trace(rec(58, "-", 347, -289)).startswith("<think>\n58<347 so -(347-58)\n")
    assert t.trace(rec(58, "-", 347, -289)).endswith("3-0-1=2\n</think>\n\\boxed{-289}")
    assert t.trace(rec(347, "*", 6, 2082)) == (
        "<think>\n7*6+0=42\n4*6+4=28\n3*6+2=20\n</think>\n\\boxed{2082}")
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        t.trace({"prompt": "Compute 3+4", "answer": "7"})


def test_prompts_and_traces_are_short():
    """The tiny model trains on sequences well under 128 tokens: prompt + trace under 300 characters."""
    for name, limit in (("arithmetic", 300), ("countdown", 300)):
        task = TASKS[name]
        lengths = [len(r["prompt"]) + len(task.trace(r)) for r in task.records("train", 300, 0)]
        assert max(lengths) < limit, (name, max(lengths))
    r = TASKS["arithmetic"].records("train", 1, 0)[0]
    assert r["prompt"].endswith("? Think step by step, then answer in \\boxed{}.")


def test_countdown_records_have_solutions():
    for r in TASKS["countdown"].records("test", 300, 0):
        assert 10 <= r["target"] <= 100 and r["target"] not in r["numbers"]
        assert check_countdown(r["answer"], r["numbers"], r["target"])
        assert str(r["target"]) in r["prompt"] and all(str(x) in r["prompt"] for x in r["numbers"])
    assert solve_countdown([3, 7, 6, 25], 45) == "7*6+3"  # the fewest numbers
    assert solve_countdown([2, 3], 7) is None
    assert solve_countdown([2, 3, 4], 2) == "2"
    assert equation_steps("(10-4)*(2+3)") == ["10-4=6", "2+3=5", "6*5=30"]
    assert equation_steps("7\u00d76\u22123") == ["7*6=42", "42-3=39"]
    trace = TASKS["countdown"].trace({"numbers": [3, 7, 6, 25], "target": 45})  # no answer: it solves
    assert trace == "<think>\n7*6=42\n42+3=45\n</think>\n\\boxed{7*6+3}"


def test_countdown_solver_prints_the_parentheses_it_needs():
    for numbers, target in (([10, 3, 2], 14), ([9, 5, 4, 2], 1), ([8, 5, 3, 2], 18), ([9, 7, 3, 2], 30)):
        eq = solve_countdown(numbers, target)
        assert eq is not None and check_countdown(eq, numbers, target), (numbers, target, eq)
    assert solve_countdown([10, 9, 2, 3], 95) == "(10+9)*(3+2)"
    assert _show(("-", 10, ("-", 3, 2))) == "10-(3-2)"
    assert _show(("-", ("-", 10, 3), ("*", 2, 2))) == "10-3-2*2"
    assert _show(("*", ("+", 1, 2), ("*", 3, 4))) == "(1+2)*3*4"


def test_countdown_check_refuses_what_it_should():
    nums = [3, 7, 6, 25]
    assert check_countdown("7*6+3", nums, 45)
    assert check_countdown(" (7 * 6) + 3 ", nums, 45)
    assert check_countdown("7*6+3=45", nums, 45)  # the equation may be written with its result
    assert check_countdown("7×6+3", nums, 45)
    assert not check_countdown("7*6+3=46", nums, 45)
    assert not check_countdown("7*6+3", nums, 46)  # wrong target
    assert not check_countdown("7*7-4", nums, 45)  # 7 used twice, 4 not given
    assert not check_countdown("6*7+3+3-3", nums, 45)  # 3 used three times
    assert check_countdown("5*5", [5, 5, 1], 25)  # a number given twice may be used twice
    assert not check_countdown(None, nums, 45)
    assert not check_countdown("", nums, 45)
    for bad in ("__import__('os').system('true')", "x*6+3", "abs(45)", "3**2", "9**9**9**9", "25+7*6//3",
                "7*6+3.0", "-3+48", "0x2d", "1_5*3", "(7,6)", "[45]", "7*6+3;3", "(" * 300 + "45" + ")" * 300):
        with pytest.raises(ValueError):
            eval_equation(bad)
        assert not check_countdown(bad, nums + [9, 2, 45, 15, 48, 0], 45), bad
    with pytest.raises(ValueError, match="Pow is not allowed"):
        eval_equation("3**2")


def test_extract_boxed():
    assert extract_boxed("\\boxed{5}") == "5"
    assert extract_boxed("a \\boxed{1} then \\boxed{2}.") == "2"  # the last one
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # nested braces
    assert extract_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{3} and \\boxed{4") == "3"  # an unclosed (truncated) box is not a box
    assert extract_boxed("\\boxed{}") == ""


def test_answers_match_and_normalize():
    for pred, gold in (("1,234", "1234"), (" 1234 ", "1234"), ("1234.0", "1234"), ("+5", "5"), ("3.0", "3"),
                       ("\u22125", "-5"), ("$42$", "42"), ("42.", "42"), ("0.50", "1/2"), ("\\frac{1}{2}", "0.5"),
                       ("1e3", "1000"), ("Paris", " paris. "), ("x  +  1", "X + 1")):
        assert answers_match(pred, gold), (pred, gold)
    for pred, gold in (("1,23", "123"), ("1235", "1234"), ("-5", "5"), ("five", "5"), (None, "5"), ("", "0"),
                       ("1e999999999", "1")):
        assert not answers_match(pred, gold), (pred, gold)
    assert normalize_answer("1,234.50") == "1234.5"
    assert normalize_answer("2/6") == "1/3"
    assert normalize_answer("  The  Answer. ") == "the answer"
    assert normalize_answer("$x$") == "x"


def test_is_well_formed():
    ok = ("<think>\nstep\n</think>\n\\boxed{5}", "<think>\n</think>\n\\boxed{5}", "  <think>a</think>\\boxed{5}.",
          "<think>\nx \\boxed{4}\n</think>\nThe answer is \\boxed{5}.")
    bad = ("\\boxed{5}", "<think>\nstep\n\\boxed{5}", "<think>a</think><think>b</think>\\boxed{5}",
           "intro <think>a</think>\\boxed{5}", "<think>a</think>\n\\boxed{4} or \\boxed{5}",
           "<think>a</think>\n\\boxed{}", "<think>a</think>\n\\boxed{5", "<think>a</think>\n\\boxed{5} " + "x" * 40,
           "<think>a</think>\n" + "y" * 200 + "\\boxed{5}", "<think>a</think>\\boxed{5}</think>")
    assert all(is_well_formed(c) for c in ok)
    assert not any(is_well_formed(c) for c in bad), [c for c in bad if is_well_formed(c)]


def test_load_records(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "What is 2 + 2?", "answer": 4}\n\n'
                    '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], '
                    '"answer": "x", "id": 7}\n'
                    '{"prompt": "Write f", "tests": ["assert f() == 1"]}\n'
                    '{"prompt": "p", "answer": "7*6+3", "numbers": [3, 7, 6], "target": 45}\n')
    recs = load_records(good)
    assert [r.get("answer") for r in recs] == ["4", "x", None, "7*6+3"]  # a numeric answer becomes a string
    assert recs[1]["id"] == 7
    assert to_messages(recs[0]) == [{"role": "user", "content": "What is 2 + 2?"}]
    assert to_messages(recs[1])[-1] == {"role": "user", "content": "q"}
    cases = {
        '{"prompt": "p"': "not valid JSON",
        '["p", "4"]': "must be a JSON object",
        '{"answer": "4"}': "exactly one of 'prompt'",
        '{"prompt": "p", "messages": [], "answer": "4"}': "exactly one of 'prompt'",
        '{"prompt": "", "answer": "4"}': "non-empty string",
        '{"prompt": "p"}': "needs 'answer'",
        '{"prompt": "p", "answer": null}': "'answer' must be",
        '{"prompt": "p", "tests": "assert 1"}': "'tests' must be a non-empty list",
        '{"prompt": "p", "tests": ["a"], "answer": "1"}': "both 'tests'",
        '{"messages": [{"role": "user"}], "answer": "4"}': r"messages\[0\]",
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "4"}':
            "last message must be the user's",
        '{"prompt": "p", "numbers": [1, "2"], "target": 3}': "'numbers' must be",
    }
    for line, why in cases.items():
        f = tmp_path / "bad.jsonl"
        f.write_text('{"prompt": "fine", "answer": "1"}\n\n' + line + "\n")
        with pytest.raises(ValueError, match=why) as e:
            load_records(f)
        assert f"{f}:3:" in str(e.value)  # the blank line counts: the line number is the file's
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_records(tmp_path / "empty.jsonl")


def test_write_jsonl_round_trips(tmp_path):
    recs = TASKS["countdown"].records("train", 20, 0)
    write_jsonl(recs, tmp_path / "c.jsonl")
    assert load_records(tmp_path / "c.jsonl") == recs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_command_line(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_args(p)
    help_text = " ".join(p.format_help().split())
    assert "--digits N" in help_text and "10% of problems held out" in help_text
    out = tmp_path / "sft.jsonl"
    result = main(p.parse_args(["--task", "arithmetic", "-n", "30", "--out", str(out), "--format", "sft-traces",
                                "--digits", "2", "--ops", "+-*"]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 == result["n"] and result["max_chars"] < 300
    task = make_task("arithmetic", digits=2, ops="+-*")
    recs = task.records("train", 30, 0)
    assert rows[0]["messages"] == [{"role": "user", "content": recs[0]["prompt"]},
                                   {"role": "assistant", "content": task.trace(recs[0])}]
    main(p.parse_args(["--task", "countdown", "--split", "test", "-n", "5", "--out", str(out),
                       "--format", "sft-answers"]))
    assert json.loads(out.read_text().splitlines()[0])["messages"][1]["content"].startswith("<think>\n</think>")
    main(p.parse_args(["--task", "countdown", "-n", "5", "--seed", "2", "--out", str(out)]))
    assert load_records(out) == TASKS["countdown"].records("train", 5, 2)
    assert "wrote 5 countdown train records" in capsys.readouterr().out
    with pytest.raises(ValueError, match="arithmetic options"):
        main(p.parse_args(["--task", "countdown", "-n", "5", "--out", str(out), "--digits", "3"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--task", "sudoku", "--out", str(out)])
