"""A built-in tool-use set, for teaching a small model DeepSeek-V3's tool calls (`dsv3 sft --task tool-use`):
conversations in OpenAI's fine-tuning format, generated from a seed (nothing to download).

Two tools, `get_weather(city)` and `add(a, b)`, and five kinds of conversation:
- weather: a city's weather asked -> a get_weather call -> its result -> the answer, read off the result;
- sum: two numbers to add -> an add call -> its result -> "a + b = result.";
- two cities: the weather of two cities -> two calls in one turn -> two results -> one answer;
- follow-up: a weather answer, then "And in CITY?" -> a second call -> the second answer;
- chat: a greeting or thanks, answered without a tool.
The tool results are drawn at random (the weather does not follow from the city), so the final answers have to
be read from the tool output. About half the conversations open with a system message.

A conversation belongs to the train or the test split by a hash of its user messages, so a test question is
never trained on (the same question with other tool results is the same problem).

    records = tool_use.records("train", 300, seed=0)     # [{"tools": TOOLS, "messages": [...]}, ...]
    python -m dsv3.data.tool_use --split train -n 300 --out tool-use.jsonl      # for dsv3 sft --data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics

SPLITS = ("train", "test")
TEST_FRACTION = 0.1

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
]

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Delhi", "Seoul",
          "Sydney", "Toronto", "Chicago", "Boston", "Dublin", "Vienna", "Prague", "Lisbon", "Athens", "Nairobi",
          "Mumbai", "Bangkok", "Hanoi", "Moscow", "Warsaw", "Zurich", "Denver", "Miami", "Havana"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
SYSTEM = "You are a helpful assistant."
WEATHER_QUESTIONS = ["What's the weather in {city}?", "How is the weather in {city} today?",
                     "Is it warm in {city} right now?", "Tell me the weather for {city}.", "Weather in {city}?"]
TWO_CITY_QUESTIONS = ["What's the weather in {a} and {b}?", "Compare the weather in {a} and {b}.",
                      "How is the weather in {a} and in {b}?"]
SUM_QUESTIONS = ["What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?", "{a} plus {b}?"]
FOLLOW_UPS = ["And in {city}?", "What about {city}?"]
CHATS = [("Hi!", "Hello! I can look up the weather or add numbers for you."),
         ("Hello, who are you?", "I am an assistant that can look up the weather or add numbers for you."),
         ("Thanks!", "You're welcome!"),
         ("Thank you for your help.", "You're welcome!")]
KINDS = ("weather", "sum", "two cities", "follow-up", "chat")
WEIGHTS = (0.3, 0.3, 0.15, 0.15, 0.1)


# ---- conversations ------------------------------------------------------------------------------------------

def _call(name: str, arguments: dict, rng: random.Random) -> dict:
    return {"id": f"call_{rng.getrandbits(64):016x}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _weather_turns(cities: list[str], rng: random.Random) -> list[dict]:
    """One assistant turn calling get_weather for each city, the results, and the answer."""
    calls = [_call("get_weather", {"city": c}, rng) for c in cities]
    results = [{"city": c, "temperature_c": rng.randint(-10, 35), "conditions": rng.choice(CONDITIONS)}
               for c in cities]
    if len(cities) == 1:
        r = results[0]
        answer = f"It is {r['conditions']} in {r['city']}, {r['temperature_c']} °C."
    else:
        answer = " ".join(f"{r['city']}: {r['conditions']}, {r['temperature_c']} °C." for r in results)
    return [{"role": "assistant", "content": None, "tool_calls": calls},
            *({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(r, ensure_ascii=False)}
              for c, r in zip(calls, results)),
            {"role": "assistant", "content": answer}]


def conversation(rng: random.Random) -> list[dict]:
    """One random conversation (its messages)."""
    kind = rng.choices(KINDS, WEIGHTS)[0]
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    if kind == "weather":
        city = rng.choice(CITIES)
        messages += [{"role": "user", "content": rng.choice(WEATHER_QUESTIONS).format(city=city)},
                     *_weather_turns([city], rng)]
    elif kind == "two cities":
        a, b = rng.sample(CITIES, 2)
        messages += [{"role": "user", "content": rng.choice(TWO_CITY_QUESTIONS).format(a=a, b=b)},
                     *_weather_turns([a, b], rng)]
    elif kind == "follow-up":
        a, b = rng.sample(CITIES, 2)
        messages += [{"role": "user", "content": rng.choice(WEATHER_QUESTIONS).format(city=a)},
                     *_weather_turns([a], rng),
                     {"role": "user", "content": rng.choice(FOLLOW_UPS).format(city=b)},
                     *_weather_turns([b], rng)]
    elif kind == "sum":
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        call = _call("add", {"a": a, "b": b}, rng)
        messages += [{"role": "user", "content": rng.choice(SUM_QUESTIONS).format(a=a, b=b)},
                     {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": a + b})},
                     {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
    else:
        question, answer = rng.choice(CHATS)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _in_test_split(messages: list[dict]) -> bool:
    key = "\n".join(m["content"] for m in messages if m["role"] == "user")
    h = int.from_bytes(hashlib.sha256(f"tool-use:{key}".encode()).digest()[:8], "little")
    return h % 10_000 < TEST_FRACTION * 10_000


def records(split: str, n: int, seed: int = 0) -> list[dict]:
    """n conversations of the split, `{"tools": TOOLS, "messages": [...]}`, the same for the same arguments."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(f"tool-use:{split}:{seed}")  # a str seed hashes the same in every process
    out = []
    while len(out) < n:
        messages = conversation(rng)
        if _in_test_split(messages) == (split == "test"):
            out.append({"tools": TOOLS, "messages": messages})
    return out


# ---- scoring ------------------------------------------------------------------------------------------------

def turns(record: dict) -> list[tuple[list[dict], dict]]:
    """(the conversation before an assistant turn, that turn) for each assistant turn of a record."""
    messages = record["messages"]
    return [(messages[:i], m) for i, m in enumerate(messages) if m["role"] == "assistant"]


def turn_is_right(expected: dict, content: str, calls: list) -> tuple[bool, bool]:
    """(right, well formed) for a reply parsed into content and calls (serve.tools.ToolCall): a tool-call turn
    needs the same calls in order (names, arguments equal as JSON); a text turn no calls and the same text."""
    want = expected.get("tool_calls") or []
    if not want:
        return not calls and content.strip() == expected["content"].strip(), not calls
    if not calls:
        return False, False
    got = [(c.name, json.loads(c.arguments)) for c in calls]
    return got == [(w["function"]["name"], json.loads(w["function"]["arguments"])) for w in want], True


def accuracy(llm, records: list[dict], max_new_tokens: int) -> dict:
    """Every assistant turn of the records answered greedily by the engine (on the conversation before it) and
    parsed for tool calls -> {"accuracy": share of turns right, "format": share well formed (calls where calls
    are due, text where text is), "call_accuracy", "answer_accuracy": accuracy on tool-call and text turns,
    "mean_length": tokens per reply}."""
    from ..infer.sampling import SamplingParams
    from ..serve.tools import parse_tool_calls

    pairs = [t for r in records for t in turns(r)]
    if not pairs:
        raise ValueError("accuracy needs at least one record with an assistant turn")
    tok = llm.tokenizer
    names = [t["function"]["name"] for t in TOOLS]
    prompts = [tok.apply_chat_template(history, tools=r.get("tools"), add_generation_prompt=True, tokenize=True)
               for r in records for history, _ in turns(r)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens), use_tqdm=False)
    right, formed, by_kind = [], [], {True: [], False: []}
    for (_, expected), o in zip(pairs, outs):
        ids = [t for t in o.token_ids if t not in llm.eos_token_ids]
        parsed = parse_tool_calls(tok.decode(ids, skip_special_tokens=False), names)
        ok, fmt = turn_is_right(expected, parsed.content, parsed.tool_calls)
        right.append(ok)
        formed.append(fmt)
        by_kind[bool(expected.get("tool_calls"))].append(ok)
    return {"accuracy": statistics.fmean(right), "format": statistics.fmean(formed),
            "call_accuracy": statistics.fmean(by_kind[True]) if by_kind[True] else None,
            "answer_accuracy": statistics.fmean(by_kind[False]) if by_kind[False] else None,
            "mean_length": statistics.fmean(len(o.token_ids) for o in outs)}


# ---- python -m dsv3.data.tool_use -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the built-in tool-use conversations as JSONL (OpenAI's "
                                            "fine-tuning format: tools, messages with tool_calls and tool results), "
                                            "for dsv3 sft --data.")
    p.add_argument("--split", default="train", choices=SPLITS, help="train, or test: the held-out 10%% (train)")
    p.add_argument("-n", type=int, default=300, help="conversations (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same conversations (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    args = p.parse_args(argv)
    from ..ckpt.io import atomic_write_text
    rows = records(args.split, args.n, args.seed)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} tool-use {args.split} conversations to {os.fspath(args.out)}")


if __name__ == "__main__":
    main()
