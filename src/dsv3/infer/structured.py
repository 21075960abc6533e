"""Structured output: OpenAI's `response_format` as a per-request logits processor over a grammar matcher.

    make = compile_response_format({"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
                                   llm.tokenizer, eos_token_ids=llm.eos_token_ids)
    params = SamplingParams(logits_processors=[make()])  # one processor per request

`compile_response_format` turns a response format into a compiled grammar (cached per tokenizer by its
canonical JSON, an LRU) and returns a factory; each call of the factory gives a fresh processor
`processor(prompt_ids, output_ids, logits (V,)) -> logits (V,)` with every token the grammar does not allow
next at -inf. Accepted formats: `{"type": "json_object"}` (any JSON object), `{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}` (or a bare schema as `json_schema`), and, because the library
makes them free, `{"type": "regex", "regex": ...}` and `{"type": "grammar", "grammar": <EBNF>}` (vLLM's
guided_regex / guided_grammar); `{"type": "text"}` is no constraint (None).

The output is JSON in one form: json.dumps's separators (", " and ": "), no other whitespace, properties in
the schema's order, none the schema does not name (OpenAI's strict mode, and xgrammar's default).
Free whitespace would let a model spend its tokens on spaces and newlines without end (vLLM has a switch to
turn it off for that reason), and json.dumps's form is the one most JSON in training text has.

The processor depends on its arguments only (the engine calls it for speculative draft rows that may be
rejected): it keeps a matcher in step with `output_ids`, advancing over tokens it has not seen and rolling
back where `output_ids` is shorter or differs (a verified row j sees output + drafts[:j], then only a prefix
is accepted). A history the grammar rejects (a draft that verification will reject too, since its mask
gave that token no probability) leaves end-of-sequence alone allowed; so does a complete grammar. Rows past
the tokenizer's vocabulary (the model's padding) are always masked.

The library is xgrammar, picked by benchmarks/structured_output.py against llguidance and outlines-core on
a V3-size tokenizer (figures in benchmarks/RESULTS.md, "Structured output"):
- its masks cost a quarter to a third of llguidance's per token, in the mean and at the 99th percentile
  (applying a mask to 129K logits costs more than either's mean);
- they are exact: a token is allowed iff its bytes keep the text a prefix of a valid output, whatever the
  tokenization (llguidance leaves out about a third of valid non-canonical tokens, allowing only the
  canonical tokenization where the grammar forces the bytes);
- its rollback is unlimited, which speculative verification needs;
- it handled every JSON-schema feature of the benchmark, and every sampled output was valid.
Its cost is a compile per new schema (tens of ms on one thread, where llguidance defers its work to the
first masks), paid once per schema thanks to the cache. outlines-core took seconds to compile, ignored
integer bounds and let invalid outputs through. xgrammar brings transformers and triton along, so it is
the `structured` extra (`pip install 'dsv3[structured]'`), imported when first needed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept per tokenizer (a compiled JSON schema is tens to hundreds of KB)
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[07:22:04] /project/cpp/x.cc:94: " prefix


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ImportError("structured output (response_format) needs xgrammar: pip install 'dsv3[structured]' "
                          "(or pip install xgrammar)") from None
    return xgrammar


# ---- the tokenizer's vocabulary as bytes -------------------------------------------------------------------

def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte.
    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100 onwards, in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for, None for special tokens (which are never text). The tokenizer must be
    byte-level BPE (DeepSeek-V3's, and every tokenizer `dsv3.tokenizer.train_bpe` makes): a ValueError names
    another kind."""
    spec = json.loads(tokenizer.tok.to_str())
    decoder = (spec.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise ValueError(f"structured output needs a byte-level BPE tokenizer (tokenizer.json decoder ByteLevel); "
                         f"this one's decoder is {decoder!r}")
    chars = _byte_level_chars()
    out: list[bytes | None] = [None] * tokenizer.vocab_size
    added = {t["id"]: t for t in spec.get("added_tokens", [])}  # may be in the model's vocab too
    for text, i in spec["model"]["vocab"].items():
        if i not in added:
            out[i] = bytes(chars[c] for c in text)
    for i, t in added.items():
        out[i] = None if t.get("special") else t["content"].encode()
    return out


# ---- response formats ----------------------------------------------------------------------------------------

def parse_response_format(response_format: dict) -> tuple[str, object] | None:
    """An OpenAI response_format -> (kind, spec): ("json_schema", schema), ("regex", pattern) or ("grammar",
    EBNF); None for {"type": "text"}. json_object is the schema {"type": "object"}. A ValueError names what is
    wrong."""
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, not {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", {"type": "object"}
    if kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise ValueError("response_format.json_schema must be an object: {\"name\": ..., \"schema\": {...}, "
                             "\"strict\": true} or a JSON schema")
        if "schema" in js or "name" in js:  # OpenAI's wrapper; else the schema itself
            if not isinstance(js.get("name", ""), str):
                raise ValueError(f"response_format.json_schema.name must be a string, not {js['name']!r}")
            if not isinstance(js.get("strict", False), (bool, type(None))):
                raise ValueError(f"response_format.json_schema.strict must be a boolean, not {js['strict']!r}")
            js = js.get("schema", {"type": "object"})  # OpenAI's schema is optional: any object then
        if not isinstance(js, dict):
            raise ValueError(f"response_format.json_schema.schema must be a JSON schema object, not {js!r}")
        return "json_schema", js
    if kind in ("regex", "grammar"):
        spec = response_format.get(kind)
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"response_format of type {kind!r} needs a non-empty string {kind!r}")
        return kind, spec
    raise ValueError(f"response_format.type must be 'text', 'json_object', 'json_schema', 'regex' or 'grammar', "
                     f"not {kind!r}")


def canonical(kind: str, spec: object) -> str:
    """The cache key: compact JSON. Key order is kept, not sorted: it decides the order properties are written."""
    return kind + ":" + json.dumps(spec, separators=(",", ":"), ensure_ascii=False)


class GrammarCompiler:
    """Compiles response formats for one tokenizer, keeping the last `cache_size` compiled grammars by their
    canonical JSON. Safe to call from several threads (a server's request handlers)."""

    def __init__(self, tokenizer, cache_size: int = DEFAULT_CACHE_SIZE, threads: int | None = None):
        xgr = _xgrammar()
        self.tokens = [b if b is not None else b"" for b in token_bytes(tokenizer)]  # b"": special, never text
        self.vocab_size = len(self.tokens)
        info = xgr.TokenizerInfo(self.tokens, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                 stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                 else None)
        threads = threads or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else os.cpu_count() or 1)
        # our own LRU instead of xgrammar's cache, which is unbounded by default
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.cache: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def compile(self, kind: str, spec: object):
        """-> an xgrammar CompiledGrammar; a ValueError carries the library's reason for refusing the spec."""
        key = canonical(kind, spec)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        try:
            if kind == "json_schema":
                grammar = xgr_grammar().from_json_schema(json.dumps(spec), any_whitespace=False, strict_mode=True)
                compiled = self.compiler.compile_grammar(_mend_ebnf(str(grammar)))
            elif kind == "regex":
                grammar = xgr_grammar().from_regex(spec)
                compiled = self.compiler.compile_grammar(_mend_ebnf(str(grammar)))
            elif kind == "grammar":
                compiled = self.compiler.compile_grammar(spec)
            else:
                raise ValueError(f"unknown grammar kind {kind!r}")
        except RuntimeError as e:  # xgrammar's errors for a schema, regex or grammar it cannot use
            what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}[kind]
            raise ValueError(f"response_format: the {what} is not supported: "
                             f"{_ERROR_PREFIX.sub('', str(e)).strip()}") from None
        with self.lock:
            self.cache[key] = compiled
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled


# Two slips of xgrammar 0.2.9's JSON and regex grammars, mended in the EBNF text before it is compiled:
# - a length-bounded JSON string (maxLength, minLength) is written as characters from [^"\\\r\n], which lets a
#   raw control character (U+0000-U+001F) through: not JSON (json.loads refuses "\x04"). Its unbounded strings
#   exclude them; the bounded ones are given the same class here (escapes stay unavailable there, as in its rule).
# - its character classes are over code points, and a negated class (or the regex "." = [\0-\U0010ffff]) takes
#   the UTF-16 surrogates U+D800-U+DFFF too, whose 3-byte forms (ED A0 80..ED BF BF) are not UTF-8: a model
#   may spell one with byte tokens, and the text then decodes to three U+FFFD (a 6-character string that counts
#   as one under maxLength). Every negated class here also excludes the surrogates, and "." is everything else.
_BOUNDED_STRING_CHARS = r'[^\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\\r\n]'
_ANY_CHAR, _ANY_SCALAR = r"[\0-\U0010ffff]", r"[\0-\ud7ff\ue000-\U0010ffff]"
_SURROGATES = r"\ud800-\udfff"


def _mend_ebnf(ebnf: str) -> str:
    """The EBNF text with both slips mended (see above); quoted literals are left as they are."""
    out, i, n = [], 0, len(ebnf)
    while i < n:
        c = ebnf[i]
        if c in "\"[":  # a literal "..." or a class [...]: copied whole (backslash escapes skipped)
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and ebnf[j] != close:
                j += 2 if ebnf[j] == "\\" else 1
            token = ebnf[i:j + 1]
            if c == "[":
                if token == _BOUNDED_STRING_CHARS:
                    token = _JSON_STRING_CHARS
                if token == _ANY_CHAR:
                    token = _ANY_SCALAR
                elif token.startswith("[^") and _SURROGATES not in token:
                    token = token[:-1] + _SURROGATES + "]"
            out.append(token)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def xgr_grammar():
    return _xgrammar().Grammar


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its GrammarCompiler
_compilers_lock = threading.Lock()


def grammar_compiler(tokenizer) -> GrammarCompiler:
    """The tokenizer's GrammarCompiler, made on first use (reading a V3-size vocabulary takes about a second)."""
    with _compilers_lock:
        comp = _compilers.get(tokenizer)
        if comp is None:
            comp = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return comp


@dataclass(frozen=True)
class ResponseFormat:
    """A compiled response format: call it for one request's logits processor."""
    compiled: object  # xgrammar CompiledGrammar
    vocab_size: int  # the tokenizer's; logits rows past it are masked
    eos_token_ids: tuple[int, ...]

    def __call__(self) -> "GrammarLogitsProcessor":
        return GrammarLogitsProcessor(self.compiled, self.vocab_size, self.eos_token_ids)


def compile_response_format(response_format: dict, tokenizer, eos_token_ids: Collection[int] | None = None,
                            compiler: GrammarCompiler | None = None) -> ResponseFormat | None:
    """An OpenAI response_format -> a factory of logits processors (None for {"type": "text"}). eos_token_ids:
    the tokens that end an output (the engine's `LLM.eos_token_ids`; default the tokenizer's EOS); compiler: a
    GrammarCompiler of this tokenizer (default one shared per tokenizer). ValueError for a bad or unsupported
    format, ImportError (naming the pip install) without xgrammar."""
    parsed = parse_response_format(response_format)
    if parsed is None:
        return None
    eos = sorted(eos_token_ids) if eos_token_ids else [tokenizer.eos_token_id]
    if not eos or eos[0] is None:
        raise ValueError("structured output needs an end-of-sequence token: the tokenizer has none; pass "
                         "eos_token_ids")
    comp = compiler or grammar_compiler(tokenizer)
    return ResponseFormat(comp.compile(*parsed), comp.vocab_size, tuple(eos))


# ---- the processor -------------------------------------------------------------------------------------------

def allowed_tokens(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """An int32 bitmask (ceil(n / 32),), bit j of word i for token 32i + j -> bool (n,)."""
    assert sys.byteorder == "little", "the bitmask's words are read as little-endian bytes"
    return torch.from_numpy(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:n].view(np.bool_))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """logits (V,) with every token whose bit is clear, and every row from n on, set to -inf (a new tensor)."""
    allowed = torch.zeros(logits.shape[0], dtype=torch.bool)
    allowed[:n] = allowed_tokens(bitmask, n)
    return torch.where(allowed.to(logits.device, non_blocking=True), logits, float("-inf"))


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix: one C-speed comparison when one list extends the other (each
    decoding step), a binary search of slice comparisons otherwise (a rollback)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class GrammarLogitsProcessor:
    """One request's processor: fn(prompt_ids, output_ids, logits (V,)) -> logits (V,) (module docstring). The
    prompt is not constrained. Shared by several requests it stays right (it re-syncs to each history) but
    replays: make one per request."""

    def __init__(self, compiled, vocab_size: int, eos_token_ids: Collection[int]):
        xgr = _xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(eos_token_ids))
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.consumed: list[int] = []  # the tokens the matcher has accepted, a prefix of the last history
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def sync(self, output_ids: list[int]) -> bool:
        """Bring the matcher to `output_ids`; -> whether the grammar allows all of it (else the matcher stops
        at the longest prefix it allows)."""
        k = common_prefix(self.consumed, output_ids)
        if k < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - k)
            del self.consumed[k:]
        for t in output_ids[k:]:
            # nothing follows end of sequence (drafts past it): refused here, as xgrammar would, but quietly
            if self.matcher.is_terminated() or not self.matcher.accept_token(t):
                return False
            self.consumed.append(t)
        return True

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] < self.vocab_size:
            raise ValueError(f"the logits have {logits.shape[0]} rows, fewer than the tokenizer's "
                             f"{self.vocab_size} tokens")
        if self.sync(list(output_ids)) and not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(self.bitmask)
            return apply_bitmask(logits, self.bitmask[0], self.vocab_size)
        out = torch.full_like(logits, float("-inf"))  # a rejected or ended history: end of sequence only
        out[self.eos_token_ids] = logits[self.eos_token_ids]
        return out
