"""Tests for chatgot_jax.data: tokenizer, corpus loading, splits, batches."""

import json
import re

import numpy as np
import pytest

from chatgot_jax.data import (UNK_ID, CharTokenizer, eval_windows, get_batch, load_corpus,
                              split_tokens)
from chatgot_jax.errors import UserError

TEXT = "Winter is coming’ … said Ned.\nThe North remembers!"


def assert_user_error(fn, *needles):
    """Calls fn, expects a one-line UserError whose message contains each needle."""
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg
    return msg


def test_tokenizer_round_trip_with_unicode():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.chars == "".join(sorted(set(TEXT)))
    assert tok.vocab_size == len(set(TEXT)) + 1
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint8 and ids.shape == (len(TEXT),)
    assert ids.min() >= 1 and ids.max() == tok.vocab_size - 1
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids.tolist()) == TEXT
    assert tok.encode(tok.chars).tolist() == list(range(1, tok.vocab_size))
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_unknown_chars_map_to_unk():
    tok = CharTokenizer.from_text("abc")
    ids = tok.encode("aXbé😀")
    assert ids.tolist() == [1, UNK_ID, 2, UNK_ID, UNK_ID]
    assert tok.decode(ids) == "a\ufffdb\ufffd\ufffd"
    assert tok.unknown_chars("aXbéXé😀c") == "Xé😀"
    assert tok.unknown_chars("cab") == ""
    assert_user_error(lambda: tok.decode([tok.vocab_size]), "vocab_size 4")
    assert_user_error(lambda: tok.decode([-1]))


def test_large_vocab_uses_uint16():
    chars = "".join(chr(0x4E00 + i) for i in range(300))
    tok = CharTokenizer.from_text(chars[::-1])
    ids = tok.encode(chars)
    assert tok.vocab_size == 301 and ids.dtype == np.uint16
    assert ids.tolist() == list(range(1, 301))
    assert tok.decode(ids) == chars


def test_tokenizer_json_round_trip(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj == {"type": "char", "chars": tok.chars, "unk_id": 0, "vocab_size": tok.vocab_size}
    assert CharTokenizer.load(path) == tok
    assert CharTokenizer.load(str(path)).encode(TEXT).tolist() == tok.encode(TEXT).tolist()
    assert CharTokenizer.from_json(tok.to_json()) == tok


@pytest.mark.parametrize("content", [
    "{not json",
    "[1, 2]",
    '{"type": "bpe", "chars": "ab"}',
    '{"type": "char", "chars": "ba", "unk_id": 0, "vocab_size": 3}',
    '{"type": "char", "chars": "ab", "unk_id": 0, "vocab_size": 5}',
    '{"type": "char", "chars": "ab", "unk_id": 2, "vocab_size": 3}',
    '{"type": "char", "chars": "", "unk_id": 0, "vocab_size": 1}',
])
def test_tokenizer_load_rejects_malformed_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    assert_user_error(lambda: CharTokenizer.load(path), path)


def test_tokenizer_load_missing_file(tmp_path):
    path = tmp_path / "missing.json"
    assert_user_error(lambda: CharTokenizer.load(path), path, "not found")


def test_load_corpus_directory_joins_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first ’file’\n", encoding="utf-8")
    (tmp_path / "10.txt").write_text("zeroth", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "c.txt.bak").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("ignored", encoding="utf-8")
    assert load_corpus(str(tmp_path)) == "zeroth\nfirst ’file’\n\nsecond file"
    assert load_corpus(tmp_path / "b.txt") == "second file"


def test_load_corpus_normalizes_bom_and_crlf(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes("\ufeffNED: Winter.\r\nJON: Yes.\r\n".encode("utf-8"))
    assert load_corpus(path) == "NED: Winter.\nJON: Yes.\n"


@pytest.mark.parametrize("name, content, needle", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", b"", "empty"),
    ("blank.txt", b" \n\t\n", "empty"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "UTF-8"),
    ("bad.txt", b"abc\xff\xfedef", "UTF-8"),
    ("binary.txt", b"abc\x00\x01def", "binary"),
])
def test_load_corpus_bad_file(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert_user_error(lambda: load_corpus(path), path, needle)


def test_load_corpus_bad_directory(tmp_path):
    (tmp_path / "notes.md").write_text("not a script", encoding="utf-8")
    assert_user_error(lambda: load_corpus(tmp_path), tmp_path, "no .txt files")
    (tmp_path / "a.txt").write_text("\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  ", encoding="utf-8")
    assert_user_error(lambda: load_corpus(tmp_path), tmp_path, "empty")
    (tmp_path / "c.txt").write_bytes(b"\x00\x00")
    assert_user_error(lambda: load_corpus(tmp_path), "c.txt", "binary")


def test_split_is_contiguous_and_deterministic():
    tokens = np.arange(1000)
    train, val = split_tokens(tokens, 0.1, min_len=10)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    train2, val2 = split_tokens(tokens, 0.1, min_len=10)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    train, val = split_tokens(tokens, 0.25)
    assert (len(train), len(val)) == (750, 250)


def test_split_too_short_says_how_long_it_must_be():
    msg = assert_user_error(lambda: split_tokens(np.arange(50), 0.1, min_len=17),
                            "50 tokens", "17")
    need = int(re.search(r"at least (\d+)", msg).group(1))
    train, val = split_tokens(np.arange(need), 0.1, min_len=17)
    assert min(len(train), len(val)) >= 17
    assert_user_error(lambda: split_tokens(np.arange(need - 1), 0.1, min_len=17))
    assert_user_error(lambda: split_tokens(np.arange(100), 0.0))
    assert_user_error(lambda: split_tokens(np.arange(100), 1.0))


def test_get_batch_is_a_function_of_seed_and_step():
    tokens = (np.arange(10_000) % 251).astype(np.uint8)
    kw = dict(batch_size=8, seq_len=32)
    x, y = get_batch(tokens, seed=3, step=7, **kw)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int32
    x2, y2 = get_batch(tokens, seed=3, step=7, **kw)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, get_batch(tokens, seed=3, step=8, **kw)[0])
    assert not np.array_equal(x, get_batch(tokens, seed=4, step=7, **kw)[0])
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    # Every row is a real window: consecutive values of arange % 251.
    expected = (x[:, :1] + np.arange(33)) % 251
    np.testing.assert_array_equal(x, expected[:, :-1])
    np.testing.assert_array_equal(y, expected[:, 1:])


def test_get_batch_windows_cover_the_valid_range():
    n, t = 40, 8
    tokens = np.arange(n)
    starts = np.concatenate([get_batch(tokens, seed=0, step=s, batch_size=16, seq_len=t)[0][:, 0]
                             for s in range(100)])
    assert set(starts.tolist()) == set(range(n - t))  # all of [0, n - seq_len - 1]
    x, y = get_batch(tokens, seed=0, step=1, batch_size=16, seq_len=t)
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(t))
    np.testing.assert_array_equal(y, x + 1)


def test_get_batch_rows_select_part_of_the_global_batch():
    tokens = np.arange(5000)
    kw = dict(seed=11, step=5, batch_size=8, seq_len=16)
    x, y = get_batch(tokens, **kw)
    xs, ys = get_batch(tokens, rows=slice(2, 4), **kw)
    assert xs.shape == (2, 16)
    np.testing.assert_array_equal(xs, x[2:4])
    np.testing.assert_array_equal(ys, y[2:4])
    np.testing.assert_array_equal(get_batch(tokens, rows=range(4, 8), **kw)[0], x[4:8])
    assert_user_error(lambda: get_batch(tokens, rows=slice(8, 10), **kw))


def test_get_batch_rejects_bad_arguments():
    tokens = np.arange(10)
    assert_user_error(lambda: get_batch(tokens, seed=0, step=0, batch_size=2, seq_len=10), "10")
    assert_user_error(lambda: get_batch(tokens, seed=0, step=0, batch_size=0, seq_len=4))
    assert_user_error(lambda: get_batch(tokens, seed=0, step=-1, batch_size=2, seq_len=4))
    x, _ = get_batch(tokens, seed=0, step=0, batch_size=2, seq_len=9)
    np.testing.assert_array_equal(x, np.tile(np.arange(9), (2, 1)))


def test_eval_windows_are_fixed_and_spread_evenly():
    tokens = np.arange(1000)
    x, y = eval_windows(tokens, n=5, seq_len=16)
    x2, y2 = eval_windows(tokens, n=5, seq_len=16)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (5, 16) and x.dtype == np.int32
    starts = x[:, 0]
    assert starts[0] == 0 and starts[-1] == 1000 - 16 - 1
    assert np.ptp(np.diff(starts)) <= 1
    np.testing.assert_array_equal(x, starts[:, None] + np.arange(16))
    np.testing.assert_array_equal(y, x + 1)
    assert eval_windows(tokens, n=1, seq_len=16)[0][0, 0] == 0
    assert_user_error(lambda: eval_windows(np.arange(10), n=2, seq_len=10))
