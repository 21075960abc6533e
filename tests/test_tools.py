"""Tool calling: DeepSeek-V3's call format parsed into OpenAI's tool_calls (hand-written outputs, well formed and
not; a stream split anywhere adds up to the whole parse), the server's helpers, the built-in tool-use set, and
the round trip with the openai client (the model calls a tool, the client sends the result, the model answers;
streaming and not) on a micro model fine-tuned from scratch with `dsv3 sft --task tool-use`."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random

import pytest
import torch

import dsv3
from dsv3 import DeepSeekV3, ModelConfig, init_weights
from dsv3.data import chat, tool_use
from dsv3.serve.api import shows_tools, with_tools_described
from dsv3.serve.tools import (NAMED_CALL_END, ChoiceOutput, ToolCallParser, forced_prefix, parse_tool_calls)
from dsv3.tokenizer import (EOS, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP,
                            Tokenizer, describe_tools, train_bpe)
from dsv3.train import sft

DATA = os.path.join(os.path.dirname(__file__), "data")
NAMES = {"get_weather", "add"}


def call(name: str, arguments: str, type_: str = "function") -> str:
    return f"{TOOL_CALL_BEGIN}{type_}{TOOL_SEP}{name}\n```json\n{arguments}\n```{TOOL_CALL_END}"


def block(*calls: str, sep: str = "\n", end: bool = True) -> str:
    return TOOL_CALLS_BEGIN + sep.join(calls) + (TOOL_CALLS_END if end else "")


PARIS, ADD = call("get_weather", '{"city": "Paris"}'), call("add", '{"a": 2, "b": 40}')
# text -> (content, [(name, arguments)])
WELL_FORMED = {
    "one call": (block(PARIS), "", [("get_weather", '{"city": "Paris"}')]),
    "text then two calls": ("Let me check.\n" + block(PARIS, ADD), "Let me check.\n",
                            [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 2, "b": 40}')]),
    "calls on their own lines": (block(PARIS, ADD, sep=" \n\n"), "",
                                 [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 2, "b": 40}')]),
    "no <｜tool▁calls▁end｜> (the official template's habit)": (block(PARIS, end=False), "",
                                                                [("get_weather", '{"city": "Paris"}')]),
    "a bare <｜tool▁call▁begin｜>": ("ok " + PARIS, "ok ", [("get_weather", '{"city": "Paris"}')]),
    "pretty-printed arguments": (block(call("add", '{\n  "a": 1,\n  "b": 2\n}')), "",
                                 [("add", '{\n  "a": 1,\n  "b": 2\n}')]),
    "unicode and a marker-like string in the arguments": (
        block(call("get_weather", '{"city": "Zürich <｜tool▁call▁end｜> 東京"}')), "",
        [("get_weather", '{"city": "Zürich <｜tool▁call▁end｜> 東京"}')]),
    "text after the block": (block(ADD) + " Done.", " Done.", [("add", '{"a": 2, "b": 40}')]),
    "two blocks": (block(ADD) + "and " + block(PARIS), "and ",
                   [("add", '{"a": 2, "b": 40}'), ("get_weather", '{"city": "Paris"}')]),
    "plain text": ("The weather is fine. <｜ not a marker, <｜tool▁ nor this", None, []),
    "text ending in a marker's start": ("Almost <｜tool▁call", None, []),
}
MALFORMED = {  # every one is plain content, markers and all
    "invalid JSON": block(call("get_weather", '{"city": Paris}')),
    "arguments not an object": block(call("add", "[2, 40]")),
    "empty arguments": block(call("add", "")),
    "cut off in the arguments (max_tokens)": block(PARIS)[:-30],
    "cut off in the name": TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "get_wea",
    "an unknown function": block(call("launch_rockets", "{}")),
    "another type": block(call("add", '{"a": 1}', type_="retrieval")),
    "no json fence": block(f"{TOOL_CALL_BEGIN}function{TOOL_SEP}add\n{{\"a\": 1}}{TOOL_CALL_END}"),
    "an empty block": TOOL_CALLS_BEGIN + TOOL_CALLS_END,
    "text inside the block": block(PARIS, "by the way", ADD),
    "a good call then a broken one": "Sure. " + block(PARIS, call("add", "{")),
}


def counter_ids():
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def as_pairs(calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def streamed(text: str, cuts: list[int], prefix: str = "") -> tuple[str, list[dict], ToolCallParser]:
    """Feed text in pieces cut at `cuts` -> (content deltas joined, tool-call deltas, the parser)."""
    parser = ToolCallParser(NAMES, prefix, new_id=counter_ids())
    bounds = [0, *cuts, len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.finish()]
    return "".join(d.content for d in deltas), [c for d in deltas for c in d.tool_calls], parser


def calls_of(deltas: list[dict]) -> list[tuple[str, str]]:
    """OpenAI's streaming accumulation: by index, the first delta's name, the arguments' fragments joined."""
    out: dict[int, list[str]] = {}
    for d in deltas:
        if "id" in d:
            assert d["type"] == "function" and d["function"]["arguments"] == "" and d["index"] not in out
            out[d["index"]] = [d["function"]["name"], ""]
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
        out[d["index"]][1] += d["function"]["arguments"]
    assert sorted(out) == list(range(len(out)))
    return [tuple(out[i]) for i in sorted(out)]


# ---- the parser ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(WELL_FORMED))
def test_well_formed_output(case):
    text, content, calls = WELL_FORMED[case]
    r = parse_tool_calls(text, NAMES, new_id=counter_ids())
    assert r.content == (text if content is None else content)
    assert as_pairs(r.tool_calls) == calls
    assert [c.id for c in r.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    for c in r.tool_calls:
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_output_falls_back_to_plain_content(case):
    text = MALFORMED[case]
    r = parse_tool_calls(text, NAMES)
    assert (r.content, r.tool_calls) == (text, [])


def test_names_none_takes_any_function():
    r = parse_tool_calls(MALFORMED["an unknown function"], names=None)
    assert as_pairs(r.tool_calls) == [("launch_rockets", "{}")]


@pytest.mark.parametrize("case", list(WELL_FORMED) + list(MALFORMED))
def test_a_stream_cut_anywhere_adds_up_to_the_whole_parse(case):
    """At every character boundary (two pieces), character by character, and at random cuts into several pieces,
    the deltas add up to parse_tool_calls' content and calls."""
    text = WELL_FORMED[case][0] if case in WELL_FORMED else MALFORMED[case]
    whole = parse_tool_calls(text, NAMES, new_id=counter_ids())
    rng = random.Random(case)
    cutss = [[i] for i in range(len(text) + 1)] + [list(range(1, len(text)))]
    cutss += [sorted(rng.sample(range(len(text) + 1), min(len(text), 6))) for _ in range(50)]
    for cuts in cutss:
        content, deltas, parser = streamed(text, cuts)
        assert content == whole.content == parser.content, cuts
        assert calls_of(deltas) == as_pairs(whole.tool_calls) == as_pairs(parser.calls), cuts


def test_text_is_released_at_once_unless_it_may_open_a_block():
    parser = ToolCallParser(NAMES)
    assert parser.feed("Let me check").content == "Let me check"
    assert parser.feed(" now.<｜tool").content == " now."  # "<｜tool" may start a marker: held
    assert parser.feed("▁call").content == ""
    d = parser.feed("▁begin｜>function")  # a block opened: held until it is decided
    assert not d
    assert not parser.feed(f"{TOOL_SEP}add\n```json\n{{\"a\": 1, \"b\": 2}}\n```")
    d = parser.feed(TOOL_CALL_END + TOOL_CALLS_END)  # decided: the call is released whole, as two deltas
    assert d.content == "" and calls_of(d.tool_calls) == [("add", '{"a": 1, "b": 2}')]
    assert parser.feed(" bye").content == " bye" and not parser.finish()
    # text that only looked like a marker's start is released as soon as it is not one
    p2 = ToolCallParser(NAMES)
    assert p2.feed("a <｜tool").content == "a " and p2.feed("box").content == "<｜toolbox"


def test_a_prefix_in_the_prompt_is_parsed_but_never_shown():
    """tool_choice "required" or named: the call's opening is in the prompt, the model writes the rest."""
    prefix = forced_prefix("named", "add")
    assert prefix == f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}add\n```json\n"
    rest = '{"a": 1, "b": 2}' + NAMED_CALL_END
    for cut in range(len(rest) + 1):
        content, deltas, parser = streamed(rest, [cut], prefix=prefix)
        assert content == "" and calls_of(deltas) == [("add", '{"a": 1, "b": 2}')]
    r = parse_tool_calls(rest, NAMES, prefix=forced_prefix("required"))  # "add" is not after "<｜tool▁sep｜>"
    assert r.tool_calls == [] and r.content == rest
    r = parse_tool_calls("not json at all", NAMES, prefix=prefix)  # a broken forced call: only the model's text
    assert (r.content, r.tool_calls) == ("not json at all", [])
    assert forced_prefix("auto") == forced_prefix("none") == ""


def test_choice_output_drops_eos_cuts_stop_strings_and_completes_a_grammar_call(tool_tok):
    tok = tool_tok
    eos = {tok.eos_token_id}
    text = "Sure. " + block(PARIS)
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    for step in (1, 2, 5, len(ids)):
        out = ChoiceOutput(tok, eos, NAMES)
        pieces = [out.add(ids[i:i + step], "stop" if i + step >= len(ids) else None)
                  for i in range(0, len(ids), step)]
        assert "".join(p.content for p in pieces) == "Sure. " and out.finish_reason("stop") == "tool_calls"
        assert calls_of([c for p in pieces for c in p.tool_calls]) == [("get_weather", '{"city": "Paris"}')]
        assert out.message()["content"] == "Sure. " and out.message()["tool_calls"][0]["function"]["name"] == \
            "get_weather"
    assert out.finish_reason("length") == "length"
    # a stop string ends the text where it begins, however the tokens fall; what may begin one is held back
    ids = tok.encode("It is sunny. STOP and more", add_special_tokens=False)
    ids = ids[:next(k for k in range(len(ids)) if "STOP" in tok.decode(ids[:k]))]  # the engine stops there
    for step in (1, 3):
        out = ChoiceOutput(tok, eos, NAMES, stop=["STOP"])
        pieces = [out.add(ids[i:i + step], "stop" if i + step >= len(ids) else None)
                  for i in range(0, len(ids), step)]
        assert "".join(p.content for p in pieces) == "It is sunny. " and out.finish_reason("stop") == "stop"
        assert out.message() == {"role": "assistant", "content": "It is sunny. "}
    # a named call under a grammar: the output ends after the arguments; the server completes the call
    out = ChoiceOutput(tok, eos, NAMES, prefix=forced_prefix("named", "add"), suffix=NAMED_CALL_END)
    d = out.add(tok.encode('{"a": 1, "b": 2}', add_special_tokens=False) + [tok.eos_token_id], "stop")
    assert calls_of(d.tool_calls) == [("add", '{"a": 1, "b": 2}')] and out.message()["content"] is None


# ---- the server's template helpers ---------------------------------------------------------------------------

def test_tools_described_as_a_system_message_where_the_template_does_not(tool_tok):
    with open(os.path.join(DATA, "deepseek_v3_tokenizer_config.json"), encoding="utf-8") as f:
        v3 = Tokenizer(tool_tok.tok, {**tool_tok.config, "chat_template": json.load(f)["chat_template"]})
    assert shows_tools(tool_tok) and not shows_tools(v3)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    described = with_tools_described(msgs, tool_use.TOOLS)
    assert described[1] == {"role": "system", "content": describe_tools(tool_use.TOOLS)}
    # the official template joins system messages with a blank line: the same prompt as ours, tools included
    assert v3.apply_chat_template(described) == tool_tok.apply_chat_template(msgs, tools=tool_use.TOOLS)
    assert with_tools_described(msgs[1:], tool_use.TOOLS)[0]["role"] == "system"


# ---- the built-in tool-use set -------------------------------------------------------------------------------

def test_tool_use_records_are_seeded_split_and_render(tmp_path, tool_tok):
    train, test = tool_use.records("train", 200, seed=3), tool_use.records("test", 40, seed=3)
    assert train == tool_use.records("train", 200, seed=3) != tool_use.records("train", 200, seed=4)

    def questions(r):
        return "\n".join(m["content"] for m in r["messages"] if m["role"] == "user")
    assert not {questions(r) for r in train} & {questions(r) for r in test}
    kinds = {len([m for m in r["messages"] if m.get("tool_calls")]) for r in train}
    assert kinds == {0, 1, 2}  # chats, one round of calls, follow-ups
    assert any(len(m.get("tool_calls") or []) == 2 for r in train for m in r["messages"])  # parallel calls
    for r in train[:50]:
        ids, mask = chat.render(tool_tok, r)
        runs = tool_tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        for history, turn in tool_use.turns(r):  # every reply is trained, and parses back to itself
            if turn.get("tool_calls"):
                assert all(c["function"]["arguments"] in runs for c in turn["tool_calls"])
        for m in r["messages"]:
            if m["role"] == "tool":
                assert m["content"] not in runs
    # every expected turn, written as the model should write it, scores as right
    for r in test:
        for history, turn in tool_use.turns(r):
            full = tool_tok.apply_chat_template(history + [turn], tools=r["tools"], add_generation_prompt=False)
            prompt = tool_tok.apply_chat_template(history, tools=r["tools"], add_generation_prompt=True)
            reply = full[len(prompt):].removesuffix(EOS)
            parsed = parse_tool_calls(reply, NAMES)
            assert tool_use.turn_is_right(turn, parsed.content, parsed.tool_calls) == (True, True)
    out = tmp_path / "tool-use.jsonl"
    tool_use.main(["--split", "train", "-n", "20", "--seed", "3", "--out", str(out)])
    assert chat.load_chat_records(out) == train[:20]


def test_sft_takes_tool_use_as_a_task():
    p = argparse.ArgumentParser()
    sft.add_args(p)
    args = p.parse_args(["--init-from", "x", "--out", "y", "--task", "tool-use"])
    assert args.task == "tool-use"
    with pytest.raises(ValueError, match="--digits is an arithmetic option"):
        sft.SFTConfig(init_from="x", out="y", task="tool-use", digits=2)


# ---- the round trip over the server, with the openai client --------------------------------------------------

@pytest.fixture(scope="module")
def tool_tok():
    """A BPE trained on the tool-use conversations themselves (so that they are short)."""
    plain = train_bpe(["x"], vocab_size=300)
    texts = [plain.apply_chat_template(r["messages"], tools=r["tools"], add_generation_prompt=False)
             for r in tool_use.records("train", 300, seed=0)]
    return train_bpe(texts, vocab_size=512)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, tool_tok):
    """A micro model from scratch, fine-tuned with `dsv3 sft --task tool-use` (150 steps, ~30 s on 2 cores)."""
    base = tmp_path_factory.mktemp("tools") / "base"
    model = DeepSeekV3(ModelConfig.preset("micro").replace(vocab_size=tool_tok.vocab_size))
    init_weights(model, std=0.02, generator=torch.Generator().manual_seed(0))
    dsv3.save_pretrained(model, base, dtype=torch.float32, tokenizer=tool_tok)
    run = base.parent / "sft"
    p = argparse.ArgumentParser()
    sft.add_args(p)
    summary = sft.main(p.parse_args([
        "--init-from", str(base), "--out", str(run), "--task", "tool-use", "--task-records", "300", "--steps", "150",
        "--lr", "1e-2", "--seq-len", "512", "--batch-size", "8", "--eval-every", "150", "--eval-records", "10",
        "--eval-max-new-tokens", "48", "--save-every", "150", "--no-plots", "--precision", "fp32"]))
    assert summary["eval_format"] >= 0.9, summary  # calls where calls are due, text where text is
    return run


@pytest.fixture(scope="module")
def tool_server(tool_model):
    from test_serve import Server
    srv = Server(tool_model, max_model_len=512)
    yield srv
    srv.stop()


QUESTION = [{"role": "system", "content": tool_use.SYSTEM}, {"role": "user", "content": "What's the weather in Oslo?"}]


def ask(client, messages, stream=False, **kw):
    """One chat request (greedy) -> (content, [(id, name, arguments)], finish_reason), streamed or not."""
    kw = {"model": "tiny-v3", "messages": messages, "tools": tool_use.TOOLS, "temperature": 0, "max_tokens": 64, **kw}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert choice.message.role == "assistant" and (choice.message.content is not None or calls)
        return choice.message.content, calls, choice.finish_reason
    content, calls, reason = "", {}, None
    for ch in client.chat.completions.create(stream=True, **kw):
        d = ch.choices[0].delta
        content += d.content or ""
        for c in d.tool_calls or []:
            if c.id is not None:
                calls[c.index] = [c.id, c.function.name, ""]
            calls[c.index][2] += c.function.arguments or ""
        reason = ch.choices[0].finish_reason or reason
    return content or None, [tuple(calls[i]) for i in sorted(calls)], reason


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(tool_server, stream):
    client = tool_server.client()
    content, calls, reason = ask(client, QUESTION, stream)
    assert reason == "tool_calls" and calls and content is None, (content, calls, reason)
    for _, name, arguments in calls:
        assert name in NAMES and isinstance(json.loads(arguments), dict)
    # the client runs the tools and sends their results back; the model answers in text
    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, name, arguments in calls]}]
    messages += [{"role": "tool", "tool_call_id": i, "content": json.dumps(
        {"city": "Oslo", "temperature_c": 7, "conditions": "rainy"})} for i, _, _ in calls]
    answer, more, reason = ask(client, messages, stream)
    assert reason == "stop" and not more and answer, (answer, more, reason)
    assert "<｜" not in answer


def test_streaming_equals_non_streaming(tool_server):
    client = tool_server.client()
    a, b = ask(client, QUESTION), ask(client, QUESTION, stream=True)
    assert (a[0], [c[1:] for c in a[1]], a[2]) == (b[0], [c[1:] for c in b[1]], b[2])


def test_tool_choice(tool_server):
    client = tool_server.client()
    greeting = [{"role": "user", "content": "Hi!"}]
    # named: the call is to that function, its arguments valid for its schema (a grammar where xgrammar is)
    _, calls, reason = ask(client, QUESTION, tool_choice={"type": "function", "function": {"name": "add"}})
    assert reason == "tool_calls" and [c[1] for c in calls] == ["add"]
    args = json.loads(calls[0][2])
    assert set(args) == {"a", "b"} and all(isinstance(v, (int, float)) for v in args.values())
    # required: a call even where the model would answer in text
    _, calls, reason = ask(client, greeting, tool_choice="required")
    assert reason == "tool_calls" and calls and calls[0][1] in NAMES
    # none: the tools are not shown and nothing is parsed
    content, calls, reason = ask(client, greeting, tool_choice="none")
    assert not calls and reason in ("stop", "length") and content is not None
    # parallel_tool_calls false: one call at most
    two = [{"role": "user", "content": "What's the weather in Oslo and Lima?"}]
    _, calls, reason = ask(client, two, parallel_tool_calls=False)
    assert reason == "tool_calls" and len(calls) == 1


BAD_TOOLS = {  # request fields -> (param named, a phrase of the message)
    "tool_choice without tools": ({"tool_choice": "required", "tools": None}, None, "tool_choice needs tools"),
    "a named function that is not a tool": ({"tool_choice": {"type": "function", "function": {"name": "fly"}}},
                                            None, "'fly', which is not one of the tools"),
    "a bad tool_choice": ({"tool_choice": "always"}, "tool_choice", "must be 'none', 'auto', 'required'"),
    "a bad function name": ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
                            "tools.0.function.name", "pattern"),
    "two tools of one name": ({"tools": tool_use.TOOLS[:1] * 2}, None, "two functions are named 'get_weather'"),
    "a tool that is not a function": ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "'function'"),
    "arguments that are not JSON": ({"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                             "function": {"name": "add", "arguments": "{oops"}}]}]},
        "messages.1.tool_calls.0.function.arguments", "JSON text of an object"),
    "calls on a user message": ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"type": "function", "function": {"name": "add"}}]}]}, "messages.0", "only assistant messages"),
    "a forced call and a response format": ({"tool_choice": "required", "response_format": {"type": "json_object"}},
                                            "tool_choice", "give one of them"),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_bad_tool_requests_get_a_400_naming_the_field(tool_server, case):
    fields, param, phrase = BAD_TOOLS[case]
    body = {"model": "tiny-v3", "messages": QUESTION, "tools": tool_use.TOOLS, "max_tokens": 2, **fields}
    r = tool_server.http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert phrase in err["message"] and err["param"] == param, err
