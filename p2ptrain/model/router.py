"""Route documents to paths: hashed character n-grams of a document's prefix, then
balanced k-means.

The run's creator fits the router once (deterministically from the run seed and a data
sample) and ships it inside the run state, so every peer routes its private documents
the same way. Balance: plain nearest-centroid routing can starve a path, so each
centroid carries an offset, tuned on the fitting sample until each path's share of the
*tokens* is near 1/k — training consumes tokens, not documents, and on natural text long
documents cluster, so balancing document counts can leave one path with most of the
tokens. A document weighs its UTF-8 bytes + 1 (its tokens under the byte tokenizer, and
proportional to them under a BPE). Routing one document is still a pure function of its
text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from p2ptrain.config import RouterConfig

_PRIME = np.uint64(1_000_003)
_BALANCE_ITERS = 300
_BALANCE_SLACK = 0.1  # token shares within (1 ± slack) / k count as balanced


def hashed_ngram_features(texts: Sequence[str], prefix_chars: int, ngram: int, features: int) -> np.ndarray:
    """One L2-normalised row of log(1 + count) over hashed byte n-grams per text."""
    out = np.zeros((len(texts), features), dtype=np.float32)
    for row, text in enumerate(texts):
        b = np.frombuffer(text[:prefix_chars].encode("utf-8", "replace"), dtype=np.uint8).astype(np.uint64)
        if len(b) < ngram:
            b = np.concatenate([b, np.zeros(ngram - len(b), dtype=np.uint64)])
        h = np.zeros(len(b) - ngram + 1, dtype=np.uint64)
        for j in range(ngram):
            h = h * _PRIME + b[j:len(b) - ngram + 1 + j]
        counts = np.bincount((h % np.uint64(features)).astype(np.int64), minlength=features)
        out[row] = np.log1p(counts)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


@dataclass
class Router:
    centroids: np.ndarray  # (paths, features)
    offsets: np.ndarray  # (paths,) added to squared distances, tuned for balance
    prefix_chars: int
    ngram: int

    @property
    def num_paths(self) -> int:
        return int(self.centroids.shape[0])

    def features(self, texts: Sequence[str]) -> np.ndarray:
        return hashed_ngram_features(texts, self.prefix_chars, self.ngram, self.centroids.shape[1])

    def route(self, texts: Sequence[str]) -> np.ndarray:
        """Path number (index into Grid.paths()) for each text."""
        if len(texts) == 0:
            return np.zeros(0, dtype=np.int64)
        return _assign(self.features(texts), self.centroids, self.offsets)

    # --------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, texts: Sequence[str], num_paths: int, cfg: RouterConfig, seed: int) -> "Router":
        rng = np.random.default_rng(seed)
        if len(texts) > cfg.sample_docs:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), cfg.sample_docs, replace=False))]
        x = hashed_ngram_features(texts, cfg.prefix_chars, cfg.ngram, cfg.features)
        weights = document_weights(texts)
        if num_paths == 1:
            return cls(x.mean(0, keepdims=True), np.zeros(1, np.float32), cfg.prefix_chars, cfg.ngram)
        if len(x) < num_paths:
            raise ValueError(f"need at least {num_paths} documents to fit a router, got {len(x)}")
        centroids = _kmeans_plus_plus(x, num_paths, rng)
        offsets = np.zeros(num_paths, dtype=np.float32)
        for _ in range(cfg.kmeans_iters):
            labels = _assign(x, centroids, offsets)
            for k in range(num_paths):
                members = x[labels == k]
                if len(members):
                    centroids[k] = members.mean(0)
            offsets = _balance_offsets(x, centroids, weights)
        return cls(centroids.astype(np.float32), offsets, cfg.prefix_chars, cfg.ngram)

    # ------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        return {
            "centroids": np.round(self.centroids.astype(np.float64), 7).tolist(),
            "offsets": np.round(self.offsets.astype(np.float64), 7).tolist(),
            "prefix_chars": self.prefix_chars,
            "ngram": self.ngram,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Router":
        return cls(np.asarray(d["centroids"], dtype=np.float32), np.asarray(d["offsets"], dtype=np.float32),
                   int(d["prefix_chars"]), int(d["ngram"]))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _assign(x: np.ndarray, centroids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.argmin(d2 + offsets[None, :], axis=1)


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.stack(centroids)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centroids.append(x[rng.choice(len(x), p=p)])
    return np.stack(centroids).astype(np.float64)


def document_weights(texts: Sequence[str]) -> np.ndarray:
    """What a document costs to train on: its UTF-8 bytes plus an end-of-document token."""
    return np.array([len(t.encode("utf-8", "replace")) + 1 for t in texts], dtype=np.float64)


def _balance_offsets(x: np.ndarray, centroids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Raise the offset of over-full paths until every path's share of the weight (tokens)
    is within the slack of 1/k."""
    k = len(centroids)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    offsets = np.zeros(k, dtype=np.float64)
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    step = float(np.median(np.abs(d2 - d2.min(1, keepdims=True)))) or 1e-3
    for i in range(_BALANCE_ITERS):
        shares = np.bincount(np.argmin(d2 + offsets, axis=1), weights=w, minlength=k) / w.sum()
        if shares.max() <= (1 + _BALANCE_SLACK) / k and shares.min() >= (1 - _BALANCE_SLACK) / k:
            break
        offsets += step * (shares - 1 / k) * k / (1 + i / 30)
    return offsets.astype(np.float32)


def shard_shares(assignments: np.ndarray, num_paths: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Each path's share of the documents, or of their weights (e.g. tokens) when given."""
    if len(assignments) == 0:
        return np.zeros(num_paths)
    if weights is None:
        return np.bincount(assignments, minlength=num_paths) / len(assignments)
    w = np.asarray(weights, dtype=np.float64)
    return np.bincount(assignments, weights=w, minlength=num_paths) / max(w.sum(), 1e-12)
