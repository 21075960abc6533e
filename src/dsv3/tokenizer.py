"""The tokenizer of a model directory: tokenizer.json (the `tokenizers` library) plus tokenizer_config.json
(special tokens, `add_bos_token`, the chat template), used as transformers uses them, without transformers.

- `encode` adds the BOS token when the config asks for it (DeepSeek-V3: `add_bos_token: true`).
- `apply_chat_template` renders the Jinja template as transformers does (trim_blocks, lstrip_blocks, a
  sandbox, `raise_exception`, `strftime_now`, special tokens as variables).
- `IncrementalDetokenizer` turns a growing list of ids into text deltas and never emits half a UTF-8
  character (byte-level BPE splits characters across tokens).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from .ckpt.io import atomic_write_json, atomic_write_text

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(tok: Any) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    raise ValueError(f"a special token must be a string or an object with 'content', not {tok!r}")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None):
        self.tok = tokenizer
        self.config = dict(config or {})
        self.special = {k: _content(self.config.get(k)) for k in SPECIAL_KEYS}
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in self.chat_template):
                raise ValueError("chat_template must be a string or a list of {name, template} objects")
            named = {t.get("name"): t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ValueError(f"chat_template must be a string, not {type(self.chat_template).__name__}")
        self._template = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """A model directory's tokenizer; a file that does not parse is a ValueError naming it."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            tok = _HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises a bare Exception that does not name the file
            raise ValueError(f"{tj} is not a valid tokenizer.json: {_one_line(e)}") from None
        config = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            try:
                with open(tc, encoding="utf-8") as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{tc} is not valid JSON: {_one_line(e)}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{tc} must hold a JSON object, not {type(config).__name__}")
        tmpl = os.path.join(path, "chat_template.jinja")
        if "chat_template" not in config and os.path.isfile(tmpl):
            try:
                with open(tmpl, encoding="utf-8") as f:
                    config["chat_template"] = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{tmpl} is not UTF-8 text: {_one_line(e)}") from None
        try:
            return cls(tok, config)
        except ValueError as e:  # a special token or chat_template of the wrong shape
            raise ValueError(f"{tc}: {_one_line(e)}") from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        atomic_write_text(os.path.join(path, "tokenizer.json"), self.tok.to_str())
        atomic_write_json(os.path.join(path, "tokenizer_config.json"), self.config)

    # ---- ids -------------------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special["bos_token"])

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special["eos_token"])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if self.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        """tools: OpenAI's function definitions ({"type": "function", "function": {name, description,
        parameters}}), given to the template as `tools` (as transformers does; a template may ignore them)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json)")
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special.items() if v is not None}, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def describe_tools(tools: list[dict]) -> str:
    """The tools as CHAT_TEMPLATE describes them in the system prompt (TOOLS_PROMPT), for a template that does
    not describe them itself (the official DeepSeek-V3 template)."""
    return _compile(TOOLS_PROMPT).render(tools=tools)


def _compile(source: str):
    """The chat template environment transformers uses: sandboxed, trim_blocks and lstrip_blocks."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """ids arrive a few at a time; `add` returns the text they complete. Text is released only when the
    decoded window does not end in U+FFFD (a character still waiting for its remaining bytes)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding restarts here, so that spacing at the window's start is right
        self.read_offset = 0  # text up to here has been returned
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever is left, replacement characters included."""
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


# ---- training a tokenizer for a new model ----------------------------------------------------------------

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
# DeepSeek-V3's tool-call tokens, in its vocabulary's order
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END,
               TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP]
# ids 0..7 as before (BOS 0 and EOS 1 as V3), the tool tokens 8..16
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END, *TOOL_TOKENS]

# How `tools` are described to the model, at the end of the system prompt: DeepSeek-V3.1's layout (a "## Tools"
# section, one "### name" entry per function with its description and JSON-schema parameters, then the call
# format), with V3's call format (the `function` type and the arguments in a json code block). The official V3
# template does not print tools at all; vLLM's and SGLang's V3 tool templates describe them in the system prompt
# too, each in its own words. `describe_tools` renders this alone.
TOOLS_PROMPT = (
    "{{ '## Tools\\nYou can call these tools:\\n' }}"
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{{ '\\n### ' + f['name'] + '\\n' }}"
    "{% if f['description'] %}{{ 'Description: ' + f['description'] + '\\n' }}{% endif %}"
    "{{ '\\nParameters: ' }}{{ f['parameters'] | default({}) | tojson }}{{ '\\n' }}"
    "{% endfor %}"
    "{{ '\\nTo call tools, reply with <｜tool▁calls▁begin｜>, then each call as "
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜> (a new line "
    "between calls), then <｜tool▁calls▁end｜>. NAME is one of the tools above and ARGUMENTS a JSON object that "
    "follows its parameters.' }}"
)

# DeepSeek-V3's chat format: BOS, the system prompt (then the tools), then <｜User｜>... and
# <｜Assistant｜>...<｜end▁of▁sentence｜> turns. An assistant turn may end in tool calls:
#   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜>
#   (\n and more calls)<｜tool▁calls▁end｜><｜end▁of▁sentence｜>
# and the tool results follow it as <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>
# (\n and more results)<｜tool▁outputs▁end｜>, after which the assistant's next turn begins without a role token.
# This is the official V3 template's rendering, without its slips (it closes a single call with neither
# <｜tool▁calls▁end｜> nor EOS, opens only the conversation's first calls and first results, and drops the calls of
# a message that also has content): the token sequence of vLLM's and SGLang's V3 tool templates and of R1-0528's.
# Arguments are the JSON text of OpenAI's `function.arguments`, as the official template takes them.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='', calls=false, outputs=false) %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% if tools %}{% if ns.system %}{{ '\\n\\n' }}{% endif %}" + TOOLS_PROMPT + "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}{% set ns.calls = false %}{% set ns.outputs = false %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% else %}{{ '<｜Assistant｜>' }}{% endif %}"
    "{% set ns.outputs = false %}"
    "{% set ns.calls = message['tool_calls'] is not none and message['tool_calls'] | length > 0 %}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if ns.calls %}{{ '<｜tool▁calls▁begin｜>' }}{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n' "
    "+ call['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}{{ '<｜tool▁calls▁end｜>' }}{% endif %}"
    "{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if ns.outputs %}{{ '\\n<｜tool▁output▁begin｜>' }}"
    "{% elif ns.calls %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' }}"
    "{% else %}{{ raise_exception('a tool message must follow an assistant message with tool_calls') }}{% endif %}"
    "{% set ns.outputs = true %}{{ message['content'] + '<｜tool▁output▁end｜>' }}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def train_bpe(texts, vocab_size: int, min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Byte-level BPE (any text round-trips) with DeepSeek-V3's special tokens (ids 0..16: SPECIAL_TOKENS) and
    its chat format, tool calls included. BOS is added by the tokenizer.json post-processor, so transformers and dsv3 encode alike."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE}
    return Tokenizer(tok, config)
