"""Structured output: xgrammar, llguidance and outlines-core, the three maintained grammar libraries with a CPU
token-mask path, side by side on one V3-size byte-level tokenizer, to pick the one dsv3's engine uses.

The tokenizer: DeepSeek-V3's own tokenizer.json when `--tokenizer DIR` names a directory holding it; else a
byte-level BPE of V3's size made here, `--vocab` tokens (128,000 by default; V3's tokenizer has 128,815 with its
special tokens, its model 129,280 rows): dsv3.tokenizer.train_bpe on the built-in corpus (the standard library's
sources give it ~37.8K tokens at min_frequency 2, all that corpus yields), then synthetic merges, seeded: every
CJK Unified Ideograph with its two-byte prefix (V3's vocabulary holds most of them), then two-character CJK
words and pairs of trained words, until the size is reached. Token masks cost what the vocabulary's byte
strings make them cost, so its size and mix matter more than its merges' quality. The logits have V3's 129,280
rows: the padding rows past the tokenizer are masked too.

Per library, on the same tokens:
- setup: reading the tokenizer (once per engine);
- compile: one JSON schema to a reusable grammar (the library's cache off), mean and max over the schemas;
- per token, teacher-forced on valid instances of each schema (json.dumps with separators (",", ":") in the
  schema's property order, tokenised as the tokenizer does): computing the next-token bitmask, mean and p99,
  advancing the matcher by the token, and applying the bitmask to a row of logits (dsv3's apply_bitmask, the
  same code for all: it costs what the mask's pattern costs);
- exactness: the instances again, one token per character (valid continuations BPE would not choose, as a
  model may sample them): how many of them the mask leaves out (an exact mask: none);
- sampling: `--samples` outputs per schema drawn from random logits under the library's mask (Gaussian logits,
  tokens holding a closing quote, bracket or brace raised so that outputs end), each checked with
  `jsonschema` against the schema (`unfinished` if it reaches `--max-tokens` first); the mask's time while
  sampling is reported too (long random strings are where some libraries' masks cost most);
- JSON-schema features users hit: for each, a schema, valid instances that must be accepted (every token and
  then end of sequence) and invalid ones that must not.
All three are asked for compact JSON (no whitespace between tokens; one form, so that the instances mean the
same to each). The first line printed names the machine.

    python benchmarks/structured_output.py [--tokenizer DIR] [--vocab 128000] [--samples 8] [--max-tokens 256]
                                           [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from dsv3.data.corpus import builtin_corpus  # noqa: E402
from dsv3.infer.structured import _byte_level_chars, apply_bitmask, token_bytes  # noqa: E402
from dsv3.tokenizer import Tokenizer, train_bpe  # noqa: E402
from common import print_machine  # noqa: E402

V3_MODEL_VOCAB = 129280  # DeepSeek-V3's config.json vocab_size: the logits' rows

ADDRESS = {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
           "required": ["street", "city", "zip"], "additionalProperties": False}
SCHEMAS = {  # name -> (schema, valid instances)
    "person": ({"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "languages": {"type": "array", "items": {"enum": ["en", "zh", "fr", "de"]}, "minItems": 1},
        "address": ADDRESS},
        "required": ["name", "age", "email", "languages", "address"], "additionalProperties": False},
        [{"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.org", "languages": ["en", "fr"],
          "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"}},
         {"name": "Li Wei", "age": 29, "email": "li.wei@example.cn", "languages": ["zh"],
          "address": {"street": "88 Nanjing Road", "city": "Shanghai", "zip": "20000"}}]),
    "order": ({"type": "object", "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "quantity": {"type": "integer", "minimum": 1},
            "unit_price": {"type": "number", "minimum": 0}},
            "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}},
        "total": {"type": "number"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["order_id", "status", "items", "total", "note"], "additionalProperties": False},
        [{"order_id": "ORD-004211", "status": "paid", "items": [
            {"sku": "ABC-1234", "quantity": 2, "unit_price": 9.99},
            {"sku": "XYZ-0042", "quantity": 1, "unit_price": 120.5}], "total": 140.48, "note": None},
         {"order_id": "ORD-100000", "status": "shipped", "items": [
             {"sku": "QQQ-9999", "quantity": 12, "unit_price": 0.25}], "total": 3,
          "note": "leave it at the door, please"}]),
    "tool_call": ({"type": "object", "properties": {
        "name": {"enum": ["get_weather", "search_web", "send_email"]},
        "arguments": {"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["location", "unit", "days"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False},
        [{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius", "days": 3}},
         {"name": "send_email", "arguments": {"location": "Hangzhou", "unit": "fahrenheit", "days": 14}}]),
    "event": ({"type": "object", "properties": {
        "title": {"type": "string"}, "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"}, "all_day": {"type": "boolean"},
        "attendees": {"type": "array", "maxItems": 10, "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "optional": {"type": "boolean"}},
            "required": ["name", "optional"], "additionalProperties": False}}},
        "required": ["title", "start", "end", "all_day", "attendees"], "additionalProperties": False},
        [{"title": "Quarterly review", "start": "2025-03-01T09:00:00Z", "end": "2025-03-01T10:30:00Z",
          "all_day": False, "attendees": [{"name": "Grace", "optional": False}, {"name": "Alan", "optional": True}]},
         {"title": "Offsite", "start": "2025-06-10T00:00:00+08:00", "end": "2025-06-11T00:00:00+08:00",
          "all_day": True, "attendees": []}]),
    "tree": ({"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value", "children"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
        [{"value": 1, "children": [{"value": 2, "children": []}, {"value": 3, "children": [
            {"value": 4, "children": []}]}]}]),
    "json_object": ({"type": "object"},  # OpenAI's response_format json_object: any JSON object
                    [{"answer": 42, "reasons": ["short", "clear"], "meta": {"ok": True, "score": -1.5e-3}},
                     {"text": "a \"quoted\" word\nand a newline", "list": [[1, 2], [], {}], "none": None}]),
    "cjk_text": ({"type": "object", "properties": {
        "title": {"type": "string"}, "summary": {"type": "string", "maxLength": 200},
        "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
        "required": ["title", "summary", "keywords"], "additionalProperties": False},
        [{"title": "深度求索", "summary": "混合专家模型在训练和推理中都很高效。", "keywords": ["模型", "专家", "推理"]},
         {"title": "東京の天気", "summary": "明日は晴れ、最高気温は二十五度です。", "keywords": ["天気"]}]),
}

FEATURES = [  # (feature, schema, valid instances, invalid instances)
    ("required", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a", "b"], "additionalProperties": False},
     [{"a": 1, "b": 2}], [{"a": 1}, {"b": 2}]),
    ("optional properties", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                             "required": ["a"], "additionalProperties": False},
     [{"a": 1}, {"a": 1, "b": 2}], [{"b": 2}]),
    ("enum", {"type": "object", "properties": {"c": {"enum": ["red", "green", 3]}}, "required": ["c"],
              "additionalProperties": False},
     [{"c": "red"}, {"c": 3}], [{"c": "blue"}, {"c": "re"}]),
    ("const", {"type": "object", "properties": {"v": {"const": "v1"}}, "required": ["v"],
               "additionalProperties": False}, [{"v": "v1"}], [{"v": "v2"}]),
    ("nested objects", {"type": "object", "properties": {"p": {
        "type": "object", "properties": {"q": {"type": "object", "properties": {"r": {"type": "string"}},
                                               "required": ["r"], "additionalProperties": False}},
        "required": ["q"], "additionalProperties": False}}, "required": ["p"], "additionalProperties": False},
     [{"p": {"q": {"r": "x"}}}], [{"p": {"q": {}}}, {"p": {}}]),
    ("arrays minItems/maxItems", {"type": "object", "properties": {"xs": {
        "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}}, "required": ["xs"],
        "additionalProperties": False},
     [{"xs": [1, 2]}, {"xs": [1, 2, 3]}], [{"xs": [1]}, {"xs": []}, {"xs": [1, 2, 3, 4]}]),
    ("string pattern", {"type": "object", "properties": {"id": {"type": "string",
                                                                "pattern": "^[a-z]{3}-[0-9]{2}$"}},
                        "required": ["id"], "additionalProperties": False},
     [{"id": "abc-12"}], [{"id": "abcd-12"}, {"id": "ab-12"}, {"id": "abc-1x"}]),
    ("additionalProperties false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False},
     [{"a": 1}, {}], [{"a": 1, "z": 2}, {"z": 2}]),
    ("string length", {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}},
                       "required": ["s"], "additionalProperties": False},
     [{"s": "ab"}, {"s": "abcd"}], [{"s": "a"}, {"s": "abcde"}]),
    ("integer range", {"type": "object", "properties": {"m": {"type": "integer", "minimum": 1, "maximum": 12}},
                       "required": ["m"], "additionalProperties": False},
     [{"m": 1}, {"m": 12}], [{"m": 0}, {"m": 13}, {"m": 1.5}]),
    ("anyOf / nullable", {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
                          "required": ["v"], "additionalProperties": False},
     [{"v": 1}, {"v": None}], [{"v": "1"}, {"v": True}]),
    ("$defs / $ref (recursive)", SCHEMAS["tree"][0],
     [{"value": 1, "children": [{"value": 2, "children": [{"value": 3, "children": []}]}]}],
     [{"value": 1, "children": [{"value": 2}]}]),
    ("format date", {"type": "object", "properties": {"d": {"type": "string", "format": "date"}},
                     "required": ["d"], "additionalProperties": False},
     [{"d": "2024-02-29"}], [{"d": "2024-2-29"}, {"d": "yesterday"}]),
]


def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ---- the tokenizer -----------------------------------------------------------------------------------------

def v3_size_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """Byte-level BPE trained on the built-in corpus, then synthetic merges up to `vocab_size` (module docstring)."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = train_bpe((d.text for d in builtin_corpus()), vocab_size=vocab_size)
    spec = json.loads(tok.tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    byte_char = {b: c for c, b in _byte_level_chars().items()}
    enc = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731

    def add(a: str, b: str) -> None:
        if len(vocab) < vocab_size and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b])

    trained = len(vocab)
    cjk = [chr(c) for c in range(0x4E00, 0xA000)]
    for c in cjk:
        b = c.encode()
        add(enc(b[:1]), enc(b[1:2]))
        add(enc(b[:2]), enc(b[2:]))
    words = [w for w in vocab if w.isalpha() and len(w) >= 2]
    spaced = [w for w in vocab if w.startswith("Ġ") and w[1:].isalpha() and len(w) >= 3]
    rng = random.Random(seed)
    while len(vocab) < vocab_size:
        if rng.random() < 0.3:
            add(enc(rng.choice(cjk).encode()), enc(rng.choice(cjk).encode()))
        else:
            add(rng.choice(spaced), rng.choice(words))
    print(f"tokenizer: byte-level BPE, {trained:,} tokens trained on the built-in corpus + "
          f"{len(vocab) - trained:,} synthetic merges = {len(vocab):,}", flush=True)
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), tok.config)


# ---- the libraries, behind one small interface ---------------------------------------------------------------

class Library:
    """setup (the constructor) reads the tokenizer; compile(schema) -> a reusable grammar; matcher(grammar) -> one
    request's state; fill(m, bitmask) writes the next token's bitmask; accept(m, t) -> bool advances (False: not
    allowed, state unchanged or dead); done(m) -> whether the text so far is complete."""
    name = version = ""


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tok: Tokenizer, n_vocab: int, threads: int):
        import llguidance
        import llguidance.torch
        self.llg, self.lt_torch = llguidance, llguidance.torch
        self.version = llguidance.__version__ if hasattr(llguidance, "__version__") else _dist_version("llguidance")
        self.tokenizer = llguidance.LLTokenizer(tok.tok.to_str(), n_vocab=n_vocab, eos_token=tok.eos_token_id)

    def compile(self, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tokenizer, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, grammar):
        return grammar.deep_copy()

    def fill(self, m, bitmask):
        self.lt_torch.fill_next_token_bitmask(m, bitmask)

    def accept(self, m, t):
        return m.consume_token(t)

    def done(self, m):
        return m.is_accepting()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, n_vocab: int, threads: int):
        import xgrammar
        self.xgr = xgrammar
        self.version = xgrammar.__version__ if hasattr(xgrammar, "__version__") else _dist_version("xgrammar")
        vocab = [b if b is not None else b"" for b in token_bytes(tok)]  # empty: special, never matched
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=n_vocab,
                                      stop_token_ids=[tok.eos_token_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask)

    def accept(self, m, t):
        return m.accept_token(t)

    def done(self, m):
        return m.is_completed()


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tok: Tokenizer, n_vocab: int, threads: int):
        import outlines_core
        self.oc = outlines_core
        self.version = _dist_version("outlines_core")
        eos = tok.eos_token_id
        ids: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok)):
            if b is not None and i != eos:
                ids.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, ids)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), "")  # "": no whitespace
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, grammar):
        return self.oc.Guide(grammar)

    def fill(self, m, bitmask):
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def accept(self, m, t):
        try:
            m.advance(t, False)
            return True
        except ValueError:
            return False

    def done(self, m):
        return m.is_finished()


LIBRARIES = [XGrammar, LLGuidance, OutlinesCore]


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


# ---- measuring -----------------------------------------------------------------------------------------------

def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def teacher_forced(lib: Library, grammar, ids: list[int], bitmask,
                   applies: list[float] | None = None) -> tuple[list[float], list[float], bool]:
    """Walk `ids` under a fresh matcher: -> (mask times, accept times, all accepted and complete). With
    `applies`, also the time dsv3 takes to apply each mask to a row of logits."""
    m = lib.matcher(grammar)
    masks, accepts = [], []
    logits = torch.randn(bitmask.shape[1] * 32)
    for t in ids:
        t0 = time.perf_counter_ns()
        lib.fill(m, bitmask)
        t1 = time.perf_counter_ns()
        ok = lib.accept(m, t)
        t2 = time.perf_counter_ns()
        masks.append((t1 - t0) / 1e3)
        accepts.append((t2 - t1) / 1e3)
        if applies is not None:
            apply_bitmask(logits, bitmask[0], logits.shape[0])
            applies.append((time.perf_counter_ns() - t2) / 1e3)
        if not ok:
            return masks, accepts, False
    t0 = time.perf_counter_ns()
    lib.fill(m, bitmask)  # the last mask: end of sequence only
    masks.append((time.perf_counter_ns() - t0) / 1e3)
    return masks, accepts, lib.done(m)


def sample(lib: Library, grammar, tok: Tokenizer, closers: torch.Tensor, n_logits: int, max_tokens: int,
           gen: torch.Generator, bitmask) -> tuple[list[int] | None, list[float]]:
    """One output from random logits under the mask -> (token ids, None if unfinished; mask times)."""
    m = lib.matcher(grammar)
    out, times = [], []
    eos = tok.eos_token_id
    for _ in range(max_tokens):
        t0 = time.perf_counter_ns()
        lib.fill(m, bitmask)
        times.append((time.perf_counter_ns() - t0) / 1e3)
        logits = apply_bitmask(torch.randn(n_logits, generator=gen) * 2 + closers, bitmask[0], n_logits)
        t = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=gen))
        if t == eos:
            return out, times
        if not lib.accept(m, t):
            raise AssertionError(f"{lib.name} rejected token {t} its own mask allowed")
        out.append(t)
    return None, times


def check(schema, text: str) -> str | None:
    """None if `text` is JSON valid against `schema`, else why not."""
    import jsonschema
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = list(v.iter_errors(doc))
    return errors[0].message if errors else None


def masked_valid_tokens(lib: Library, grammar, ids: list[int], bitmask) -> int:
    """`ids`: a valid text in small pieces (one token per character, a tokenization BPE would not choose, as a
    model may sample): -> how many of them the mask left out. An exact mask leaves out none of them."""
    m = lib.matcher(grammar)
    missed = 0
    for t in ids:
        lib.fill(m, bitmask)
        missed += not (int(bitmask[0, t // 32]) >> (t % 32)) & 1
        if not lib.accept(m, t):
            raise AssertionError(f"{lib.name} refused a token of a valid text")
    return missed


def feature_support(lib: Library, tok: Tokenizer, bitmask) -> dict[str, str]:
    out = {}
    for feature, schema, valid, invalid in FEATURES:
        try:
            grammar = lib.compile(schema)
        except Exception as e:  # noqa: BLE001 - any library error is "unsupported"
            out[feature] = "compile error: " + " ".join(str(e).split())[:80]
            continue
        rejects = [compact(x) for x in valid
                   if not teacher_forced(lib, grammar, tok.encode(compact(x), add_special_tokens=False), bitmask)[2]]
        accepts = [compact(x) for x in invalid
                   if teacher_forced(lib, grammar, tok.encode(compact(x), add_special_tokens=False), bitmask)[2]]
        out[feature] = "yes" if not rejects and not accepts else "; ".join(
            [f"rejects valid {x}" for x in rejects] + [f"accepts invalid {x}" for x in accepts])
    return out


def measure(cls, tok: Tokenizer, args, closers: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    lib = cls(tok, args.logits, args.threads)
    r = {"library": lib.name, "version": lib.version, "setup_s": time.perf_counter() - t0, "compile_ms": {},
         "mask_us": [], "accept_us": [], "sample_mask_us": [], "valid": 0, "invalid": [], "unfinished": 0,
         "samples": 0, "unsupported_schemas": {}, "rejected_instances": [], "apply_us": [],
         "char_tokens": 0, "char_tokens_masked": 0}
    print(f"{lib.name} {lib.version}: setup {r['setup_s']:.2f} s", flush=True)
    bitmask = torch.zeros(1, (args.logits + 31) // 32, dtype=torch.int32)  # the libraries mask the padding
    gen = torch.Generator().manual_seed(args.seed)
    for name, (schema, instances) in SCHEMAS.items():
        t = time.perf_counter()
        try:
            grammar = lib.compile(schema)
        except Exception as e:  # noqa: BLE001
            r["unsupported_schemas"][name] = " ".join(str(e).split())[:120]
            print(f"  {name}: compile error: {r['unsupported_schemas'][name]}", flush=True)
            continue
        r["compile_ms"][name] = (time.perf_counter() - t) * 1e3
        for x in instances:
            masks, accepts, ok = teacher_forced(lib, grammar, tok.encode(compact(x), add_special_tokens=False),
                                                bitmask, r["apply_us"])
            r["mask_us"] += masks
            r["accept_us"] += accepts
            if not ok:
                r["rejected_instances"].append(f"{name}: {compact(x)}")
                continue
            chars = [i for c in compact(x) for i in tok.encode(c, add_special_tokens=False)]
            r["char_tokens"] += len(chars)
            r["char_tokens_masked"] += masked_valid_tokens(lib, grammar, chars, bitmask)
        for _ in range(args.samples):
            ids, times = sample(lib, grammar, tok, closers, args.logits, args.max_tokens, gen, bitmask)
            r["sample_mask_us"] += times
            r["samples"] += 1
            if ids is None:
                r["unfinished"] += 1
                continue
            why = check(schema, tok.decode(ids))
            if why is None:
                r["valid"] += 1
            else:
                r["invalid"].append(f"{name}: {tok.decode(ids)!r}: {why}")
        print(f"  {name}: compile {r['compile_ms'][name]:.1f} ms", flush=True)
    r["features"] = feature_support(lib, tok, bitmask)
    return r


def closer_bias(tok: Tokenizer, n_logits: int, bias: float) -> torch.Tensor:
    """+bias on the tokens holding a closing quote, bracket or brace, so that random outputs end."""
    out = torch.zeros(n_logits)
    for i, b in enumerate(token_bytes(tok)):
        if b is not None and any(c in b for c in b'"]}'):
            out[i] = bias
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="a directory with DeepSeek-V3's tokenizer.json (default: build one, "
                   "see the module docstring)")
    p.add_argument("--vocab", type=int, default=128000, help="tokens in the built tokenizer")
    p.add_argument("--logits", type=int, default=V3_MODEL_VOCAB, help="rows of the logits (the model's vocab)")
    p.add_argument("--samples", type=int, default=8, help="random outputs per schema and library")
    p.add_argument("--max-tokens", type=int, default=256, help="an output this long without ending is unfinished")
    p.add_argument("--bias", type=float, default=8.0, help="logit raise of closing tokens while sampling")
    p.add_argument("--threads", type=int, default=1, help="threads a library may use to compile (xgrammar)")
    p.add_argument("--libraries", default=",".join(c.name for c in LIBRARIES), help="comma-separated subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = print_machine()
    tok = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else v3_size_tokenizer(args.vocab, args.seed)
    if args.logits < tok.vocab_size:
        p.error(f"--logits {args.logits} is smaller than the tokenizer's {tok.vocab_size} tokens")
    closers = closer_bias(tok, args.logits, args.bias)
    wanted = args.libraries.split(",")
    results = [measure(cls, tok, args, closers) for cls in LIBRARIES if cls.name in wanted]

    print(f"\ntokenizer {tok.vocab_size:,} tokens, logits {args.logits:,} rows")
    print("| library | setup s | compile ms mean / max | mask us mean / p99 | advance us mean | "
          "mask us while sampling mean / p99 | applying it (dsv3) us mean | valid tokens masked | "
          "sampled outputs valid | features |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = list(r["compile_ms"].values())
        feats = sum(v == "yes" for v in r["features"].values())
        print(f"| {r['library']} {r['version']} | {r['setup_s']:.2f} | "
              f"{statistics.mean(c):.1f} / {max(c):.1f} | {statistics.mean(r['mask_us']):.0f} / "
              f"{p99(r['mask_us']):.0f} | {statistics.mean(r['accept_us']):.0f} | "
              f"{statistics.mean(r['sample_mask_us']):.0f} / {p99(r['sample_mask_us']):.0f} | "
              f"{statistics.mean(r['apply_us']):.0f} | {r['char_tokens_masked']} / {r['char_tokens']} | "
              f"{r['valid']} / {r['samples']} ({r['unfinished']} unfinished, {len(r['invalid'])} invalid) | "
              f"{feats} / {len(FEATURES)} |")
    print("\ncompile ms per schema:")
    print("| schema | " + " | ".join(r["library"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in SCHEMAS:
        print(f"| {name} | " + " | ".join(f"{r['compile_ms'][name]:.1f}" if name in r["compile_ms"]
                                          else "error" for r in results) + " |")
    print("\nJSON-schema features (yes: valid instances accepted, invalid ones rejected):")
    print("| feature | " + " | ".join(r["library"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for feature, *_ in FEATURES:
        print(f"| {feature} | " + " | ".join(r["features"][feature] for r in results) + " |")
    for r in results:
        for what in ("unsupported_schemas", "rejected_instances", "invalid"):
            if r[what]:
                print(f"{r['library']} {what}: {r[what]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "tokenizer_vocab": tok.vocab_size, "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
