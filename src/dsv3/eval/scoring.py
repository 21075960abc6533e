"""The scoring path every `dsv3 eval` goes through: a model directory served by the engine in this process, or
a running `dsv3 serve` (or any OpenAI-compatible server with vLLM's /tokenize) over HTTP. Both answer the
same three questions, in batches:

- `logprobs(seqs)`: for each token sequence, log p(t_i | t_<i) for i = 1..n-1 (the engine's prompt logprobs,
  the server's `echo` with `max_tokens` 1, as lm-eval asks for them);
- `greedy(prompts, max_new_tokens)`: the greedy continuation's text;
- `encode(text)` / `decode(ids)`: the model's own tokenizer (the server's through /tokenize and /detokenize).

    scorer = open_scorer(model="runs/demo")                 # or open_scorer(server="http://127.0.0.1:8000")
    lps = scorer.logprobs([scorer.encode("def f(x):\\n    return x\\n")])

`max_length` is the longest sequence either scores or prompts with (the engine's context less the one token a
request generates). A model can be evaluated past the context its config.json names (`context=`): the
evaluation of a model before context extension does exactly that, to show where it breaks.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Protocol

from tqdm import tqdm


class Scorer(Protocol):
    max_length: int  # the longest token sequence logprobs() takes, and the longest prompt greedy() takes
    bos_token_id: int | None
    eos_token_id: int | None
    name: str

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def logprobs(self, seqs: list[list[int]], desc: str = "scoring") -> list[list[float]]: ...

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, desc: str = "generating") -> list[str]: ...


def _batches(items: list, size: int, desc: str, total_tokens: int | None = None):
    """items in consecutive batches of `size`, with a progress bar over the items."""
    with tqdm(total=len(items), desc=desc, disable=len(items) <= size, unit="seq") as bar:
        for i in range(0, len(items), size):
            yield items[i:i + size]
            bar.update(min(size, len(items) - i))


class EngineScorer:
    """A model directory (or a built DeepSeekV3) through the engine (dsv3.LLM): each batch is one generate()
    call of `batch_size` requests, prefilled in the engine's chunks."""

    def __init__(self, model, context: int | None = None, dtype: str | None = None, device: str | None = None,
                 batch_size: int = 8, **llm_kwargs):
        from ..ckpt.pretrained import load_pretrained
        from ..infer import LLM
        from ..model.model import DeepSeekV3
        from ..tokenizer import Tokenizer

        tokenizer = llm_kwargs.pop("tokenizer", None)
        if not isinstance(model, DeepSeekV3):
            self.name = str(model)
            tokenizer = tokenizer or Tokenizer.from_dir(model)  # before the weights: fails at once without one
            model = load_pretrained(model, dtype=dtype, device=device, fp8=False)
        else:
            self.name = "model"
        trained = model.config.max_position_embeddings
        if context is not None and context + 1 > trained:
            # past the context config.json names: RoPE (and YaRN) are computed for any position; the config
            # only bounds what the engine admits
            model.config = model.config.replace(max_position_embeddings=context + 1)
        self.llm = LLM(model, tokenizer=tokenizer, max_model_len=None if context is None else context + 1,
                       max_num_seqs=batch_size, enable_prefix_caching=False, **llm_kwargs)
        self.tokenizer = self.llm.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer.json; evaluations read text through the model's own")
        self.max_length = self.llm.max_model_len - 1
        self.trained_context = trained
        self.batch_size = batch_size
        self.bos_token_id, self.eos_token_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _check(self, seqs: list[list[int]]) -> None:
        for i, s in enumerate(seqs):
            if not 1 <= len(s) <= self.max_length:
                raise ValueError(f"sequence {i} has {len(s)} tokens; the scorer takes 1..{self.max_length}")

    def logprobs(self, seqs: list[list[int]], desc: str = "scoring") -> list[list[float]]:
        from ..infer import SamplingParams

        self._check(seqs)
        params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=0, ignore_eos=True)
        out: list[list[float]] = []
        for batch in _batches(seqs, self.batch_size, desc):
            for o in self.llm.generate(batch, params, use_tqdm=False):
                out.append([lp.logprob for lp in o.prompt_logprobs[1:]])
        return out

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, desc: str = "generating") -> list[str]:
        from ..infer import SamplingParams

        self._check(prompts)
        params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
        out: list[str] = []
        for batch in _batches(prompts, self.batch_size, desc):
            out += [o.text for o in self.llm.generate(batch, params, use_tqdm=False)]
        return out


class ServerScorer:
    """A running OpenAI-compatible server: /v1/completions with token-id prompts (`echo` and `logprobs` 0 for
    scoring, as lm-eval's local-completions asks), /tokenize and /detokenize (vLLM's) for text."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, batch_size: int = 8,
                 timeout: float = 600.0):
        self.url, self.api_key, self.timeout, self.batch_size = url.rstrip("/"), api_key, timeout, batch_size
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.name = self.url
        info = self._request("GET", "/tokenizer_info")
        card = next(iter(self._request("GET", "/v1/models")["data"]), None)
        if card is None:
            raise RuntimeError(f"{self.url}/v1/models lists no model")
        self.model = model or card["id"]
        # the served context: the model card's max_model_len (vLLM, dsv3); a tokenizer's model_max_length is only
        # its config's, often a placeholder
        context = int(card.get("max_model_len") or info.get("model_max_length") or 0)
        if context < 2:
            raise ValueError(f"{self.url} names no context (max_model_len in /v1/models, or model_max_length in "
                             "/tokenizer_info)")
        self.max_length = context - 1
        self.trained_context = context
        self.bos_token_id = self._special_id(info, "bos")
        self.eos_token_id = self._special_id(info, "eos")

    def _special_id(self, info: dict, which: str) -> int | None:
        """The id of the bos or eos token: /tokenizer_info's `bos_token_id` (dsv3 serve), else its `bos_token`
        string through /tokenize (vLLM names the tokens only; lm-eval's remote tokenizer reads them so)."""
        if info.get(f"{which}_token_id") is not None:
            return int(info[f"{which}_token_id"])
        text = info.get(f"{which}_token")
        if isinstance(text, dict):  # an AddedToken as a tokenizer_config.json spells it
            text = text.get("content")
        ids = self.encode(text) if isinstance(text, str) and text else []
        return ids[0] if ids else None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {self.url}{path}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"{method} {self.url}{path}: {e.reason} (is the server running?)") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._request("POST", "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})["tokens"]

    def decode(self, ids: list[int]) -> str:
        return self._request("POST", "/detokenize", {"tokens": list(ids)})["prompt"]

    def logprobs(self, seqs: list[list[int]], desc: str = "scoring") -> list[list[float]]:
        for i, s in enumerate(seqs):  # the server would refuse it too, in its own words
            if not 1 <= len(s) <= self.max_length:
                raise ValueError(f"sequence {i} has {len(s)} tokens; {self.url} scores 1..{self.max_length} "
                                 f"(its context less the one token a request generates)")
        out: list[list[float]] = []
        for batch in _batches(seqs, self.batch_size, desc):
            r = self._request("POST", "/v1/completions", {"model": self.model, "prompt": batch, "echo": True,
                                                         "max_tokens": 1, "logprobs": 0, "temperature": 0})
            for choice in sorted(r["choices"], key=lambda c: c["index"]):
                lps = choice["logprobs"]["token_logprobs"]
                n = len(batch[choice["index"]])
                out.append([float(x) for x in lps[1:n]])
        return out

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, desc: str = "generating") -> list[str]:
        out: list[str] = []
        for batch in _batches(prompts, self.batch_size, desc):
            r = self._request("POST", "/v1/completions", {"model": self.model, "prompt": batch,
                                                         "max_tokens": max_new_tokens, "temperature": 0})
            out += [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
        return out


def open_scorer(model=None, server: str | None = None, api_key: str | None = None, context: int | None = None,
                **kwargs) -> Scorer:
    """The scorer of a model directory (`model`) or of a running server (`server`, its base URL)."""
    if (model is None) == (server is None):
        raise ValueError("give either a model directory (--model) or a server URL (--server), not both or neither")
    if server is not None:
        if context is not None:
            raise ValueError("--context applies to a model directory; a server's context is the one it serves")
        kwargs.pop("dtype", None), kwargs.pop("device", None)
        return ServerScorer(server, api_key=api_key, **kwargs)
    return EngineScorer(model, context=context, **kwargs)


def add_scorer_args(p) -> None:
    """--model/--server and the options of either, for every `dsv3 eval` command."""
    p.add_argument("--model", default=None, help="model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="a running `dsv3 serve` (e.g. http://127.0.0.1:8000) instead of --model")
    p.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")
    p.add_argument("--context", type=int, default=None,
                   help="with --model: the longest sequence to admit, even past the context config.json names "
                        "(to evaluate a model beyond the length it was trained at)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per engine batch or request (default 8)")
    p.add_argument("--dtype", default=None, help="with --model: weights' dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="with --model: cpu, cuda, ... (default: cuda if available)")


def scorer_from_args(args) -> Scorer:
    return open_scorer(model=args.model, server=args.server, api_key=args.api_key, context=args.context,
                       batch_size=args.batch_size, dtype=args.dtype, device=args.device)
