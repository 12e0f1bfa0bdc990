"""Per-path token streams and random training windows, and what each window consumed."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from p2ptrain.data.corpus import Document
from p2ptrain.data.tokenizer import Tokenizer
from p2ptrain.errors import DataError

_JSONL_LINE = re.compile(r"^(.*\.jsonl):\d+$")


@dataclass
class DataUsage:
    """The input tokens a stretch of inner steps consumed, attributed to the documents they
    came from (a document's end-of-document token counts as its own)."""

    tokens: int = 0
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    docs_by_source: dict[str, int] = field(default_factory=dict)  # distinct documents touched
    files_by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> file -> tokens
    documents_by_source: dict[str, list[str]] = field(default_factory=dict)  # source -> document digests


def document_file(doc: Document) -> str:
    """The file a document came from (a .jsonl line counts as its file)."""
    m = _JSONL_LINE.match(doc.source)
    return m.group(1) if m else doc.source


class TokenStream:
    """Documents of one shard concatenated (separated by EOS) into one token tensor."""

    def __init__(self, docs: Sequence[Document], tokenizer: Tokenizer):
        parts = []
        for doc in docs:
            parts.append(tokenizer.encode(doc.text))
            parts.append(np.array([tokenizer.eos_id], dtype=np.int32))
        self.num_docs = len(docs)
        self.docs = list(docs)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        # document i owns tokens [ends[i-1], ends[i]): its text and its EOS
        self.doc_ends = np.cumsum(np.array([len(p) + 1 for p in parts[0::2]], dtype=np.int64))
        self._doc_tokens = np.zeros(len(docs), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def sample(self, batch_size: int, context: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of context+1 tokens: inputs and next-token targets.

        The inputs' tokens are counted per document (see take_usage)."""
        if len(self) < context + 2:
            raise DataError(f"this shard has only {len(self)} tokens; need more than {context + 1} "
                            f"(add data with --data, or use a smaller model.context)")
        starts = torch.randint(0, len(self) - context - 1, (batch_size,), generator=generator)
        offsets = torch.arange(context + 1)
        windows = self.tokens[starts[:, None] + offsets[None, :]]
        self._count(starts.numpy(), context)
        return windows[:, :-1], windows[:, 1:]

    def _count(self, starts: np.ndarray, context: int) -> None:
        ends = self.doc_ends
        first = np.searchsorted(ends, starts, side="right")
        last = np.searchsorted(ends, starts + context - 1, side="right")
        for s, i0, i1 in zip(starts.tolist(), first.tolist(), last.tolist()):
            if i0 == i1:  # the usual case: the window lies inside one document
                self._doc_tokens[i0] += context
                continue
            for i in range(i0, i1 + 1):
                begin = ends[i - 1] if i else 0
                self._doc_tokens[i] += min(ends[i], s + context) - max(begin, s)

    def take_usage(self) -> DataUsage:
        """What sample() handed out since the last call, per source; resets the count."""
        usage = DataUsage()
        tokens: dict[str, int] = defaultdict(int)
        docs: dict[str, int] = defaultdict(int)
        files: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        digests: dict[str, list[str]] = defaultdict(list)
        for i in np.flatnonzero(self._doc_tokens).tolist():
            doc, n = self.docs[i], int(self._doc_tokens[i])
            tokens[doc.origin] += n
            docs[doc.origin] += 1
            files[doc.origin][document_file(doc)] += n
            digests[doc.origin].append(doc.digest.hex()[:16])
        usage.tokens = int(self._doc_tokens.sum())
        usage.tokens_by_source = dict(tokens)
        usage.docs_by_source = dict(docs)
        usage.files_by_source = {k: dict(v) for k, v in files.items()}
        usage.documents_by_source = dict(digests)
        self._doc_tokens[:] = 0
        return usage
