"""Tokenizer: the same ids and chat text as transformers on the same files; incremental detokenisation that
never emits half a character."""

from __future__ import annotations

import json

import pytest

from dsv3.tokenizer import (BOS, EOS, SPECIAL_TOKENS, TOOL_CALLS_BEGIN, TOOL_SEP, IncrementalDetokenizer, Tokenizer,
                            describe_tools, train_bpe)

TEXT = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "Größe, naïve café — 你好，世界！ Emoji: 🙂🚀 and math: ∑ x² ≤ ∞\n",
        "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe(TEXT * 30, vocab_size=500).save_pretrained(d)
    return d


def test_special_tokens_and_round_trip(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)  # as DeepSeek-V3
    for t in TEXT:
        ids = tok.encode(t)
        assert ids[0] == 0 and ids.count(0) == 1  # BOS once
        assert tok.decode(ids) == t  # byte-level: lossless
    assert tok.decode([0, *tok.encode("hi", add_special_tokens=False), 1], skip_special_tokens=False) == f"{BOS}hi{EOS}"
    # V3's special tokens at ids 0..7 as before, its tool tokens after them, each one token
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS))) and len(SPECIAL_TOKENS) == 17
    assert tok.encode(f"{TOOL_CALLS_BEGIN}x{TOOL_SEP}", add_special_tokens=False)[::2] == [8, 16]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now", "parameters": {}}}]  # no description
TOOL_CHAT = [
    {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris and Rome? 你好"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "a", "content": "sunny"}, {"role": "tool", "tool_call_id": "b", "content": "rain"},
    {"role": "assistant", "content": "Sunny, then rain."}, {"role": "user", "content": "And now?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c", "content": "12:00"}]


def test_same_ids_and_chat_text_as_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    for t in TEXT:
        assert tok.encode(t) == hf(t)["input_ids"]
        assert tok.encode(t, add_special_tokens=False) == hf(t, add_special_tokens=False)["input_ids"]
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? 你好 🙂"}],
    ]
    chats += [TOOL_CHAT[:k] for k in range(2, len(TOOL_CHAT) + 1)]  # with tools, calls and results
    for msgs in chats:
        tools = TOOLS if msgs[-1] in TOOL_CHAT else None
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
            ids = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=True)
            theirs = hf.apply_chat_template(msgs, tools=tools, tokenize=True, add_generation_prompt=gen)
            theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
            assert ids == list(theirs)


def test_tool_calls_render_as_the_official_v3_template_does(tok_dir):
    """Where the official template has no slip (the first calls of a conversation, two of them, and their results),
    ours renders the same text; the tools are described after the system prompt (the official one never does)."""
    tok = Tokenizer.from_dir(tok_dir)
    with open(f"{__file__.rsplit('/', 1)[0]}/data/deepseek_v3_tokenizer_config.json", encoding="utf-8") as f:
        v3 = Tokenizer(tok.tok, {**tok.config, "chat_template": json.load(f)["chat_template"]})
    for k in (3, 5, 6, 7):
        for gen in (True, False):
            assert tok.apply_chat_template(TOOL_CHAT[:k], add_generation_prompt=gen) == \
                v3.apply_chat_template(TOOL_CHAT[:k], add_generation_prompt=gen)
    text = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert text.startswith(f"{BOS}You are terse.\n\n{describe_tools(TOOLS)}<｜User｜>")
    assert describe_tools(TOOLS).startswith("## Tools\nYou can call these tools:\n\n### get_weather\nDescription: The "
                                            'weather in a city.\n\nParameters: {"type": "object", "properties": '
                                            '{"city": {"type": "string"}}, "required": ["city"]}\n\n### now\n\n'
                                            "Parameters: {}\n\nTo call tools, reply with <｜tool▁calls▁begin｜>")
    # a message with content and calls keeps both (the official template drops the calls), and the results of
    # a later round open and close again (it opens only the first)
    assert text.endswith("<｜User｜>And now?<｜Assistant｜>Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                         "function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
                         f"{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜>"
                         "<｜tool▁outputs▁end｜>")  # the reply follows without a role token
    with pytest.raises(Exception, match="must follow an assistant message with tool_calls"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


def test_a_real_style_template_from_tokenizer_config(tmp_path, tok_dir):
    """DeepSeek-V3's own template uses namespace(), loops and `raise_exception`."""
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
                            "{% endif %}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                            "{{ '<' + m['role'] + '>' + m['content'] | trim }}\n{% endfor %}")
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": " hi "}]) == "<user>hi\n"
    with pytest.raises(Exception, match="Only user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_incremental_detokenizer_never_splits_a_character(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    text = "Unseen: 😀 漢字 Ωμέγα, seen: 🙂 你好 Größe"
    ids = tok.encode(text, add_special_tokens=False)
    # byte-level BPE splits some characters across tokens: feeding one id at a time must still only emit
    # whole characters, and the pieces must add up to the text
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for step in (1, 2, 3):
        d = IncrementalDetokenizer(tok)
        pieces = [d.add(ids[i:i + step]) for i in range(0, len(ids), step)]
        pieces.append(d.flush())
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == text == d.text


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
