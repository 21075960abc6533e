"""Tokenizer: the same ids and chat text as transformers on the same files; incremental detokenisation that
never emits half a character."""

from __future__ import annotations

import json

import pytest

from dsv3.tokenizer import BOS, EOS, IncrementalDetokenizer, Tokenizer, train_bpe

TEXT = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "Größe, naïve café — 你好，世界！ Emoji: 🙂🚀 and math: ∑ x² ≤ ∞\n",
        "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_bpe(TEXT * 30, vocab_size=500).save_pretrained(d)
    return d


def test_special_tokens_and_round_trip(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)  # as DeepSeek-V3
    for t in TEXT:
        ids = tok.encode(t)
        assert ids[0] == 0 and ids.count(0) == 1  # BOS once
        assert tok.decode(ids) == t  # byte-level: lossless
    assert tok.decode([0, *tok.encode("hi", add_special_tokens=False), 1], skip_special_tokens=False) == f"{BOS}hi{EOS}"


def test_same_ids_and_chat_text_as_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    for t in TEXT:
        assert tok.encode(t) == hf(t)["input_ids"]
        assert tok.encode(t, add_special_tokens=False) == hf(t, add_special_tokens=False)["input_ids"]
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? 你好 🙂"}],
    ]
    for msgs in chats:
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert ours == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            ids = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            theirs = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
            assert ids == list(theirs)


def test_a_real_style_template_from_tokenizer_config(tmp_path, tok_dir):
    """DeepSeek-V3's own template uses namespace(), loops and `raise_exception`."""
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
                            "{% endif %}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                            "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                            "{{ '<' + m['role'] + '>' + m['content'] | trim }}\n{% endfor %}")
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": " hi "}]) == "<user>hi\n"
    with pytest.raises(Exception, match="Only user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_incremental_detokenizer_never_splits_a_character(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    text = "Unseen: 😀 漢字 Ωμέγα, seen: 🙂 你好 Größe"
    ids = tok.encode(text, add_special_tokens=False)
    # byte-level BPE splits some characters across tokens: feeding one id at a time must still only emit
    # whole characters, and the pieces must add up to the text
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for step in (1, 2, 3):
        d = IncrementalDetokenizer(tok)
        pieces = [d.add(ids[i:i + step]) for i in range(0, len(ids), step)]
        pieces.append(d.flush())
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == text == d.text


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
