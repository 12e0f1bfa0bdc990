"""Tokenizers: byte-level by default, or a Hugging Face `tokenizers` JSON file."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from p2ptrain.errors import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", "replace")


class HFTokenizer:
    """A `tokenizers` JSON file (e.g. a GPT-2 BPE); needs the optional `tokenizers` package."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise ConfigError(f"data.tokenizer = {str(path)!r} needs the 'tokenizers' package "
                              "(pip install 'p2ptrain[gpu]' or pip install tokenizers)") from None
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ConfigError(f"data.tokenizer: cannot load {path}: {e}") from None
        vocab = self._tok.get_vocab()
        eos = next((vocab[t] for t in ("<|endoftext|>", "</s>", "<eos>") if t in vocab), None)
        self.vocab_size = self._tok.get_vocab_size() + (1 if eos is None else 0)
        self.eos_id = eos if eos is not None else self.vocab_size - 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eos_id])


def load_tokenizer(spec: str) -> Tokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: {spec!r} is neither 'bytes' nor an existing tokenizer.json file")
    return HFTokenizer(path)
