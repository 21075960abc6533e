"""Text to train on: the built-in corpus (the Python standard library's own sources, read from the running
interpreter, so it exists on every machine offline) or the user's files.

A corpus is a list of documents in a fixed order; its content hash (over names and bytes) is recorded in
the run directory so that a run can tell when its data changed under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".json", ".html",
                 ".css", ".sh", ".yaml", ".yml", ".toml", ".tex")
# tests, the IDE, installed packages, and generated tables that are data rather than code (codec charmaps,
# pydoc's topic strings, bundled wheels)
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo",
              "encodings", "pydoc_data", "ensurepip", "lib2to3"}


@dataclass(frozen=True)
class Document:
    name: str  # a stable identifier (relative path, or file:line for JSONL)
    text: str


def builtin_corpus() -> list[Document]:
    """The standard library's .py sources (tests, IDLE and installed packages left out), sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if text.strip():
                    docs.append(Document(os.path.relpath(path, root), text))
    if not docs:
        raise RuntimeError(f"found no Python sources under {root}; pass --data")
    docs.sort(key=lambda d: d.name)
    return docs


def load_corpus(path: str) -> list[Document]:
    """A text file, a folder of text files (searched recursively, sorted), or JSONL with a `text` field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path} does not exist")
    files = []
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                         if f.endswith(TEXT_SUFFIXES + (".jsonl",)))
        files.sort()
    else:
        files = [path]
    docs = []
    for f in files:
        rel = os.path.relpath(f, path) if os.path.isdir(path) else os.path.basename(f)
        if f.endswith(".jsonl"):
            docs.extend(_read_jsonl(f, rel))
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            if text.strip():
                docs.append(Document(rel, text))
    if not docs:
        raise ValueError(f"--data {path}: no text found (files ending in {', '.join(TEXT_SUFFIXES)} or .jsonl)")
    return docs


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """The parsed JSON value of each non-blank line of a JSONL file, with where it is ("path:line"), for
    errors that name it; a line that does not parse is a ValueError naming path:line."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_jsonl(path: str, rel: str) -> list[Document]:
    docs = []
    for where, obj in jsonl_lines(path):
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}: each line must be an object with a string 'text' field")
        if text.strip():
            docs.append(Document(f"{rel}:{where.rsplit(':', 1)[1]}", text))
    return docs


def corpus_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()


def split(docs: list[Document], val_fraction: float = 0.02) -> tuple[list[Document], list[Document]]:
    """A held-out validation split by a hash of each document's name: stable when documents are added."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    buckets = 10_000
    val = [d for d in docs if zlib.crc32(d.name.encode()) % buckets < val_fraction * buckets]
    train = [d for d in docs if zlib.crc32(d.name.encode()) % buckets >= val_fraction * buckets]
    if val_fraction > 0 and not val and len(docs) > 1:
        val, train = docs[-1:], docs[:-1]
    return train, val
