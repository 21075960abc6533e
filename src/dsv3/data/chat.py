"""Conversations -> token ids with a loss mask -> packed rows for supervised fine-tuning (`dsv3 sft`).

- Records are JSONL: `{"messages": [{"role", "content"}, ...]}` (OpenAI roles) or `{"prompt", "completion"}`.
  Tool use as in OpenAI's fine-tuning format: `"tools"` beside the messages (function definitions, which the
  template describes to the model), assistant messages with `"tool_calls"` (content then may be null) and
  `{"role": "tool", "tool_call_id", "content"}` results. Arguments may be given as JSON text or as an object.
- `render` uses the tokenizer's own chat template and nothing template-specific. The loss covers exactly what
  the model must generate at inference: for assistant turn i, the template renders messages[:i] with the
  generation prompt (text A, what the model is given) and messages[:i+1] without it (text B); the turn is
  B[len(A):], which for DeepSeek-V3 is the content, any tool calls, and the <｜end▁of▁sentence｜> that closes it
  (after tool results the prompt ends in <｜tool▁outputs▁end｜>, which the model is given, not trained on).
- A template may rewrite an assistant message. R1's drops `<think>...</think>` from every assistant message
  (at inference the answered turn is generated, never rendered). The trained turn must be what the model
  should generate, so when the rendered turn lacks the record's content (whitespace trimming aside), the
  content goes in verbatim where the template puts it (found by rendering a placeholder). Earlier turns are
  then rendered without their reasoning as history, so a later prompt no longer extends the text so far:
  those turns become prompt and only the later turns are trained (the last turn keeps its reasoning).
- Each example is shifted (labels = next token where the mask holds, else -100) before packing, so no label
  crosses a record boundary. Rows of seq_len tokens hold whole examples (best-fit decreasing); positions
  restart at each example and the attention mask is block-diagonal causal, so no example sees another.
- Rows are visited in a seeded random order, a fresh permutation each epoch; the only state is the number of
  rows consumed, so a resumed run reads exactly what an uninterrupted one would (as PackedSequences).
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .corpus import jsonl_lines
from .dataset import EpochOrder

IGNORE = -100  # the label of a position with no loss (cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool")
_PLACEHOLDER = "\u2983dsv3 assistant content\u2984"  # rendered in place of a turn's content, then replaced

Example = tuple[list[int], list[bool]]  # token ids, loss mask (True on the assistant's tokens)


# ---- records -------------------------------------------------------------------------------------------------

def load_chat_records(path: str | os.PathLike) -> list[dict]:
    """JSONL records, each with `messages` (prompt/completion records are turned into a user and an assistant
    turn). Blank lines are skipped; extra keys are kept. A malformed line is a ValueError naming path:line."""
    records = []
    for where, rec in jsonl_lines(path):
        try:
            records.append(_check_record(rec))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return records


def _check_record(rec) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, not {type(rec).__name__}")
    has_pc = "prompt" in rec or "completion" in rec
    if "messages" in rec and has_pc:
        raise ValueError("a record has either 'messages' or 'prompt' and 'completion', not both")
    if has_pc:
        for key in ("prompt", "completion"):
            if key not in rec:
                raise ValueError(f"missing field {key!r} (a prompt/completion record needs both)")
            if not isinstance(rec[key], str):
                raise ValueError(f"field {key!r} must be a string, not {type(rec[key]).__name__}")
        return {**rec, "messages": [{"role": "user", "content": rec["prompt"]},
                                    {"role": "assistant", "content": rec["completion"]}]}
    if "messages" not in rec:
        raise ValueError("missing field 'messages' (or 'prompt' and 'completion')")
    messages = rec["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"field 'messages' must be a list, not {type(messages).__name__}")
    if rec.get("tools") is not None:
        _check_tools(rec["tools"])
    checked = [_check_message(k, m) for k, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in checked):
        raise ValueError("no assistant turn (nothing to train on)")
    return {**rec, "messages": checked}


def _check_message(k: int, m) -> dict:
    """A message as the template takes it: content a string (null for an assistant's tool calls alone),
    tool_calls in OpenAI's form with JSON-text arguments."""
    if not isinstance(m, dict):
        raise ValueError(f"messages[{k}] must be an object, not {type(m).__name__}")
    if "role" not in m:
        raise ValueError(f"messages[{k}] is missing field 'role'")
    if m["role"] not in ROLES:
        raise ValueError(f"messages[{k}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
    calls = m.get("tool_calls")
    if calls is not None and m["role"] != "assistant":
        raise ValueError(f"messages[{k}]: only assistant messages have tool_calls, not {m['role']!r} ones")
    if calls is not None:
        m = {**m, "tool_calls": [_check_call(f"messages[{k}].tool_calls[{j}]", c) for j, c in enumerate(calls)]}
    if calls and m.get("content") is None:
        return {**m, "content": None}
    if "content" not in m:
        raise ValueError(f"messages[{k}] is missing field 'content'")
    if not isinstance(m["content"], str):
        raise ValueError(f"messages[{k}].content must be a string, not {type(m['content']).__name__}")
    return m


def _check_call(where: str, c) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
        raise ValueError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}, "
                         f"not {c!r}")
    if c.get("type", "function") != "function":
        raise ValueError(f"{where}.type must be 'function', not {c['type']!r}")
    args = fn.get("arguments", {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    try:
        parsed = json.loads(args)
    except ValueError:
        raise ValueError(f"{where}.function.arguments is not JSON: {args[:80]!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, not {args[:80]!r}")
    return {**c, "type": "function", "function": {**fn, "arguments": args}}


def _check_tools(tools) -> None:
    if not isinstance(tools, list):
        raise ValueError(f"field 'tools' must be a list of function definitions, not {type(tools).__name__}")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise ValueError(f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                             f"\"parameters\"}}}}, not {t!r}")


# ---- rendering -----------------------------------------------------------------------------------------------

def render(tok: Tokenizer, record: dict) -> Example:
    """A conversation rendered with the tokenizer's chat template -> (ids, mask), mask True exactly on the
    tokens of the assistant turns (content and closing end-of-sentence; not the role token, not BOS).
    Messages after the last assistant turn are left out: nothing would be trained on them."""
    messages, tools = record["messages"], record.get("tools") or None
    pieces: list[tuple[str, bool]] = []  # (text, trained), in order
    text = ""  # the concatenation of pieces
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True)
        turn = _assistant_turn(tok, messages, i, prompt, tools)
        if not prompt.startswith(text):  # the earlier turns render differently as history: they become prompt
            pieces, text = [], ""
        pieces += [(prompt[len(text):], False), (turn, True)]
        text = prompt + turn
    if not pieces:
        raise ValueError("the record has no assistant turn")
    # Each piece is tokenised alone, so token boundaries fall on the turn boundaries. This is also how the
    # model meets the text at inference: the prompt is tokenised by itself and the answer is generated after it.
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trained in pieces:
        piece_ids = tok.encode(piece, add_special_tokens=False)
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    bos = tok.bos_token_id
    if tok.add_bos_token and bos is not None and (not ids or ids[0] != bos):  # a template without {{ bos_token }}
        ids, mask = [bos] + ids, [False] + mask
    return ids, mask


def _assistant_turn(tok: Tokenizer, messages: list[dict], i: int, prompt: str, tools: list | None = None) -> str:
    """The text the template adds for assistant message i after `prompt` (messages[:i] with the generation
    prompt): B[len(A):], or the record's content put verbatim where the template puts content."""
    full = tok.apply_chat_template(messages[:i + 1], tools=tools, add_generation_prompt=False)
    content = messages[i]["content"] or ""  # (null beside tool calls)
    if full.startswith(prompt) and content.strip() in full[len(prompt):]:
        return full[len(prompt):]
    # The template rewrote the content (R1's drops the reasoning): where would it put content verbatim?
    probe = tok.apply_chat_template(messages[:i] + [{**messages[i], "content": _PLACEHOLDER}], tools=tools,
                                    add_generation_prompt=False)
    if probe.count(_PLACEHOLDER) == 1:
        verbatim = probe.replace(_PLACEHOLDER, content)
        if verbatim.startswith(prompt):
            return verbatim[len(prompt):]
    if full.startswith(prompt):  # the template transforms content beyond recognition: follow it
        return full[len(prompt):]
    j = next((k for k, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    raise ValueError(
        f"the chat template is not prefix-stable at messages[{i}] (assistant): the conversation rendered through "
        f"this turn does not extend the prompt rendered for it with add_generation_prompt=True, so the turn's "
        f"tokens cannot be told from the prompt's. They differ at character {j}: the prompt has "
        f"{prompt[j:j + 40]!r}, the conversation has {full[j:j + 40]!r}")


def records_to_examples(tok: Tokenizer, records: list[dict], progress: bool = False) -> list[Example]:
    """render() over records, with a progress bar when asked. An error names the record (counting from 1)."""
    it = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc="rendering conversations", unit="record")
    from jinja2.exceptions import TemplateError

    out = []
    for k, rec in enumerate(it, 1):
        try:
            out.append(render(tok, rec))
        except ValueError as e:
            raise ValueError(f"record {k}: {e}") from None
        except (TemplateError, TypeError, KeyError, AttributeError) as e:  # raised inside the template
            hint = ""
            if rec.get("tools") or any(m["role"] == "tool" or m.get("tool_calls") for m in rec["messages"]):
                hint = ("; it has tool calls or tool results, which this template may not render (a tokenizer "
                        "trained by dsv3 before tool calling was added has such a template: its "
                        "tokenizer_config.json chat_template can be replaced by dsv3.tokenizer.CHAT_TEMPLATE "
                        "or the official DeepSeek-V3 one)")
            raise ValueError(f"record {k}: the chat template failed on it ({type(e).__name__}: {e}){hint}") from None
    return out


# ---- batches -------------------------------------------------------------------------------------------------

@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, T) int64, pad_id at padding
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss (prompt tokens, padding)
    positions: torch.Tensor  # (B, T) int64, restarting at 0 at each packed example (padding: 0)
    segments: torch.Tensor  # (B, T) int64, 0, 1, 2, ... per example within the row, -1 at padding

    def to(self, device) -> "SFTBatch":
        return SFTBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.positions, self.segments)))

    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query t may attend key s: s <= t in the same example. A padding
        position attends to itself only (an all-False row would make SDPA's softmax NaN)."""
        T = self.segments.shape[1]
        seg_q, seg_k = self.segments[:, :, None], self.segments[:, None, :]  # (B, T, 1), (B, 1, T)
        idx = torch.arange(T, device=self.segments.device)
        causal = idx[None, :] <= idx[:, None]  # (T, T): key s <= query t
        allowed = (seg_q == seg_k) & (seg_q >= 0) & causal
        return (allowed | torch.eye(T, dtype=torch.bool, device=self.segments.device))[:, None]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @staticmethod
    def cat(batches: list["SFTBatch"]) -> "SFTBatch":
        """Rows of several batches of the same length T, in order."""
        return SFTBatch(*(torch.cat([getattr(b, f) for b in batches])
                          for f in ("input_ids", "labels", "positions", "segments")))


def _shift(ids: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) -> (inputs ids[:-1], labels ids[1:] where mask[1:] else IGNORE), before any packing."""
    if len(ids) != len(mask):
        raise ValueError(f"an example has {len(ids)} ids but a mask of {len(mask)}")
    a = np.asarray(ids, dtype=np.int64)
    m = np.asarray(mask, dtype=bool)
    return a[:-1], np.where(m[1:], a[1:], IGNORE)


def collate(examples: list[Example], pad_id: int) -> SFTBatch:
    """One example per row, padded on the right to the longest (unpacked: evaluation and tests)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    shifted = [_shift(ids, mask) for ids, mask in examples]
    T = max(len(x) for x, _ in shifted)
    B = len(shifted)
    batch = SFTBatch(torch.full((B, T), pad_id, dtype=torch.int64), torch.full((B, T), IGNORE, dtype=torch.int64),
                     torch.zeros((B, T), dtype=torch.int64), torch.full((B, T), -1, dtype=torch.int64))
    for r, (x, y) in enumerate(shifted):
        n = len(x)
        batch.input_ids[r, :n] = torch.from_numpy(x)
        batch.labels[r, :n] = torch.from_numpy(y)
        batch.positions[r, :n] = torch.arange(n)
        batch.segments[r, :n] = 0
    return batch


class PackedChat:
    """Rendered examples packed whole into rows of seq_len tokens, visited in seeded random order."""

    def __init__(self, examples: list[Example], seq_len: int, seed: int, shuffle: bool = True, pad_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len, self.seed, self.shuffle, self.pad_id = seq_len, seed, shuffle, pad_id
        self.truncated = 0  # examples cut to seq_len that kept some of their assistant tokens
        self.dropped = 0  # examples with no assistant token left (within seq_len, or at all)
        xs, ys = [], []
        for ids, mask in examples:
            x, y = _shift(ids, mask)
            cut = len(x) > seq_len
            x, y = x[:seq_len], y[:seq_len]
            if not (y != IGNORE).any():
                self.dropped += 1
                continue
            self.truncated += cut
            xs.append(x)
            ys.append(y)
        if not xs:
            raise ValueError(f"none of {len(examples)} examples has an assistant token within --seq-len {seq_len}")
        self.num_examples = len(xs)
        lengths = np.array([len(x) for x in xs], dtype=np.int64)
        self._x, self._y = np.concatenate(xs), np.concatenate(ys)
        self._start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._len = lengths
        self.tokens = int(lengths.sum())
        self.loss_tokens = int((self._y != IGNORE).sum())
        rows = _best_fit_decreasing(lengths, seq_len, np.random.default_rng(seed).permutation(len(xs)))
        self._row_ptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
        self._row_items = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
        self.num_sequences = len(rows)
        self.order = EpochOrder(self.num_sequences, seed, shuffle)

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Packed row k -> (input_ids, labels, positions, segments), each (seq_len,) int64."""
        T = self.seq_len
        x, y = np.full(T, self.pad_id, dtype=np.int64), np.full(T, IGNORE, dtype=np.int64)
        pos, seg = np.zeros(T, dtype=np.int64), np.full(T, -1, dtype=np.int64)
        t = 0
        for s, e in enumerate(self._row_items[self._row_ptr[k]:self._row_ptr[k + 1]]):
            a, n = self._start[e], self._len[e]
            x[t:t + n], y[t:t + n] = self._x[a:a + n], self._y[a:a + n]
            pos[t:t + n], seg[t:t + n] = np.arange(n), s
            t += n
        return x, y, pos, seg

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The i-th row the run reads (i counts across epochs)."""
        return self.row(self.order[i])

    def batch(self, start: int, size: int) -> SFTBatch:
        """Rows start .. start+size-1 -> SFTBatch of (size, seq_len)."""
        rows = [self.sequence(i) for i in range(start, start + size)]
        return SFTBatch(*(torch.from_numpy(np.stack([r[f] for r in rows])) for f in range(4)))


def _best_fit_decreasing(lengths: np.ndarray, capacity: int, tiebreak: np.ndarray) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens: longest first (equal lengths in the
    seeded `tiebreak` order), each into the row it fills best, else a new row."""
    order = np.lexsort((tiebreak, -lengths))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for e in order.tolist():
        n = int(lengths[e])
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([e])
            r, space = len(rows) - 1, capacity - n
        else:
            space, r = free.pop(j)
            rows[r].append(e)
            space -= n
        if space > 0:
            bisect.insort(free, (space, r))
    return rows
