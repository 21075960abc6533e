"""DeepSeek-V3's tool calls in model output -> OpenAI's `tool_calls`, whole (`parse_tool_calls`) or streamed
(`ToolCallParser`, whose deltas add up to the same result however the text is split).

The model writes its calls after any text, as the chat template renders them (tokenizer.CHAT_TEMPLATE):

    TEXT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>
    \\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

- TEXT (and any text after the block) is the message's content. A block may also open with a bare
  <｜tool▁call▁begin｜>, and may lack <｜tool▁calls▁end｜> at the end of the output (the official V3 template
  writes neither for a single call, so a model trained on it may not either). Whitespace between calls is free.
- A block counts only whole: every call in it complete, of type `function`, NAME one of `names` (the request's
  tools) when given, ARGUMENTS a JSON object (kept as the model wrote it: OpenAI's `arguments` is JSON text).
  Anything else (a call cut off by max_tokens, invalid JSON, an unknown function) makes the block plain content,
  markers and all, as is everything after it: malformed output falls back to text, never to a broken call.
- So the stream holds a block back until it is decided (at <｜tool▁calls▁end｜>, or at the end of the output),
  and holds back text that may be the start of a block marker; everything else is released at once. A client
  never receives text that turns out to be a call, nor a call it cannot json.loads; the price is that a call's
  arguments arrive in one piece when its block closes instead of token by token.

vLLM's DeepSeek-V3 parser (vllm/entrypoints/openai/tool_parsers/deepseekv3_tool_parser.py) reads the same
format with regular expressions: it keeps every call that matches and drops the rest, checks neither the JSON
nor the names, and streams argument fragments as they come (a call later found broken cannot be taken back).

The text must keep the special tokens (decode with skip_special_tokens=False); the end-of-sequence token is
the caller's to leave out. `ChoiceOutput` does both for the server: a choice's token ids in, deltas out.

tool_choice (`forced_prefix`): "auto" leaves the model free; "required" writes the opening of a call into the
prompt (<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>), so the model continues with a
function's name; a named function writes the name and the opening of its arguments too. The model writes the
rest, and the parser checks it as usual (vLLM constrains "required" and named calls with guided decoding instead;
the server does that for a named function's arguments when the structured-output library is there: api.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from ..tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP,
                         IncrementalDetokenizer, Tokenizer)

ARGS_OPEN, ARGS_CLOSE = "\n```json\n", "\n```"
_OPENERS = (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN)
_WHITESPACE = " \t\r\n"


def new_call_id() -> str:
    """An id in OpenAI's form: "call_" and 24 random hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as the model wrote it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Delta:
    """What one piece of text released: content, and OpenAI's `delta.tool_calls` entries (a call's first
    entry has its index, id, type and name; its second, the arguments)."""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass
class ParsedOutput:
    content: str  # the text outside tool calls ("" if none)
    tool_calls: list[ToolCall]


def parse_tool_calls(text: str, names: Collection[str] | None = None, prefix: str = "",
                     new_id: Callable[[], str] = new_call_id) -> ParsedOutput:
    """A whole output -> its content and tool calls (see the module docstring); exactly what the stream of
    `ToolCallParser` adds up to."""
    parser = ToolCallParser(names, prefix, new_id)
    parser.feed(text)
    parser.finish()
    return ParsedOutput(parser.content, parser.calls)


class ToolCallParser:
    """Text in as it is generated (`feed`), deltas out; `finish` at the end of the output.

    names: the functions that may be called (None: any). prefix: text the output continues, written into the
    prompt by the server (the start of a forced call, for tool_choice "required" or a named function): it is
    parsed as if the model had written it, but never reported as content. After `finish`, `content` and `calls`
    hold the whole result."""

    def __init__(self, names: Collection[str] | None = None, prefix: str = "",
                 new_id: Callable[[], str] = new_call_id):
        self.names = None if names is None else set(names)
        self.new_id = new_id
        self.pending = ""  # text received and not yet released (a possible marker's start, or an open block)
        self.in_block = False  # pending starts with a block opener
        self.plain = False  # a block failed: the rest is content
        self.hidden = len(prefix)  # characters of the prefix that content must not show
        self.content = ""
        self.calls: list[ToolCall] = []
        self.finished = False
        if prefix:
            self._release(self.feed(prefix))  # (a prefix releases nothing: it opens a block)

    def feed(self, text: str) -> Delta:
        if self.finished:
            raise ValueError("feed after finish")
        self.pending += text
        out = Delta()
        while self.pending:
            if self.plain:
                self._text(out, self.pending)
                self.pending = ""
            elif not self.in_block:
                starts = [i for i in (self.pending.find(m) for m in _OPENERS) if i >= 0]
                if starts:
                    self._text(out, self.pending[:min(starts)])
                    self.pending, self.in_block = self.pending[min(starts):], True
                    continue
                keep = _marker_prefix_length(self.pending)
                self._text(out, self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            else:
                calls, end = _scan_block(self.pending, self.names, final=False)
                if calls is None and end is None:  # not decided yet
                    break
                self._block(out, calls, end)
        return out

    def finish(self) -> Delta:
        """The end of the output: an open block is decided on what it has (a missing <｜tool▁calls▁end｜> is
        forgiven), and held-back text released."""
        out = Delta()
        if self.finished:
            return out
        if self.in_block and not self.plain:
            calls, end = _scan_block(self.pending, self.names, final=True)
            self._block(out, calls, end)
        if self.pending:
            self._text(out, self.pending)
            self.pending = ""
        self.finished = True
        return out

    def _block(self, out: Delta, calls: list[tuple[str, str]] | None, end: int | None) -> None:
        """A decided block: its calls released and the text after it left pending, or all of it plain."""
        self.in_block = False
        if calls is None:
            self.plain = True
            self._text(out, self.pending)
            self.pending = ""
            return
        self.hidden = max(0, self.hidden - end)
        self.pending = self.pending[end:]
        for name, arguments in calls:
            call = ToolCall(name, arguments, self.new_id())
            index = len(self.calls)
            self.calls.append(call)
            out.tool_calls += [{"index": index, "id": call.id, "type": "function",
                                "function": {"name": name, "arguments": ""}},
                               {"index": index, "function": {"arguments": arguments}}]

    def _text(self, out: Delta, text: str) -> None:
        cut = min(self.hidden, len(text))
        self.hidden -= cut
        out.content += text[cut:]
        self.content += text[cut:]

    def _release(self, delta: Delta) -> None:
        assert not delta, f"a prefix released {delta}"


def _marker_prefix_length(text: str) -> int:
    """The length of the longest end of `text` that a block opener starts with (text to hold back)."""
    for n in range(min(len(text), max(map(len, _OPENERS)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in _OPENERS):
            return n
    return 0


def _scan_block(text: str, names: set[str] | None, final: bool) -> tuple[list[tuple[str, str]] | None, int | None]:
    """A block at the start of `text` -> (calls, where the block ends) once decided: (calls, end) if it is
    well formed, (None, 0) if it is not (or cannot become so); (None, None) while more text could still make it
    either. final: no more text comes (the block may then end without <｜tool▁calls▁end｜>)."""
    undecided, bad = (None, None), (None, 0)
    pos = len(TOOL_CALLS_BEGIN) if text.startswith(TOOL_CALLS_BEGIN) else 0
    calls: list[tuple[str, str]] = []
    while True:
        pos = _skip_whitespace(text, pos)
        rest = text[pos:]
        if calls and rest.startswith(TOOL_CALLS_END):
            return calls, pos + len(TOOL_CALLS_END)
        if not rest.startswith(TOOL_CALL_BEGIN):
            if final:
                return (calls, pos) if calls and not rest else bad
            if TOOL_CALL_BEGIN.startswith(rest) or (calls and TOOL_CALLS_END.startswith(rest)):
                return undecided
            return bad
        pos += len(TOOL_CALL_BEGIN)
        call = _scan_call(text, pos, names, final)
        if call is None:
            return undecided
        if call == "bad":
            return bad
        (name, arguments), pos = call
        calls.append((name, arguments))


def _scan_call(text: str, pos: int, names: set[str] | None, final: bool):
    """One call's body from `pos` (after <｜tool▁call▁begin｜>) -> ((name, arguments), end), "bad", or None
    while undecided. Each "bad" holds for any text that may follow, so a stream decides as the whole text does."""
    undecided = "bad" if final else None
    head = "function" + TOOL_SEP  # the type is always "function"
    if not text.startswith(head, pos):
        return undecided if head.startswith(text[pos:]) else "bad"
    start = pos + len(head)
    line = text.find(ARGS_OPEN, start)
    name = text[start:] if line < 0 else text[start:line]
    if line < 0 and "\n" in name:  # the name's line ends, but not as ARGS_OPEN starts
        name, opening = name.split("\n", 1)
        if not ARGS_OPEN.startswith("\n" + opening):
            return "bad"
    if any(c in name for c in _WHITESPACE) or "<｜" in name:
        return "bad"
    if names is not None and not any(n.startswith(name) for n in names):
        return "bad"
    if line < 0:
        return undecided
    if not name or (names is not None and name not in names):
        return "bad"
    args_start = line + len(ARGS_OPEN)
    close = text.find(ARGS_CLOSE + TOOL_CALL_END, args_start)
    if close < 0:
        started = text[args_start:].lstrip(_WHITESPACE)
        return "bad" if started and not started.startswith("{") else undecided
    arguments = text[args_start:close]
    try:
        value = json.loads(arguments)
    except ValueError:
        return "bad"
    if not isinstance(value, dict):
        return "bad"
    return (name, arguments), close + len(ARGS_CLOSE) + len(TOOL_CALL_END)


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


# ---- the server's side ---------------------------------------------------------------------------------------

def forced_prefix(mode: str, name: str | None = None) -> str:
    """The start of the reply written into the prompt for tool_choice `mode` ("" for none and auto)."""
    if mode == "required":
        return TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP
    if mode == "named":
        return TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + name + ARGS_OPEN
    return ""


# what follows a named call's arguments when a grammar ends the output right after them
NAMED_CALL_END = ARGS_CLOSE + TOOL_CALL_END + TOOL_CALLS_END


class ChoiceOutput:
    """One choice of a request with tools: its generated token ids in (`add`, as the engine hands them over),
    content and tool-call deltas out. The text is decoded with special tokens kept (the tool markers are special
    tokens) and otherwise as the engine writes it: without the end-of-sequence token, and, when a stop string
    ended the output, without it and what followed (text that may start one is held back until it is known).
    suffix: text that completes the output when it ends (NAMED_CALL_END after a grammar-constrained call)."""

    def __init__(self, tok: Tokenizer, eos_token_ids: Collection[int], names: Collection[str] | None,
                 prefix: str = "", suffix: str = "", stop: list[str] | None = None):
        self.detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
        self.eos = set(eos_token_ids)
        self.parser = ToolCallParser(names, prefix)
        self.suffix, self.stop = suffix, list(stop or [])
        self.hold = max(map(len, self.stop), default=1) - 1  # characters that may begin a stop string
        self.held = ""

    def add(self, token_ids: list[int], finish_reason: str | None = None) -> Delta:
        """The step's new tokens; finish_reason when they end the output."""
        ids = list(token_ids)
        if finish_reason == "stop" and ids and ids[-1] in self.eos:
            ids.pop()
        text = self.held + self.detok.add(ids)
        if finish_reason is None:
            cut = max(0, len(text) - self.hold)
            self.held = text[cut:]
            return self.parser.feed(text[:cut])
        text += self.detok.flush()
        if finish_reason == "stop" and self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            text = text[:min(hits)] if hits else text
        self.held = ""
        out = self.parser.feed(text + self.suffix)
        end = self.parser.finish()
        return Delta(out.content + end.content, out.tool_calls + end.tool_calls)

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's: "tool_calls" when the output ended of itself in calls."""
        return "tool_calls" if reason == "stop" and self.parser.calls else reason

    def message(self) -> dict:
        """The finished choice's `message`: content null beside calls when there is none, as OpenAI."""
        calls = [c.to_openai() for c in self.parser.calls]
        if not calls:
            return {"role": "assistant", "content": self.parser.content}
        return {"role": "assistant", "content": self.parser.content or None, "tool_calls": calls}
