"""Structured output: the processor's masks against a brute-force reference (a token is allowed iff its bytes
keep the text a prefix of some schema-valid JSON in the form the module writes; end of sequence iff the text is
complete), rollback and replay against a fresh processor on random histories, EOS only once complete, the
bitmask and prefix helpers against plain loops, response_format parsing and the cache, and a tiny model's
sampled generation through the engine (with and without MTP speculation) always valid."""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
import sys

import pytest
import torch

pytest.importorskip("xgrammar")

from dsv3.infer import LLM, SamplingParams  # noqa: E402
from dsv3.infer.structured import (GrammarCompiler, allowed_tokens, apply_bitmask, common_prefix,  # noqa: E402
                                   compile_response_format, parse_response_format, token_bytes)
from dsv3.tokenizer import train_bpe  # noqa: E402

from conftest import random_model, tiny_config  # noqa: E402

# A schema whose valid documents can be listed: every feature the reference has to cover, each finite.
SCHEMA = {"type": "object", "properties": {
    "name": {"enum": ["ab", "é", "a\"b"]},
    "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 1, "maximum": 12},
    "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "minItems": 1, "maxItems": 2},
    "code": {"type": "string", "pattern": "^[ab]{1,2}$"},
    "inner": {"type": "object", "properties": {"v": {"type": "null"}, "w": {"const": 7}}, "required": ["v"],
              "additionalProperties": False},
    "opt": {"anyOf": [{"const": 0}, {"type": "null"}]}},
    "required": ["name", "ok", "n", "tags", "code", "inner"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
PAD = 13  # logits rows past the tokenizer's vocabulary (the model's padding)


def instances(schema: dict) -> list:
    """Every value valid against `schema` (the subset of JSON schema SCHEMA uses; strings by pattern over a, b)."""
    if "enum" in schema:
        return list(schema["enum"])
    if "const" in schema:
        return [schema["const"]]
    if "anyOf" in schema:
        return [v for s in schema["anyOf"] for v in instances(s)]
    kind = schema["type"]
    if kind == "boolean":
        return [False, True]
    if kind == "null":
        return [None]
    if kind == "integer":
        return list(range(schema["minimum"], schema["maximum"] + 1))
    if kind == "string":
        words = ("".join(w) for n in range(4) for w in itertools.product("ab", repeat=n))
        return [w for w in words if re.fullmatch(schema["pattern"].strip("^$"), w)]
    if kind == "array":
        items = instances(schema["items"])
        return [list(x) for n in range(schema["minItems"], schema["maxItems"] + 1)
                for x in itertools.product(items, repeat=n)]
    assert kind == "object", schema
    options = []  # per property: its values, with "absent" for an optional one
    for name, sub in schema["properties"].items():
        vals = [(name, v) for v in instances(sub)]
        options.append(vals if name in schema.get("required", []) else vals + [None])
    return [dict(p for p in combo if p is not None) for combo in itertools.product(*options)]


class Reference:
    """Brute force over the listed documents, written as the module writes JSON (json.dumps's separators,
    properties in the schema's order)."""

    def __init__(self, schema: dict, tokens: list[bytes | None], eos: set[int]):
        self.docs = sorted({json.dumps(v, ensure_ascii=False).encode() for v in instances(schema)})
        self.complete = set(self.docs)
        self.tokens, self.eos = tokens, eos

    def is_prefix(self, text: bytes) -> bool:
        i = bisect.bisect_left(self.docs, text)
        return i < len(self.docs) and self.docs[i].startswith(text)

    def allowed(self, text: bytes) -> set[int]:
        out = {t for t, b in enumerate(self.tokens) if b and self.is_prefix(text + b)}
        return out | self.eos if text in self.complete else out


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE trained on documents of SCHEMA's form (so that tokens span keys, quotes and separators),
    with text around them."""
    rng = random.Random(0)
    docs = instances(SCHEMA)
    corpus = [json.dumps(rng.choice(docs), ensure_ascii=False) for _ in range(300)]
    corpus += ["the cat sat on the mat; naïve café, 1234567890 {}[]", '{"key": [1, 2.5e-3, true, null]}'] * 20
    return train_bpe(corpus, vocab_size=420)


def allowed_by(processor, ids: list[int], n_logits: int) -> set[int]:
    out = processor([5, 6], ids, torch.zeros(n_logits))
    return set(torch.isfinite(out).nonzero().flatten().tolist())


def walk(processor, ref: Reference, tok, seed: int, check: bool = True) -> list[int]:
    """Sample a document token by token from the reference's allowed set (end of sequence once complete),
    asserting at every state that the processor allows exactly that set. -> the tokens, EOS left out."""
    rng = random.Random(seed)
    ids: list[int] = []
    text = b""
    while True:
        want = ref.allowed(text)
        if check:
            assert allowed_by(processor, ids, tok.vocab_size + PAD) == want, (text, ids)
        if want & ref.eos:
            assert want == ref.eos, "a complete document admits nothing but end of sequence"
            return ids
        t = rng.choice(sorted(want))
        ids.append(t)
        text += ref.tokens[t]


@pytest.mark.parametrize("seed", range(4))
def test_masks_equal_the_brute_force_reference(tok, seed):
    tokens = token_bytes(tok)
    eos = {tok.eos_token_id}
    ref = Reference(SCHEMA, tokens, eos)
    processor = compile_response_format(FORMAT, tok)()
    ids = walk(processor, ref, tok, seed)
    doc = json.loads(tok.decode(ids))
    assert json.dumps(doc, ensure_ascii=False).encode() in ref.complete


def test_complete_allows_only_the_eos_tokens(tok):
    eos = {tok.eos_token_id, 4}
    ref = Reference(SCHEMA, token_bytes(tok), eos)
    processor = compile_response_format(FORMAT, tok, eos_token_ids=eos)()
    ids = walk(processor, ref, tok, seed=7)  # checks every state, the last: exactly `eos`
    assert allowed_by(processor, ids, tok.vocab_size + PAD) == eos
    logits = torch.randn(tok.vocab_size + PAD)
    out = processor([], ids + [tok.eos_token_id], logits)  # past the end (ignore_eos): still end only
    assert torch.equal(out[sorted(eos)], logits[sorted(eos)]) and torch.isfinite(out).sum() == len(eos)


def test_rollback_and_replay_equal_a_fresh_processor(tok):
    """Histories drawn at random (shorter, longer, from other documents, with a token the grammar rejects):
    the processor that has seen all the others answers each as a new processor does."""
    make = compile_response_format(FORMAT, tok)
    ref = Reference(SCHEMA, token_bytes(tok), {tok.eos_token_id})
    docs = [walk(None, ref, tok, seed, check=False) for seed in range(6)]
    rng = random.Random(0)
    processor = make()
    n = tok.vocab_size + PAD
    for step in range(60):
        ids = list(rng.choice(docs))[:rng.randint(0, 40)]
        if step % 5 == 4:  # a draft the grammar rejects, and maybe more tokens after it
            ids += [rng.choice([t for t in range(8, tok.vocab_size) if t not in ref.allowed(b"".join(
                ref.tokens[i] for i in ids))])] + ids[:rng.randint(0, 2)]
        logits = torch.randn(n)
        assert torch.equal(processor([], ids, logits), make()([], ids, logits)), ids


def test_a_rejected_history_allows_only_eos_and_the_processor_recovers(tok):
    make = compile_response_format(FORMAT, tok)
    processor = make()
    ids = tok.encode('{"name": "ab", "ok": true', add_special_tokens=False)
    bad = tok.encode("}", add_special_tokens=False)  # n, tags, code and inner are required
    assert allowed_by(processor, ids + bad, tok.vocab_size) == {tok.eos_token_id}
    assert allowed_by(processor, ids, tok.vocab_size) == allowed_by(make(), ids, tok.vocab_size)
    assert tok.encode(",", add_special_tokens=False)[0] in allowed_by(processor, ids, tok.vocab_size)


def test_padding_rows_are_masked_and_short_logits_refused(tok):
    processor = compile_response_format({"type": "json_object"}, tok)()
    out = processor([], [], torch.zeros(tok.vocab_size + PAD))
    assert torch.isinf(out[tok.vocab_size:]).all() and torch.isfinite(out[:tok.vocab_size]).any()
    with pytest.raises(ValueError, match="fewer than the tokenizer's"):
        processor([], [], torch.zeros(tok.vocab_size - 1))


def test_json_object_samples_are_json_objects(tok):
    """Random logits, closing tokens raised so that outputs end: every finished output is a JSON object."""
    tokens = token_bytes(tok)
    closers = torch.tensor([3.0 if b and any(c in b for c in b'"]}') else 0.0 for b in tokens])
    make = compile_response_format({"type": "json_object"}, tok)
    g = torch.Generator().manual_seed(0)
    finished = 0
    for _ in range(8):
        processor, ids = make(), []
        for _ in range(120):
            logits = processor([], ids, torch.randn(len(tokens), generator=g) + closers)
            t = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=g))
            if t == tok.eos_token_id:
                assert isinstance(json.loads(tok.decode(ids)), dict)
                finished += 1
                break
            ids.append(t)
    assert finished >= 4


# ---- helpers against plain loops ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 415])
def test_allowed_tokens_and_apply_bitmask_equal_a_bit_loop(n):
    g = torch.Generator().manual_seed(n)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, ((n + 31) // 32,), dtype=torch.int32, generator=g)
    want = torch.tensor([bool((int(words[i // 32]) >> (i % 32)) & 1) for i in range(n)])
    assert torch.equal(allowed_tokens(words, n), want)
    logits = torch.randn(n + 5, generator=g)
    out = apply_bitmask(logits, words, n)
    ref = logits.clone()
    for i in range(n + 5):
        if i >= n or not want[i]:
            ref[i] = float("-inf")
    assert torch.equal(out, ref)


def test_common_prefix_equals_a_loop():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randint(0, 3) for _ in range(rng.randint(0, 30))]
        b = a[:rng.randint(0, len(a))] + [rng.randint(0, 3) for _ in range(rng.randint(0, 5))]
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        assert common_prefix(a, b) == k == common_prefix(b, a)


# ---- response_format -------------------------------------------------------------------------------------------

def test_response_formats_parse_and_bad_ones_are_named():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ("json_schema", {"type": "object"})
    wrapped = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert parse_response_format(wrapped) == ("json_schema", schema)
    assert parse_response_format({"type": "json_schema", "json_schema": schema}) == ("json_schema", schema)
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "any"}}) == \
        ("json_schema", {"type": "object"})
    assert parse_response_format({"type": "regex", "regex": "[0-9]+"}) == ("regex", "[0-9]+")
    for bad, match in [("json", "must be an object"), ({"type": "xml"}, "response_format.type must be"),
                       ({"type": "json_schema"}, "json_schema must be an object"),
                       ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name must be a string"),
                       ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}}, "schema must be a JSON"),
                       ({"type": "regex"}, "needs a non-empty string 'regex'")]:
        with pytest.raises(ValueError, match=match):
            parse_response_format(bad)


def test_unsupported_specs_are_value_errors_with_the_reason(tok):
    for rf, match in [({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, 'Unsupported type "foo"'),
                      ({"type": "regex", "regex": "("}, "regex is not supported: Regex parsing error"),
                      ({"type": "grammar", "grammar": "root ::= "}, "grammar is not supported")]:
        with pytest.raises(ValueError, match=match) as e:
            compile_response_format(rf, tok)
        assert "/project/" not in str(e.value)


def test_regex_and_grammar_formats_constrain(tok):
    digit = {i for i, b in enumerate(token_bytes(tok)) if b and b.isdigit()}
    for rf in ({"type": "regex", "regex": "[0-9]{1,3}"}, {"type": "grammar", "grammar": "root ::= [0-9] [0-9]?"}):
        processor = compile_response_format(rf, tok)()
        first = allowed_by(processor, [], tok.vocab_size)
        assert first and first <= digit


STRINGS = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}, "t": {"type": "string"}},
           "required": ["s", "t"], "additionalProperties": False}


@pytest.mark.parametrize("rf, prefix", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": STRINGS}}, b'{"s": "'),  # length-bounded
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": STRINGS}}, b'{"s": "", "t": "'),  # unbounded
    ({"type": "json_object"}, b'{"'),
    ({"type": "regex", "regex": "a.+"}, b"a"),
    ({"type": "regex", "regex": "a[^x]+"}, b"a"),
], ids=["bounded string", "string", "json_object", "regex dot", "regex negated class"])
def test_text_is_utf8_without_surrogates(tok, rf, prefix):
    """After the byte ED, a UTF-8 continuation byte 80-9F is allowed (U+D000-U+D7FF) but A0-BF is not: ED A0..ED BF
    would spell a surrogate (U+D800-U+DFFF), which no UTF-8 decoder takes (xgrammar's classes admit them)."""
    byte = {b[0]: i for i, b in enumerate(token_bytes(tok)) if b and len(b) == 1}  # byte-level BPE: all 256
    processor = compile_response_format(rf, tok)()
    allowed = allowed_by(processor, [byte[c] for c in prefix] + [byte[0xED]], tok.vocab_size)
    assert byte[0x80] in allowed and byte[0x9F] in allowed
    assert not {byte[c] for c in range(0xA0, 0xC0)} & allowed


def test_compiled_grammars_are_cached_by_canonical_json(tok):
    comp = GrammarCompiler(tok, cache_size=2)
    a = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    b = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    wrapped = {"type": "json_schema", "json_schema": {"name": "x", "schema": a}}
    f1 = compile_response_format(wrapped, tok, compiler=comp)
    f2 = compile_response_format({"type": "json_schema", "json_schema": json.loads(json.dumps(a))}, tok,
                                 compiler=comp)
    assert f1.compiled is f2.compiled  # the same schema, written again, bare
    fb = compile_response_format({"type": "json_schema", "json_schema": b}, tok, compiler=comp)
    assert fb.compiled is not f1.compiled  # property order is kept: it decides what is written first
    compile_response_format({"type": "json_object"}, tok, compiler=comp)  # evicts a (least recently used)
    assert len(comp.cache) == 2
    assert compile_response_format(wrapped, tok, compiler=comp).compiled is not f1.compiled
    assert compile_response_format(FORMAT, tok).compiled is compile_response_format(FORMAT, tok).compiled


def test_without_xgrammar_the_error_names_the_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ImportError, match=r"pip install 'dsv3\[structured\]'"):
        GrammarCompiler(tok)


# ---- through the engine ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_engine_samples_are_always_valid(tok, speculative):
    """A tiny random model samples (temperature 1) under the processor: every output is a complete document of
    SCHEMA, with MTP speculation too (drafts verified against the masked distribution)."""
    model = random_model(tiny_config(vocab_size=tok.vocab_size + PAD), std=0.2)
    kw = dict(speculative="mtp", speculative_policy="always", num_speculative_tokens=2) if speculative else {}
    llm = LLM(model, tokenizer=tok, kv_cache_tokens=2048, seed=0, **kw)
    make = compile_response_format(FORMAT, tok, eos_token_ids=llm.eos_token_ids)
    ref = Reference(SCHEMA, token_bytes(tok), set(llm.eos_token_ids))
    prompts = [tok.encode(p, add_special_tokens=False) for p in ["the cat", "{}", "sat on", "1234"]]
    params = [SamplingParams(temperature=1.0, max_new_tokens=200, seed=i, logits_processors=[make()])
              for i in range(len(prompts))]
    for out in llm.generate(prompts, params, use_tqdm=False):
        assert out.finish_reason == "stop" and out.token_ids[-1] in llm.eos_token_ids, out
        assert tok.decode(out.token_ids[:-1]).encode() in ref.complete, out.text
    if speculative:  # drafts were made, and some rejected: the processors rolled back
        assert 0 < llm.stats["accepted"] < llm.stats["drafted"], llm.stats


@pytest.mark.gpu
def test_cuda_logits_are_masked_as_cpu_logits(tok):
    make = compile_response_format(FORMAT, tok)
    logits = torch.randn(tok.vocab_size + PAD)
    for text in ['{"name": "ab", "ok": ', '{"name": "ab", "ok": }']:  # a state, and a rejected history
        ids = tok.encode(text, add_special_tokens=False)
        out = make()([], ids, logits.cuda())
        assert out.device.type == "cuda" and torch.equal(out.cpu(), make()([], ids, logits))
