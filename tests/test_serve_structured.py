"""`response_format` through `dsv3 serve` with the openai client: json_object and json_schema (strict) give
JSON valid against the schema on every request of a set of schemas, greedy and sampled, with and without MTP
speculation; a text format is no constraint; a bad schema is a 400 naming response_format."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from test_serve import MODEL, Server, model_dir  # noqa: E402,F401  (model_dir: the fixture, reused)

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
     "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 3}},
     "required": ["ok", "color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer",
     "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"],
     "additionalProperties": False}, "label": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,4}$"}]}},
     "required": ["point", "label"], "additionalProperties": False},
]
MESSAGES = [{"role": "user", "content": "the cat sat on the mat"}]


@pytest.fixture(scope="module", params=[{}, {"speculative": "mtp", "speculative_policy": "always"}],
                ids=["plain", "mtp"])
def client(model_dir, request):  # noqa: F811
    srv = Server(model_dir, **request.param)
    yield srv.client()
    srv.stop()


def ask(client, response_format, **kw):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120,
                                       response_format=response_format, **kw)
    return r.choices


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "flags", "point"])
def test_json_schema_outputs_are_valid_on_every_request(client, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    choices = ask(client, fmt, temperature=0) + ask(client, fmt, temperature=1.0, seed=3, n=4)
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
    assert len({c.message.content for c in choices}) > 1  # sampling still samples within the grammar


def test_json_object_and_streaming(client):
    for c in ask(client, {"type": "json_object"}, temperature=1.0, seed=5, n=3):
        if c.finish_reason == "stop":  # (free-form JSON may not close within max_tokens)
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.message.content.startswith("{")
    schema = SCHEMAS[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    whole = ask(client, fmt, temperature=0)[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, response_format=fmt,
                                            temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole


def test_text_format_and_bad_schemas(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content
    for bad in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                {"type": "yaml"}, {"json_schema": {}}):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, bad)
        assert "response_format" in str(e.value)
