"""The OpenAI API's shapes: requests (pydantic models that validate every field and say what is wrong),
errors (`{"error": {"message", "type", "param", "code"}}`), and the responses and stream chunks of
/v1/chat/completions and /v1/completions, built as plain dicts.

Supported beyond OpenAI, as vLLM spells them: `top_k` (0 or -1: no limit), `ignore_eos`, `cache_salt`
(requests share prefix-cache blocks only with requests of the same salt), `repetition_penalty`, `min_tokens` and
`stop_token_ids` (the openai client sends them in `extra_body`). Known OpenAI parameters this server does not implement (suffix,
best_of > n) are refused with a 400 when set to anything but their neutral value; unknown fields are ignored, as
vLLM does. Tool calling: `tools`, `tool_choice`, `parallel_tool_calls`, assistant messages with `tool_calls`
(content null) and `tool` messages with `tool_call_id` (the server's side is in api.py and tools.py).
`max_tokens: null` asks for the rest of the context (vLLM's reading). Text must be valid Unicode: JSON can spell a
lone surrogate ("\\ud800"), which no tokenizer can encode, and such a string is a 400 naming its field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..infer.sampling import MAX_BIAS, MAX_PENALTY, SamplingParams, TokenLogprob
from ..tokenizer import IncrementalDetokenizer, Tokenizer

MAX_STOP_TOKENS = 64  # stop_token_ids per request
MAX_STOP = 16  # OpenAI allows 4; lm-eval's generate tasks send their `until` strings and the EOS text, often more
# (vLLM sets no limit): 16 keeps a request's per-token stop check bounded
MAX_N = 128  # OpenAI's limit on choices per request
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 20 for chat, 5 for completions; vLLM allows 20 for both)
TOP_K_ALL = 1 << 31  # a top_k this large keeps every token of any vocabulary (and would overflow the engine's int64)


# ---- errors -------------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape. type: invalid_request_error (4xx caused by the request),
    rate_limit_exceeded (429), server_error (5xx)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # sent with the response (a 429's Retry-After)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's / FastAPI's error list -> one 400 naming the first field at fault (and how many more)."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if msg.startswith("Value error, "):  # our own validators' ValueError text
        msg = msg[len("Value error, "):]
    if e.get("type") == "missing":
        msg = "this field is required" if loc else "the request has no body: send a JSON object"
    elif e.get("type") == "model_attributes_type" and not loc:
        msg = "the request body must be a JSON object (sent with Content-Type: application/json)"
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, text, param=param, code="invalid_value" if param else "invalid_request")


# ---- requests -------------------------------------------------------------------------------------------------

def check_text(v: Any, where: str = "") -> Any:
    """v itself, if every string in it (nested in lists and dicts too) can be encoded as UTF-8; else a ValueError
    saying where the lone surrogate is."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where or 'the text '}has a lone surrogate (U+{ord(v[e.start]):04X}) at character "
                             f"{e.start}, which no encoding can write: text must be valid Unicode") from None
    elif isinstance(v, list):
        for i, x in enumerate(v):
            if not isinstance(x, int):  # token ids: nothing to check, and there may be many
                check_text(x, f"{where}item {i} ")
    elif isinstance(v, dict):
        for k, x in v.items():
            check_text(k, f"{where}a key ")
            check_text(x, f"{where}{k!r}: ")
    return v


class _Strict(BaseModel):
    # strict: "5" is not an int, 1 is not a bool (OpenAI refuses them too); extra fields are kept in
    # model_extra so that the server can log what it ignored
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = False


MAX_TOOLS = 128  # OpenAI's limit on functions per request
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: Any = "{}"  # JSON text of an object, as OpenAI sends it (an object is taken as its JSON)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"must be the JSON text of an object, not {text[:80]!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be the JSON text of an object, not {text[:80]!r}")
        return text


class ToolCallParam(_Strict):
    """A call in an assistant message of the conversation (one the model made earlier)."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_input(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": self.function.arguments}}


class FunctionDefinition(_Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def as_template_input(self) -> dict:
        """As transformers passes tools to a template: the definition with the fields that were given."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True, exclude={"strict"})}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string, or a list of {"type": "text", "text": ...} parts (checked below)
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant's calls (content may then be null)
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", "name", "tool_calls", "tool_call_id", mode="before")
    @classmethod
    def _encodable(cls, v: Any) -> Any:
        return check_text(v)

    @field_validator("content")
    @classmethod
    def _text(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            parts = []
            for i, part in enumerate(v):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"part {i} is {kind!r}: only text parts ({{'type': 'text', 'text': ...}}) "
                                     "are supported")
                parts.append(part["text"])
            return "".join(parts)
        raise ValueError(f"must be a string or a list of text parts, not {type(v).__name__}")

    @model_validator(mode="after")
    def _has_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages have tool_calls, not {self.role} ones")
        return self

    def as_template_input(self) -> dict:
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for the system role
        out = {"role": role, "content": self.content or ""}
        if self.tool_calls:  # content null when there is none: the official V3 template tells calls alone so
            out.update(content=self.content or None, tool_calls=[c.as_template_input() for c in self.tool_calls])
        if self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class _Sampling(_Strict):
    """The fields both endpoints share."""
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension: 0 or -1 keep every token
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: Any = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension: keep going past the end-of-sequence token
    cache_salt: str | None = Field(None, max_length=1024)  # extension: a prefix-cache namespace (one per tenant)
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # extension: 1 is off
    logit_bias: dict | None = None  # {"token id": bias in [-100, 100]}
    min_tokens: int | None = Field(None, ge=0)  # extension: no end of sequence or stop before this many tokens
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKENS)  # extension
    user: str | None = None

    @field_validator("model", "stop", "user", "cache_salt", mode="before")
    @classmethod
    def _encodable(cls, v: Any) -> Any:
        return check_text(v)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
            raise ValueError("must be a string or a list of strings")
        if not 1 <= len(stops) <= MAX_STOP or not all(stops):
            raise ValueError(f"must hold 1 to {MAX_STOP} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict[int, float] | None:
        """JSON's string keys -> token ids (their range in the vocabulary is the engine's check)."""
        if v is None:
            return None
        bias = {}
        for key, b in v.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"key {key!r} is not a token id (a string of digits, such as \"50256\")")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -MAX_BIAS <= b <= MAX_BIAS:
                raise ValueError(f"the bias of token {key} is {b!r}; it must be a number in [-100, 100]")
            bias[int(key)] = float(b)
        return bias

    @model_validator(mode="after")
    def _supported(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_new_tokens: int, choice: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, logits_processors: list | None = None) -> SamplingParams:
        """Choice j of n gets seed + j: the choices differ, and the request stays reproducible.
        logits_processors: this choice's own (a grammar's processor keeps the state of one output)."""
        top_k = self.top_k or 0
        if (self.min_tokens or 0) > max_new_tokens:
            raise APIError(400, f"min_tokens={self.min_tokens} is more than the {max_new_tokens} tokens this request "
                                "may generate (max_tokens, or the room left in the context)", param="min_tokens")
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else float(self.temperature),
                top_p=1.0 if self.top_p is None else float(self.top_p),
                top_k=top_k if 0 < top_k < TOP_K_ALL else 0, max_new_tokens=max_new_tokens, stop=self.stop,
                seed=None if self.seed is None else (self.seed + choice) % (1 << 64),
                ignore_eos=bool(self.ignore_eos), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                presence_penalty=float(self.presence_penalty or 0),
                frequency_penalty=float(self.frequency_penalty or 0),
                repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
                logit_bias=self.logit_bias or None, min_tokens=self.min_tokens or 0,
                stop_token_ids=list(self.stop_token_ids or []),
                logits_processors=list(logits_processors or []))
        except ValueError as e:  # the fields were checked above; the engine's own checks have the last word
            raise APIError(400, str(e)) from None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None  # false: at most one call per reply
    response_format: dict | None = None

    @field_validator("tools", "tool_choice", mode="before")
    @classmethod
    def _encodable_tools(cls, v: Any) -> Any:
        return check_text(v)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> str | dict | None:
        if v is None or v in ("none", "auto", "required"):
            return v
        fn = v.get("function") if isinstance(v, dict) else None
        if not (isinstance(v, dict) and v.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str)):
            raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}")
        return v

    @model_validator(mode="after")
    def _chat_rules(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError(f"tools: two functions are named {next(n for n in names if names.count(n) > 1)!r}")
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools (the functions the model may call)")
        if self.forced_tool is not None and self.forced_tool not in names:
            raise ValueError(f"tool_choice names the function {self.forced_tool!r}, which is not one of the tools "
                             f"({', '.join(names)})")
        if self.response_format is not None and not isinstance(self.response_format.get("type"), str):
            raise ValueError("response_format needs a 'type': text, json_object, json_schema, regex or grammar")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_mode(self) -> str:
        """none (no tools, or tool_choice "none"), auto (the default with tools), required, or named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, dict):
            return "named"
        return self.tool_choice or "auto"

    @property
    def forced_tool(self) -> str | None:
        """The function tool_choice names, if it names one."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None


class CompletionRequest(_Sampling):
    prompt: Any  # a string, a list of token ids, or a list of either (checked below)
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default; 0 only with echo (score the prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", "suffix", mode="before")
    @classmethod
    def _encodable_prompt(cls, v: Any) -> Any:  # a name of its own: the same name would replace _Sampling's
        return check_text(v)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> list[str | list[int]]:
        """-> a list of prompts, each a string or a list of token ids."""
        def is_ids(x):
            return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        if isinstance(v, str):
            return [v]
        if is_ids(v) and v:
            return [v]
        if isinstance(v, list) and v and all(isinstance(x, str) or (is_ids(x) and x) for x in v):
            return v
        raise ValueError("must be a string, a non-empty list of token ids, or a non-empty list of those")

    @model_validator(mode="after")
    def _completion_rules(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens may be 0 only with echo: true (to score the prompt)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported by this server")
        return self


# ---- responses ------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens the prefix cache supplied (as OpenAI reports them)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b is written as this printable character in BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """The bytes and text of single tokens, as logprobs report them: a byte-level BPE token's exact bytes, a
    special token's own spelling. A token holding part of a UTF-8 character is written as OpenAI writes it,
    "bytes:\\xe2\\x80", so that distinct tokens never share a name in top_logprobs."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers import decoders
        self.tok = tokenizer
        self.byte_level = isinstance(tokenizer.tok.decoder, decoders.ByteLevel)
        self.special = {i: t.content for i, t in tokenizer.tok.get_added_tokens_decoder().items()}
        self.cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        b = self.cache.get(token_id)
        if b is None:
            piece = self.special.get(token_id)
            if piece is not None:
                b = piece.encode()
            elif self.byte_level:
                piece = self.tok.tok.id_to_token(token_id) or ""
                b = bytes(_UNICODE_TO_BYTE[c] for c in piece) if all(c in _UNICODE_TO_BYTE for c in piece) \
                    else piece.encode()
            else:
                b = self.tok.decode([token_id], skip_special_tokens=False).encode()
            self.cache[token_id] = b
        return b

    def text(self, token_id: int) -> str:
        b = self.bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def chat_logprobs(tt: TokenText, lps: list[TokenLogprob]) -> list[dict]:
    """-> the `logprobs.content` list of a chat choice (or chunk)."""
    def entry(t: int, lp: float) -> dict:
        return {"token": tt.text(t), "logprob": lp, "bytes": list(tt.bytes(t))}

    return [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]} for x in lps]


class TextOffsets:
    """Where each token's text starts in a completion's text, as `logprobs.text_offset` reports it: the
    length of the text before the token, measured with the same incremental detokenisation as the engine's."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.offset = start

    def add(self, token_ids: list[int]) -> list[int]:
        out = []
        for t in token_ids:
            out.append(self.offset)
            self.offset += len(self.detok.add([t]))
        return out


def completion_logprobs(tt: TokenText, token_ids: list[int], lps: list[TokenLogprob | None],
                        offsets: list[int]) -> dict:
    """-> a completion choice's `logprobs`. top_logprobs holds the most likely tokens and the chosen one (so
    up to logprobs + 1 entries, as OpenAI); an echoed prompt's first token has None (nothing predicts it)."""
    token_lps, tops = [], []
    for t, x in zip(token_ids, lps):
        token_lps.append(None if x is None else x.logprob)
        if x is None:
            tops.append(None)
            continue
        top = {tt.text(i): lp for i, lp in x.top}
        top.setdefault(tt.text(t), x.logprob)
        tops.append(top)
    return {"tokens": [tt.text(t) for t in token_ids], "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


# ---- tokenizer endpoints (vLLM's /tokenize, /detokenize, /tokenizer_info) ----------------------------------

class TokenizeRequest(_Strict):
    """Either a text (`prompt`, BOS added as the model expects unless add_special_tokens is false) or chat
    `messages` rendered by the chat template (`add_generation_prompt`, as /v1/chat/completions renders them)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt (vLLM), unused for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @field_validator("prompt", "model", mode="before")
    @classmethod
    def _encodable(cls, v: Any) -> Any:
        return check_text(v)

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' (a string) or 'messages' (a chat), not both or neither")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]

    @field_validator("model", mode="before")
    @classmethod
    def _encodable(cls, v: Any) -> Any:
        return check_text(v)


def json_plain(v: Any) -> Any:
    """A tokenizer config with every AddedToken object ({"content": ..., "lstrip": ...}) as its string, as vLLM's
    /tokenizer_info writes them."""
    if isinstance(v, dict):
        if isinstance(v.get("content"), str) and ("__type" in v or "special" in v or "lstrip" in v):
            return v["content"]
        return {k: json_plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_plain(x) for x in v]
    return v
