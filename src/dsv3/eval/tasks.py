"""Accuracy on tasks with checkable answers: the model answers each prompt record (greedy by default) with
the inference engine, and the rule-based accuracy reward (train/rewards.py: a well-formed completion whose
answer is right) scores it. Used by `dsv3 sft` and `dsv3 grpo` at their evaluation steps, on the live model.

The engine runs the training model itself, not a copy: `live_engine` builds it once, and before every use
`LLM.refresh_weights()` takes up the weights the optimizer has changed since.
"""

from __future__ import annotations

import statistics

import torch

from ..infer.engine import LLM
from ..infer.sampling import SamplingParams
from ..model.model import DeepSeekV3
from ..tokenizer import Tokenizer


def messages_of(record: dict) -> list[dict]:
    """A prompt record's conversation so far: its "messages" (without a final assistant turn), else one user
    turn with its "prompt"."""
    if "messages" in record:
        msgs = list(record["messages"])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        return msgs
    return [{"role": "user", "content": record["prompt"]}]


def prompt_ids(tok: Tokenizer, record: dict) -> list[int]:
    """The record's prompt rendered with the model's chat template, ready for the assistant's answer."""
    return tok.apply_chat_template(messages_of(record), add_generation_prompt=True, tokenize=True)


def live_engine(model: DeepSeekV3, tok: Tokenizer, max_model_len: int, max_num_seqs: int = 64) -> LLM:
    """An engine on `model` itself (its weights, no copy), for sequences of at most max_model_len tokens.
    Call `refresh_weights()` on it after the weights change."""
    return LLM(model, tokenizer=tok, max_model_len=min(max_model_len, model.config.max_position_embeddings),
               max_num_seqs=max_num_seqs, live_weights=True)


@torch.no_grad()
def task_accuracy(llm: LLM, records: list[dict], max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0) -> dict:
    """-> {"accuracy": share of records answered right in the required format, "format": share of well-formed
    completions, "mean_length": completion tokens on average} over `records` (greedy unless temperature > 0)."""
    from ..train.rewards import accuracy_reward, format_reward
    if not records:
        raise ValueError("task_accuracy needs at least one record")
    tok = llm.tokenizer
    prompts = [prompt_ids(tok, r) for r in records]
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i)
              for i in range(len(records))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    texts = [o.text for o in outs]
    ids = [list(o.token_ids) for o in outs]
    acc = accuracy_reward(texts, records, completion_ids=ids)
    fmt = format_reward(texts, records, completion_ids=ids)
    return {"accuracy": statistics.fmean(acc), "format": statistics.fmean(fmt),
            "mean_length": statistics.fmean(len(i) for i in ids)}
