"""Documents from local directories, and the built-in default corpus.

The default corpus is this machine's own Python standard library source: real text that
is present on every machine with Python, so `p2ptrain train` works with no download.
A document never leaves the machine; only the model's parameters are shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from p2ptrain.errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIX = ".jsonl"
DEFAULT_CORPUS_MAX_CHARS = 12_000_000  # keeps routing and loading of the default corpus to ~1 s
_SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "config-3"}


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file (and line for jsonl) it came from, for error messages and reports
    origin: str = ""  # the registered data source (or "--data", "built-in corpus") it belongs to

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.text.encode("utf-8", "replace")).digest()


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_files(root: Path, suffixes: Sequence[str], skip_dirs: set[str] = frozenset()) -> Iterable[Path]:
    """Files under root with the given suffixes, in a deterministic order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(tuple(suffixes)):
                yield Path(dirpath) / name


def split_text(text: str, max_chars: int) -> list[str]:
    """Split long text into pieces of at most max_chars, preferring blank-line boundaries."""
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # one enormous line: cut it
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        boundary = line.strip() == "" and size > max_chars // 2
        if size + len(line) > max_chars or boundary:
            if current:
                pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def _read_jsonl(path: Path) -> Iterable[tuple[str, str]]:
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            yield text, f"{path}:{lineno}"
    if bad:
        logger.warning("%s: skipped %d lines that are not JSON objects with a string 'text' field", path, bad)


BUILTIN_ORIGIN = "built-in corpus"
DATA_DIRS_ORIGIN = "--data"


def load_documents(dirs: Sequence[str | Path] | None, max_doc_chars: int,
                   max_total_chars: int | None = None,
                   redact: Callable[[str], str] | None = None) -> list[Document]:
    """Read documents from directories (or files) of .txt/.md/.py/.rst/.jsonl.

    With no dirs, reads the built-in default corpus (the Python standard library).
    `redact` (see p2ptrain.data.redact) rewrites each text before it is split.
    Raises DataError when a directory is missing or nothing readable is found.
    """
    if not dirs:
        roots, skip = [default_corpus_dir()], _SKIPPED_STDLIB_DIRS
        max_total_chars = max_total_chars or DEFAULT_CORPUS_MAX_CHARS
        origin = BUILTIN_ORIGIN
    else:
        roots, skip = [Path(d).expanduser() for d in dirs], set()
        origin = DATA_DIRS_ORIGIN
    docs: list[Document] = []
    total = 0
    unreadable = 0
    for root in roots:
        if not root.exists():
            raise DataError(f"data directory {root} does not exist")
        files = [root] if root.is_file() else list(iter_files(root, TEXT_SUFFIXES + (JSONL_SUFFIX,), skip))
        for path in files:
            try:
                if path.suffix == JSONL_SUFFIX:
                    entries = list(_read_jsonl(path))
                else:
                    entries = [(path.read_text(encoding="utf-8", errors="replace"), str(path))]
            except OSError as e:
                unreadable += 1
                logger.warning("skipping unreadable %s: %s", path, e.strerror)
                continue
            for text, source in entries:
                if redact is not None:
                    text = redact(text)
                for piece in split_text(text, max_doc_chars):
                    docs.append(Document(piece, source, origin))
                    total += len(piece)
            if max_total_chars and total >= max_total_chars:
                break
    if not docs:
        where = ", ".join(map(str, roots))
        extra = f" ({unreadable} unreadable files)" if unreadable else ""
        raise DataError(f"no documents found in {where}{extra}: expected non-empty "
                        f"{', '.join(TEXT_SUFFIXES)} files or .jsonl with a 'text' field")
    return docs


def split_heldout(docs: Sequence[Document], heldout_percent: float) -> tuple[list[Document], list[Document]]:
    """Deterministic train / held-out split by document content hash (order-independent)."""
    train, heldout = [], []
    threshold = round(heldout_percent * 100)  # in units of 0.01 %; round: int(2.3 * 100) is 229
    for doc in docs:
        bucket = int.from_bytes(doc.digest[:4], "little") % 10_000
        (heldout if bucket < threshold else train).append(doc)
    return train, heldout
