"""Documents -> token ids -> fixed-length training sequences.

- Fill-in-the-middle (V3 report §4.1) on a fraction of training documents, before packing, in PSM form:
  <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle, the three parts cut at two uniform
  random character positions. Validation documents are left whole, so validation loss is plain LM loss.
- Every document starts with BOS (as prompts do at inference) and ends with EOS; documents are concatenated and cut into sequences of seq_len + 1 tokens
  (inputs and shifted targets) with no cross-document masking, as in V3's pretraining.
- Sequences are visited in a seeded random order, a fresh permutation each epoch. The only state is the
  number of sequences consumed so far, so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..ckpt.io import atomic_open, atomic_write_json
from ..tokenizer import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, Tokenizer
from .corpus import Document


def tokenize(docs: list[Document], tokenizer: Tokenizer, fim_rate: float = 0.0, seed: int = 0) -> np.ndarray:
    """-> all documents' ids, each as BOS ids EOS, in one int32 array. A document is FIM-transformed with
    probability fim_rate, decided by a generator seeded from `seed` (the same documents every time)."""
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    fim_ids = [tokenizer.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)]
    if bos is None or eos is None or (fim_rate > 0 and None in fim_ids):
        raise ValueError("the tokenizer lacks DeepSeek-V3's special tokens (EOS, FIM); train one with dsv3")
    rng = np.random.default_rng(seed)
    pieces: list[str] = []
    plan: list[tuple[int, ...]] = []  # per document: indices into pieces (1 piece, or prefix/suffix/middle)
    for d in docs:
        if fim_rate > 0 and rng.random() < fim_rate and len(d.text) >= 2:
            a, b = sorted(rng.integers(0, len(d.text) + 1, size=2).tolist())
            plan.append((len(pieces), len(pieces) + 1, len(pieces) + 2))
            pieces += [d.text[:a], d.text[b:], d.text[a:b]]  # prefix, suffix, middle
        else:
            plan.append((len(pieces),))
            pieces.append(d.text)
    enc = [e.ids for e in tokenizer.tok.encode_batch(pieces, add_special_tokens=False)]
    out: list[int] = []
    for p in plan:
        out.append(bos)
        if len(p) == 1:
            out += enc[p[0]]
        else:
            pre, suf, mid = (enc[i] for i in p)
            out += [fim_ids[0], *pre, fim_ids[1], *suf, fim_ids[2], *mid]
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


def cached_tokens(path: str, key: dict, build) -> np.ndarray:
    """Load token ids from `path` (.npy) if it was built with the same `key`, else build and save them."""
    meta_path = path + ".json"
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            if json.load(f) == key:
                return np.load(path, allow_pickle=False)
    tokens = build()
    with atomic_open(path, "wb") as f:
        np.save(f, tokens, allow_pickle=False)
    atomic_write_json(meta_path, key)
    return tokens


class EpochOrder:
    """Items 0..n-1 visited in a seeded random order, a fresh permutation each epoch (or in order, without
    shuffle). `order[i]` is the item read i-th, i counting across epochs: the position alone is the state, so
    a resumed run reads exactly what an uninterrupted one would."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch != self._epoch:
            self._perm = (np.random.default_rng((self.seed, epoch)).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._epoch = epoch
        return int(self._perm[j])


class PackedSequences:
    """Sequences of seq_len + 1 tokens cut from one token stream, visited in seeded random order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.num_sequences = (len(tokens) - 1) // seq_len
        if self.num_sequences < 1:
            raise ValueError(f"{len(tokens)} tokens do not make one sequence of {seq_len + 1}; use more data "
                             "or a shorter --seq-len")
        self.order = EpochOrder(self.num_sequences, seed, shuffle)

    def sequence(self, i: int) -> np.ndarray:
        """The i-th sequence the run reads (i counts across epochs)."""
        k = self.order[i]
        return self.tokens[k * self.seq_len: k * self.seq_len + self.seq_len + 1]

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Sequences start .. start+size-1 -> LongTensor (size, seq_len + 1)."""
        return torch.from_numpy(np.stack([self.sequence(i) for i in range(start, start + size)]).astype(np.int64))


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats per token) of the corpus' token frequencies: the loss of the best context-free model."""
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
