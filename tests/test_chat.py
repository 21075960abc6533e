"""Chat data for SFT: the loss mask covers exactly the assistant turns on our template and DeepSeek's real ones;
packed rows keep examples apart (labels, positions, attention) and are read deterministically and resumably."""

from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest
import torch

from conftest import random_model
from dsv3 import DeepSeekV3, ModelConfig
from dsv3.data.chat import (IGNORE, PackedChat, SFTBatch, collate, load_chat_records, records_to_examples,
                            render)
from dsv3.tokenizer import BOS, EOS, Tokenizer, train_bpe

DATA = os.path.join(os.path.dirname(__file__), "data")
TEMPLATES = ["ours", "deepseek_v3", "deepseek_r1", "deepseek_r1_0528"]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "Fine, thanks!  And you?\n"},
    {"role": "user", "content": "Write fib in Python."},
    {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"},
]


@pytest.fixture(scope="module")
def base_tok():
    texts = [m["content"] for m in CONVERSATION] + ["Größe, naïve café 你好 🙂", "The quick brown fox jumps."]
    return train_bpe(texts * 20, vocab_size=400)


def with_template(base: Tokenizer, name: str) -> Tokenizer:
    if name == "ours":
        return base
    with open(os.path.join(DATA, f"{name}_tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["_source"] and cfg["bos_token"] == BOS and cfg["eos_token"] == EOS
    return Tokenizer(base.tok, {**base.config, **{k: v for k, v in cfg.items() if not k.startswith("_")}})


def masked_runs(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


# ---- rendering -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_is_exactly_the_assistant_turns(base_tok, name):
    tok = with_template(base_tok, name)
    ids, mask = render(tok, {"messages": CONVERSATION})
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and not mask[0]
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == [a + EOS for a in answers]
    # the rest is the prompt: system, users, role tokens
    prompt = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert prompt.count("<｜Assistant｜>") == 2 and CONVERSATION[0]["content"] in prompt


@pytest.mark.parametrize("name", TEMPLATES)
def test_piecewise_ids_equal_whole_text_ids(base_tok, name):
    tok = with_template(base_tok, name)
    for messages in (CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": " spaced  out "}]):
        ids, _ = render(tok, {"messages": messages})
        text = tok.apply_chat_template(messages, add_generation_prompt=False)
        assert ids == tok.encode(text, add_special_tokens=False)


def test_r1_reasoning_kept_on_the_last_turn_only(base_tok):
    """R1's templates drop '...</think>' from every assistant message. The answered turn is generated at
    inference, so it is trained with its reasoning; earlier turns appear as the template renders history."""
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["content"] = "<think>\nsmall talk</think>Fine."
    messages[4]["content"] = "<think>\nrecursion</think>def fib(n): ..."
    for name in ("deepseek_r1", "deepseek_r1_0528"):
        tok = with_template(base_tok, name)
        ids, mask = render(tok, {"messages": messages})
        assert masked_runs(tok, ids, mask) == [messages[4]["content"] + EOS]
        text = tok.decode(ids, skip_special_tokens=False)
        assert "small talk" not in text and "<｜Assistant｜>Fine." + EOS in text
    # V3's template keeps reasoning everywhere: both turns trained verbatim
    tok = with_template(base_tok, "deepseek_v3")
    ids, mask = render(tok, {"messages": messages})
    assert masked_runs(tok, ids, mask) == [messages[2]["content"] + EOS, messages[4]["content"] + EOS]


def test_template_that_is_not_prefix_stable_is_refused(base_tok):
    # the generation prompt opens a <think> block that a rendered turn without reasoning does not have
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
                "{% else %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
    tok = Tokenizer(base_tok.tok, {**base_tok.config, "chat_template": template})
    with pytest.raises(ValueError, match="not prefix-stable at messages\\[1\\]"):
        render(tok, {"messages": CONVERSATION[1:3]})
    # a turn that starts with the forced opening fits: the opening is prompt, the rest is trained
    ids, mask = render(tok, {"messages": [CONVERSATION[1], {"role": "assistant", "content": "<think>\nhm</think>ok"}]})
    assert masked_runs(tok, ids, mask) == ["hm</think>ok" + EOS]


def test_bos_added_once_when_the_template_lacks_it(base_tok):
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
                "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = Tokenizer(base_tok.tok, {**base_tok.config, "chat_template": template})
    ids, mask = render(tok, {"messages": CONVERSATION[1:3]})
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and not mask[0]
    assert masked_runs(tok, ids, mask) == [CONVERSATION[2]["content"] + EOS]


TOOL_RECORD = {
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "messages": [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "a", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": "a", "content": '{"conditions": "sunny"}'},
                 {"role": "assistant", "content": "It is sunny in Paris."}]}


@pytest.mark.parametrize("name", TEMPLATES)
def test_tool_calls_are_trained_and_tool_results_are_not(base_tok, name):
    """The loss covers the assistant's calls (as each template writes them) and its answer after the results;
    the results and the tools' description are prompt."""
    tok = with_template(base_tok, name)
    record = json.loads(json.dumps(TOOL_RECORD))
    if name == "deepseek_r1_0528":  # its template reads content even beside calls: it needs a string
        record["messages"][1]["content"] = ""
    ids, mask = render(tok, record)
    call, answer = masked_runs(tok, ids, mask)
    assert call.startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                           '{"city": "Paris"}\n```<｜tool▁call▁end｜>')
    if name in ("ours", "deepseek_r1_0528"):  # (the official V3 and R1 templates do not close a single call)
        assert call.endswith("<｜tool▁calls▁end｜>" + EOS)
    assert answer == "It is sunny in Paris." + EOS
    prompt = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert prompt.endswith('<｜tool▁output▁begin｜>{"conditions": "sunny"}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>')
    assert ("## Tools" in prompt) == (name == "ours")  # only ours describes the tools
    assert ids == tok.encode(tok.apply_chat_template(record["messages"], tools=record["tools"],
                                                     add_generation_prompt=False), add_special_tokens=False)


def test_tool_records_in_openais_fine_tuning_format(tmp_path, base_tok):
    record = json.loads(json.dumps(TOOL_RECORD))
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # an object is its JSON
    del record["messages"][1]["content"]
    p = tmp_path / "tools.jsonl"
    p.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (rec,) = load_chat_records(p)
    assert rec["tools"] == TOOL_RECORD["tools"] and rec["messages"] == TOOL_RECORD["messages"]
    assert render(base_tok, rec) == render(base_tok, TOOL_RECORD)


# ---- records -------------------------------------------------------------------------------------------------

def test_records_messages_and_prompt_completion(tmp_path, base_tok):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": CONVERSATION, "id": 7}) + "\n\n   \n"
                 + json.dumps({"prompt": "2+2?", "completion": "4", "source": "math"}) + "\n", encoding="utf-8")
    recs = load_chat_records(p)
    assert len(recs) == 2 and recs[0]["id"] == 7 and recs[1]["source"] == "math"
    assert recs[1]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    examples = records_to_examples(base_tok, recs, progress=True)
    assert masked_runs(base_tok, *examples[1]) == ["4" + EOS]
    assert examples[0] == render(base_tok, recs[0])


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"text": "hi"}', "missing field 'messages'"),
    ('{"prompt": "hi"}', "missing field 'completion'"),
    ('{"prompt": "hi", "completion": 3}', "'completion' must be a string"),
    ('{"messages": "hi"}', "'messages' must be a list"),
    ('{"messages": [{"role": "user"}]}', "messages\\[0\\] is missing field 'content'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [], "prompt": "a", "completion": "b"}', "not both"),
    ('{"messages": [{"role": "user", "content": "x", "tool_calls": []}]}', "only assistant messages have tool_calls"),
    ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {}}]}]}',
     "tool_calls\\[0\\] must be"),
    ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", '
     '"arguments": "{oops"}}]}]}', "arguments is not JSON"),
    ('{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", '
     '"arguments": "[1]"}}]}]}', "must be a JSON object"),
    ('{"tools": [{"name": "f"}], "messages": [{"role": "assistant", "content": "x"}]}', "tools\\[0\\] must be"),
    ('{"messages": [{"role": "assistant", "content": null}]}', "content must be a string"),
])
def test_malformed_records_name_path_and_line(tmp_path, line, problem):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "ok", "completion": "ok"}) + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{p}:3: .*{problem}"):
        load_chat_records(p)


# ---- packing -------------------------------------------------------------------------------------------------

def synthetic(n: int, seed: int = 0, lo: int = 3, hi: int = 20) -> list[tuple[list[int], list[bool]]]:
    """Examples with distinct ids (example k's tokens are 1000*k + j), a prompt then an answer ending the turn."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        L = int(rng.integers(lo, hi + 1))
        p = int(rng.integers(1, L))  # prompt length >= 1, answer length >= 1
        out.append(([1000 * (k + 1) + j for j in range(L)], [False] * p + [True] * (L - p)))
    return out


def segments_of(batch: SFTBatch):
    """-> [(inputs, labels, positions)] per packed example, over all rows."""
    out = []
    for r in range(len(batch)):
        seg = batch.segments[r]
        for s in range(int(seg.max()) + 1):
            sel = seg == s
            out.append((batch.input_ids[r][sel].tolist(), batch.labels[r][sel].tolist(),
                        batch.positions[r][sel].tolist()))
        assert (batch.input_ids[r][seg == -1] == 3).all() and (batch.labels[r][seg == -1] == IGNORE).all()
    return out


def test_packing_keeps_every_example_once_and_apart():
    examples = synthetic(40)
    data = PackedChat(examples, seq_len=32, seed=1, pad_id=3)
    assert data.num_examples == 40 and data.truncated == 0 and data.dropped == 0
    batch = data.batch(0, data.num_sequences)
    assert batch.input_ids.shape == (data.num_sequences, 32) and batch.input_ids.dtype == torch.int64
    got = sorted(segments_of(batch))
    want = []
    for ids, mask in examples:
        labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        want.append((ids[:-1], labels, list(range(len(ids) - 1))))
        assert labels[-1] == ids[-1]  # the last input's label is the example's own last token
    assert got == sorted(want)  # each example once, its labels its own (none crosses a boundary)
    assert data.tokens == sum(len(i) - 1 for i, _ in examples) == int((batch.segments >= 0).sum())
    assert data.loss_tokens == sum(sum(m[1:]) for _, m in examples) == batch.num_loss_tokens
    assert data.num_sequences < 40  # packed, not one per row


def test_attention_mask_is_block_diagonal_causal():
    data = PackedChat(synthetic(12), seq_len=24, seed=0, pad_id=3)
    batch = data.batch(0, data.num_sequences)
    m = batch.attention_mask()
    B, T = batch.input_ids.shape
    assert m.shape == (B, 1, T, T) and m.dtype == torch.bool
    for r in range(B):
        seg = batch.segments[r].tolist()
        for t in range(T):
            for s in range(T):
                want = s == t if seg[t] < 0 else (s <= t and seg[s] == seg[t])
                assert bool(m[r, 0, t, s]) == want, (r, t, s)
    assert m.any(-1).all()  # no all-False row


def test_packed_forward_equals_examples_one_by_one():
    params = inspect.signature(DeepSeekV3.hidden_states).parameters
    if "mask" not in params or "positions" not in params:
        pytest.skip("the model does not take positions and an attention mask yet")
    cfg = ModelConfig.preset("micro")
    model = random_model(cfg)
    rng = np.random.default_rng(0)
    examples = [(rng.integers(8, cfg.vocab_size, size=n).tolist(), [False] * (n // 2) + [True] * (n - n // 2))
                for n in (9, 5, 13, 4, 7)]
    data = PackedChat(examples, seq_len=20, seed=0, pad_id=2)
    batch = data.batch(0, data.num_sequences)
    try:
        with torch.no_grad():
            packed = model.hidden_states(batch.input_ids, positions=batch.positions, mask=batch.attention_mask())
    except (RuntimeError, TypeError) as e:
        pytest.skip(f"the model does not take (B, T) positions and a (B, 1, T, T) mask yet: {e}")
    assert torch.isfinite(packed).all()  # padding rows included
    n_checked = 0
    for r in range(len(batch)):
        for s in range(int(batch.segments[r].max()) + 1):
            sel = batch.segments[r] == s
            with torch.no_grad():
                alone = model.hidden_states(batch.input_ids[r][sel][None])[0]
            torch.testing.assert_close(packed[r][sel], alone, rtol=1e-4, atol=1e-5)
            n_checked += 1
    assert n_checked == len(examples)


def test_deterministic_per_seed_and_resumable():
    examples = synthetic(60, seed=3)
    a, b = PackedChat(examples, 32, seed=5), PackedChat(examples, 32, seed=5)
    n = a.num_sequences
    _ = [a.batch(i, 3) for i in range(0, 2 * n, 3)]  # a has read two epochs; b has read nothing
    for start in (0, 4, n - 1, n, 2 * n + 1):
        x, y = a.batch(start, 4), b.batch(start, 4)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("input_ids", "labels", "positions",
                                                                        "segments"))
    # each epoch visits every row once, in a fresh order
    ep0 = [tuple(a.sequence(i)[0].tolist()) for i in range(n)]
    ep1 = [tuple(a.sequence(n + i)[0].tolist()) for i in range(n)]
    assert sorted(ep0) == sorted(ep1) and ep0 != ep1 and len(set(ep0)) == n
    c = PackedChat(examples, 32, seed=6)
    assert [tuple(c.sequence(i)[0].tolist()) for i in range(c.num_sequences)] != ep0
    unshuffled = PackedChat(examples, 32, seed=5, shuffle=False)
    assert [tuple(unshuffled.sequence(i)[0].tolist()) for i in range(n)] == \
        [tuple(unshuffled.row(k)[0].tolist()) for k in range(n)]


def test_truncation_counted_and_hopeless_examples_dropped():
    long_answer = (list(range(100, 140)), [False] * 5 + [True] * 35)  # 39 inputs: cut to 16, answer kept
    late_answer = (list(range(200, 240)), [False] * 30 + [True] * 10)  # the answer lies past the cut
    no_answer = (list(range(300, 310)), [False] * 10)
    data = PackedChat([long_answer, late_answer, no_answer] + synthetic(5, hi=10), seq_len=16, seed=0, pad_id=3)
    assert (data.truncated, data.dropped, data.num_examples) == (1, 2, 6)
    segs = segments_of(data.batch(0, data.num_sequences))
    assert (list(range(100, 116)), [IGNORE] * 4 + list(range(105, 117)), list(range(16))) in segs
    with pytest.raises(ValueError, match="none of 1 examples"):
        PackedChat([late_answer], seq_len=16, seed=0)


def test_collate_one_example_per_row():
    examples = synthetic(3, lo=4, hi=9)
    batch = collate(examples, pad_id=3)
    T = max(len(i) for i, _ in examples) - 1
    assert batch.input_ids.shape == (3, T) and len(batch) == 3
    for r, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        assert batch.input_ids[r, :n].tolist() == ids[:-1] and (batch.input_ids[r, n:] == 3).all()
        assert batch.labels[r, :n].tolist() == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        assert batch.positions[r, :n].tolist() == list(range(n)) and (batch.segments[r, n:] == -1).all()
    assert batch.num_loss_tokens == sum(sum(m[1:]) for _, m in examples)
    both = SFTBatch.cat([batch, batch.to("cpu")])
    assert both.input_ids.shape == (6, T) and both.attention_mask().shape == (6, 1, T, T)
