"""Per-path token streams and random training windows."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from p2ptrain.data.corpus import Document
from p2ptrain.data.tokenizer import Tokenizer
from p2ptrain.errors import DataError


class TokenStream:
    """Documents of one shard concatenated (separated by EOS) into one token tensor."""

    def __init__(self, docs: Sequence[Document], tokenizer: Tokenizer):
        parts = []
        for doc in docs:
            parts.append(tokenizer.encode(doc.text))
            parts.append(np.array([tokenizer.eos_id], dtype=np.int32))
        self.num_docs = len(docs)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        self.tokens = torch.from_numpy(tokens.astype(np.int64))

    def __len__(self) -> int:
        return int(self.tokens.numel())

    def sample(self, batch_size: int, context: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of context+1 tokens: inputs and next-token targets."""
        if len(self) < context + 2:
            raise DataError(f"this shard has only {len(self)} tokens; need more than {context + 1} "
                            f"(add data with --data, or use a smaller model.context)")
        starts = torch.randint(0, len(self) - context - 1, (batch_size,), generator=generator)
        offsets = torch.arange(context + 1)
        windows = self.tokens[starts[:, None] + offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]
