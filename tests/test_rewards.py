"""Rule-based rewards on hand-made completions: accuracy needs the format, each record judged by its kind,
DAPO's length penalty at its boundaries, and weighted sums."""

from __future__ import annotations

import sys
import types

import pytest

from dsv3.data.tasks import TASKS
from dsv3.train.rewards import (REWARDS, accuracy_reward, combine, format_reward, is_well_formed_code,
                                length_penalty, reward_functions)

MATH = {"prompt": "What is 2 + 3?", "answer": "5"}
COUNTDOWN = {"prompt": "Use 3, 7, 6 to make 45", "answer": "7*6+3", "numbers": [3, 7, 6], "target": 45}
CODE = {"prompt": "Write f", "tests": ["assert f() == 1"]}


def test_accuracy_needs_a_correct_answer_in_the_format():
    cases = [
        ("<think>\n2+3+0=5\n</think>\n\\boxed{5}", MATH, 1.0, 1.0),
        ("<think>\n</think>\n\\boxed{5.0}", MATH, 1.0, 1.0),  # answers alone, compared as numbers
        ("<think>\n</think>\n\\boxed{6}", MATH, 0.0, 1.0),  # well formed, wrong
        ("\\boxed{5}", MATH, 0.0, 0.0),  # right, but no think block
        ("<think>\n\\boxed{5}", MATH, 0.0, 0.0),  # think never closed
        ("<think>x</think>\n\\boxed{6} no, \\boxed{5}", MATH, 0.0, 0.0),  # two answers: a hedge
        ("<think>\n7*6=42\n42+3=45\n</think>\n\\boxed{7*6+3}", COUNTDOWN, 1.0, 1.0),
        ("<think>\n</think>\n\\boxed{6*7+3}", COUNTDOWN, 1.0, 1.0),  # another solution
        ("<think>\n</think>\n\\boxed{45}", COUNTDOWN, 0.0, 1.0),  # the target is not an equation of the numbers
        ("<think>\n</think>\n\\boxed{7*7-4}", COUNTDOWN, 0.0, 1.0),  # 7 twice, 4 not given
        ("<think>\n</think>\n\\boxed{__import__('os')}", COUNTDOWN, 0.0, 1.0),
    ]
    completions, records, acc, fmt = map(list, zip(*cases))
    assert accuracy_reward(completions, records) == acc
    assert format_reward(completions, records) == fmt


def test_builtin_traces_earn_full_reward():
    for task in TASKS.values():
        recs = task.records("test", 50, 0)
        for make in (task.trace, task.answer_only):
            completions = [make(r) for r in recs]
            assert accuracy_reward(completions, recs) == [1.0] * 50
            assert format_reward(completions, recs) == [1.0] * 50
        # another problem's trace: right format, wrong answer (different problems can share an answer)
        wrong = accuracy_reward([task.trace(r) for r in recs[1:] + recs[:1]], recs)
        assert sum(wrong) <= 5


@pytest.fixture
def fake_sandbox(monkeypatch):
    """dsv3.train.sandbox replaced by a stub that passes code containing 'return 1' and records its calls."""
    calls = []

    def code_reward(completions, tests, **limits):
        calls.append((completions, tests, limits))
        return [1.0 if "return 1" in c else 0.25 for c in completions]

    monkeypatch.setitem(sys.modules, "dsv3.train.sandbox", types.SimpleNamespace(code_reward=code_reward))
    return calls


def test_code_records_in_a_mixed_batch(fake_sandbox):
    good = "<think>\nreturn one\n</think>\n```python\ndef f():\n    return 1\n```"
    partial = "<think>\n```python\ndef f(): return 1\n```\n</think>\n```\ndef f():\n    return 2\n```"
    no_think = "```python\ndef f():\n    return 1\n```"
    no_fence = "<think>\n</think>\ndef f():\n    return 1"
    completions = [good, "<think>\n</think>\n\\boxed{5}", partial, no_think, no_fence]
    records = [CODE, MATH, CODE, CODE, CODE]
    assert accuracy_reward(completions, records, code_limits={"timeout": 2}) == [1.0, 1.0, 0.25, 0.0, 0.0]
    assert format_reward(completions, records) == [1.0, 1.0, 1.0, 0.0, 0.0]
    (ran, tests, limits), = fake_sandbox  # one sandbox batch, only the well-formed code completions
    assert len(ran) == 2 and tests == [CODE["tests"]] * 2 and limits == {"timeout": 2}
    assert "return 2" in ran[1] and "return 1" not in ran[1]  # the code in the reasoning is not the answer
    assert not is_well_formed_code("<think>\n</think>\n```python\nunclosed")


def test_no_sandbox_call_without_code_records(fake_sandbox):
    accuracy_reward(["<think>\n</think>\n\\boxed{5}"], [MATH])
    assert fake_sandbox == []


def test_rewards_refuse_mismatched_or_unknown_records():
    with pytest.raises(ValueError, match="one record per completion"):
        accuracy_reward(["a", "b"], [MATH])
    with pytest.raises(ValueError, match="needs 'answer'"):
        format_reward(["a"], [{"prompt": "p"}])


def test_length_penalty_boundaries():
    fn = length_penalty(max_len=100, cache=20)
    lengths = [0, 80, 81, 90, 99, 100, 101, 500]
    ids = [[7] * n for n in lengths]
    got = fn([""] * len(ids), [MATH] * len(ids), completion_ids=ids)
    assert got == pytest.approx([0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])
    hard = length_penalty(max_len=10, cache=0)  # no soft zone: a cliff at max_len
    assert hard(["", ""], [MATH, MATH], completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="completion_ids"):
        fn(["x"], [MATH])
    with pytest.raises(ValueError, match="cache <= max_len"):
        length_penalty(max_len=10, cache=20)


def test_reward_functions_and_combine():
    named = reward_functions(["accuracy", "format", "length"], max_len=64, length_cache=16)
    assert [n for n, _ in named] == ["accuracy", "format", "length"]
    assert named[0][1] is REWARDS["accuracy"]
    with pytest.raises(ValueError, match="choose from accuracy, format, length"):
        reward_functions(["acuracy"])
    with pytest.raises(ValueError, match="needs max_len"):
        reward_functions(["length"])
    with pytest.raises(ValueError, match="named twice"):
        reward_functions(["format", "format"])

    completions = ["<think>\n</think>\n\\boxed{5}", "<think>\n</think>\n\\boxed{6}", "5"]
    ids = [[1] * 10, [1] * 56, [1] * 100]
    rewards = {name: fn(completions, [MATH] * 3, completion_ids=ids) for name, fn in named}
    assert rewards == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0], "length": [0.0, -0.5, -1.0]}
    assert combine(rewards, {"accuracy": 1.0, "format": 0.5, "length": 2.0}) == [1.5, -0.5, -2.0]
    assert combine(rewards, {"format": 0.0}) == [1.0, -0.5, -1.0]  # unweighted rewards count once
    with pytest.raises(ValueError, match="not among the rewards"):
        combine(rewards, {"fromat": 1.0})
    with pytest.raises(ValueError, match="different lengths"):
        combine({"a": [1.0], "b": [1.0, 2.0]}, {})
