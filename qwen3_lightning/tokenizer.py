"""A character tokenizer: one token per Unicode code point, so Chinese needs no word segmenter."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
_FORMAT, _VERSION = "qwen3_lightning.CharTokenizer", 1


class CharTokenizer:
    """Maps every character to an id; the four special tokens come first (``<pad>`` is 0).

    Args:
        vocab_size: the most entries the vocabulary may hold, specials included (``None``: no limit).
        min_freq: characters seen fewer times than this in the training texts become ``<unk>``.
    """

    pad_token, unk_token, bos_token, eos_token = SPECIAL_TOKENS
    pad_token_id, unk_token_id, bos_token_id, eos_token_id = range(len(SPECIAL_TOKENS))

    def __init__(self, vocab_size: int | None = None, min_freq: int = 1) -> None:
        if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for characters: the {len(SPECIAL_TOKENS)} special "
                f"tokens {list(SPECIAL_TOKENS)} come first. Use a vocab_size above {len(SPECIAL_TOKENS)}, "
                "or None for no limit."
            )
        if min_freq < 1:
            raise ValueError(f"min_freq={min_freq} must be at least 1.")
        self.max_vocab_size = vocab_size
        self.min_freq = min_freq
        self._set_vocab(list(SPECIAL_TOKENS))

    def _set_vocab(self, tokens: list[str]) -> None:
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with the special tokens {list(SPECIAL_TOKENS)}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not hold the same token twice")
        self.id_to_token = tokens
        self.token_to_id = {token: i for i, token in enumerate(tokens)}

    def build_vocab(self, texts: Iterable[str], min_freq: int | None = None) -> CharTokenizer:
        """Keeps the most frequent characters; ties go to the smaller code point, so ids never
        depend on the order in which texts or files were read."""
        min_freq = self.min_freq if min_freq is None else min_freq
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        chars = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
        if self.max_vocab_size is not None:
            chars = chars[: self.max_vocab_size - len(SPECIAL_TOKENS)]
        self._set_vocab(list(SPECIAL_TOKENS) + chars)
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str, max_length: int | None = None, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``, with ``<bos>``/``<eos>`` around it when ``add_special_tokens``; cut to ``max_length``."""
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length={max_length} must be >= 0, or None for no limit.")
        get, unk = self.token_to_id.get, self.unk_token_id
        ids = [get(c, unk) for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id, *ids, self.eos_token_id]
        return ids[:max_length] if max_length is not None else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, unk: str | None = None) -> str:
        """The text of ``ids``. ``skip_special_tokens`` drops ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``; an id
        outside the vocabulary (a model with more rows than it) is written as ``<unk>`` even so, to be seen. With
        ``unk``, ``<unk>`` and ids outside the vocabulary are written as that text (e.g. "\ufffd") instead."""
        vocab, pieces = self.id_to_token, []
        for i in map(int, ids):
            unknown = i == self.unk_token_id or not 0 <= i < len(vocab)
            if unknown and unk is not None:
                pieces.append(unk)
            elif not 0 <= i < len(vocab):
                pieces.append(self.unk_token)
            elif not (skip_special_tokens and i < len(SPECIAL_TOKENS)):
                pieces.append(vocab[i])
        return "".join(pieces)

    def unknown_chars(self, text: str) -> set[str]:
        return {c for c in text if c not in self.token_to_id}

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "min_freq": self.min_freq,
            "max_vocab_size": self.max_vocab_size,
            "vocab": self.id_to_token,
        }

    @classmethod
    def from_dict(cls, state: dict, source: str = "the state") -> CharTokenizer:
        if not isinstance(state, dict):
            raise ValueError(f"{source} holds no character vocabulary (a 'vocab' list of strings).")
        # format and version first: a later version may lay the vocabulary out otherwise
        form, version = state.get("format", _FORMAT), state.get("version", _VERSION)
        if form != _FORMAT:
            raise ValueError(f"{source} holds a vocabulary of format {form!r}, not a CharTokenizer's ({_FORMAT!r}).")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{source} has version={version!r}; a CharTokenizer's version is a whole number >= 1.")
        if version > _VERSION:
            raise ValueError(
                f"{source} holds a CharTokenizer vocabulary of version {version}, which a newer qwen3_lightning "
                f"wrote; this one reads up to version {_VERSION}: upgrade the package to read it."
            )
        vocab = state.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise ValueError(f"{source} holds no character vocabulary (a 'vocab' list of strings).")
        tokenizer = cls(min_freq=state.get("min_freq", 1))
        tokenizer.max_vocab_size = state.get("max_vocab_size")
        tokenizer._set_vocab(vocab)
        return tokenizer

    def save(self, path: str | Path) -> None:
        """Writes the vocabulary as readable UTF-8 JSON, one token per line."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist.")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a tokenizer JSON file written by CharTokenizer.save: {err}") from err
        if isinstance(state, dict) and "model" in state and "vocab" not in state:
            raise ValueError(
                f"{path} is a transformers (tokenizers) file, such as export writes, not a CharTokenizer "
                "vocabulary: use the training run's logs/version_N/tokenizer.json, its checkpoint, or the folder "
                "that holds this file."
            )
        return cls.from_dict(state, source=str(path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.id_to_token == other.id_to_token

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


SimpleTokenizer = CharTokenizer
