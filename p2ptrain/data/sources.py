"""Data sources a contributor registers in a node home, and the documents they yield.

A source is a directory with include/exclude globs, a name and the redaction kinds it
uses, kept as a ``[[sources]]`` table in ``<home>/settings.toml`` (the rest of that file
is left as it is). Scanning a source walks it in a fixed order and skips, and lists with
the reason, everything that is not a readable UTF-8 text file of a sane size inside the
source: excluded or not included names, symlinks that lead out of the source, devices,
FIFOs and sockets, files over the size cap, binary files, files that are not UTF-8, and
unreadable files. Nothing a source contains can crash the scan.

A small index per source (``<home>/sources/<name>/index.json``: path, size, mtime,
content hash, documents, characters, tokens, redactions, routed tokens per path) lets a
node pick up new and changed files at a round boundary by re-reading only what changed,
and lets ``p2ptrain data list`` report a source without reading it again.

Documents never leave the machine: they are read, redacted (p2ptrain.data.redact) and
tokenized here; only the model's pseudo-gradients are averaged with peers.

`DocumentFeed` is what training uses: it yields the documents of the registered sources
(or of ``--data`` directories, or the built-in corpus when neither is there); the round
driver calls `begin_round` before each round's inner steps (swap in what changed) and
`end_round` after it (record the round in the ledger).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from p2ptrain.data.corpus import (BUILTIN_ORIGIN, DATA_DIRS_ORIGIN, JSONL_SUFFIX, TEXT_SUFFIXES, Document,
                                  load_documents, split_heldout, split_text)
from p2ptrain.data.ledger import Ledger, write_atomic
from p2ptrain.data.redact import KINDS, Redactor, parse_kinds
from p2ptrain.errors import ConfigError, DataError, UserError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.toml"
DEFAULT_INCLUDE = tuple(f"*{suffix}" for suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,))
DEFAULT_EXCLUDE = (".*", "__pycache__", "node_modules")  # hidden files and folders (.git, .ssh, .env ...)
DEFAULT_MAX_FILE_MB = 16.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BINARY_PROBE = 8192
INDEX_VERSION = 1


# ------------------------------------------------------------------ registry

@dataclass
class SourceSpec:
    """One registered source, as kept in the home's settings file."""

    name: str
    path: str  # absolute
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    redact: list[str] = field(default_factory=lambda: list(KINDS))
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    added_at: str = ""

    @property
    def root(self) -> Path:
        return Path(self.path)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


def settings_path(home: Path) -> Path:
    return Path(home) / SETTINGS_FILE


def source_dir(home: Path, name: str) -> Path:
    return Path(home) / "sources" / name


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError(f"source name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    return name


def read_sources(home: Path) -> list[SourceSpec]:
    """The sources registered in the home's settings file (none when there is no file)."""
    path = settings_path(home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    entries = raw.get("sources", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'sources' must be a list of [[sources]] tables")
    specs, seen = [], set()
    known = {f.name: f for f in dataclasses.fields(SourceSpec)}
    for i, entry in enumerate(entries):
        where = f"{path}: sources[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(entry) - set(known)
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; allowed: {', '.join(known)}")
        for key in ("name", "path"):
            if not isinstance(entry.get(key), str):
                raise ConfigError(f"{where}.{key}: expected a string")
        for key in ("include", "exclude", "redact"):
            if key in entry and not (isinstance(entry[key], list) and all(isinstance(v, str) for v in entry[key])):
                raise ConfigError(f"{where}.{key}: expected a list of strings")
        if "max_file_mb" in entry and (not isinstance(entry["max_file_mb"], (int, float))
                                       or isinstance(entry["max_file_mb"], bool) or entry["max_file_mb"] <= 0):
            raise ConfigError(f"{where}.max_file_mb: expected a positive number")
        try:
            check_name(entry["name"])
            parse_kinds(entry.get("redact", KINDS))
        except (UserError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if entry["name"] in seen:
            raise ConfigError(f"{where}: the name {entry['name']!r} is used twice")
        seen.add(entry["name"])
        spec = SourceSpec(**{k: v for k, v in entry.items()})
        spec.max_file_mb = float(spec.max_file_mb)
        specs.append(spec)
    return specs


def _source_block(spec: SourceSpec) -> str:
    def value(v) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(json.dumps(x) for x in v) + "]"
        return json.dumps(v)  # JSON strings and numbers are valid TOML
    lines = ["[[sources]]"] + [f"{f.name} = {value(getattr(spec, f.name))}" for f in dataclasses.fields(spec)]
    return "\n".join(lines) + "\n"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def write_sources(home: Path, specs: Sequence[SourceSpec]) -> None:
    """Rewrite the [[sources]] tables of the settings file, keeping every other line as it is."""
    path = settings_path(home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    kept, in_sources = [], False
    for line in text.splitlines(keepends=True):
        m = _HEADER.match(line)
        if m:
            in_sources = m.group(1) == "[[" and m.group(2) == "sources"
        if not in_sources:
            kept.append(line)
    body = "".join(kept).rstrip()
    blocks = "\n".join(_source_block(s) for s in specs)
    out = (body + "\n\n" if body else "") + blocks
    Path(home).mkdir(parents=True, exist_ok=True)
    write_atomic(path, out if out.endswith("\n") or not out else out + "\n")
    read_sources(home)  # what we wrote must read back


@contextlib.contextmanager
def settings_lock(home: Path) -> Iterator[None]:
    Path(home).mkdir(parents=True, exist_ok=True)
    with open(Path(home) / "settings.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def add_source(home: Path, directory: str | Path, name: str | None = None, include: Sequence[str] = (),
               exclude: Sequence[str] = (), redact: str | None = None,
               max_file_mb: float = DEFAULT_MAX_FILE_MB) -> SourceSpec:
    """Register a directory as a source of this home. --include replaces the default
    patterns; --exclude adds to the defaults (hidden files and folders)."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (register the folder that holds it)")
    root = root.resolve()
    name = check_name(name or root.name)
    try:
        kinds = parse_kinds(redact)
    except ValueError as e:
        raise UserError(f"--redact: {e}") from None
    spec = SourceSpec(name=name, path=str(root), include=list(include) or list(DEFAULT_INCLUDE),
                      exclude=list(DEFAULT_EXCLUDE) + [e for e in exclude if e not in DEFAULT_EXCLUDE],
                      redact=list(kinds), max_file_mb=float(max_file_mb),
                      added_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with settings_lock(home):
        specs = read_sources(home)
        for other in specs:
            if other.name == name:
                raise UserError(f"a source named {name!r} is already registered ({other.path}); "
                                "pick another --name or remove it first")
            if Path(other.path) == root:
                raise UserError(f"{root} is already registered as {other.name!r}")
        write_sources(home, [*specs, spec])
    Ledger(home).reopen_source(name)
    return spec


def remove_source(home: Path, name: str) -> SourceSpec:
    """Unregister a source (its ledger entry stays; see Ledger.close_source)."""
    with settings_lock(home):
        specs = read_sources(home)
        found = [s for s in specs if s.name == name]
        if not found:
            raise UserError(f"no source named {name!r} in this home"
                            + (f"; registered: {', '.join(s.name for s in specs)}" if specs else
                               " (none registered; see p2ptrain data add)"))
        write_sources(home, [s for s in specs if s.name != name])
    index = source_dir(home, name) / "index.json"
    with contextlib.suppress(FileNotFoundError):
        index.unlink()
    return found[0]


def get_source(home: Path, name: str) -> SourceSpec | None:
    return next((s for s in read_sources(home) if s.name == name), None)


# ------------------------------------------------------------------ scanning

@dataclass
class FileEntry:
    """What the index keeps per file."""

    size: int
    mtime_ns: int
    sha256: str
    documents: int = 0
    chars: int = 0
    tokens: int = 0
    redactions: dict[str, int] = field(default_factory=dict)
    bad_lines: int = 0  # .jsonl lines that are not objects with a string "text"
    routes: dict[str, int] | None = None  # path → training tokens routed to it (None: not routed yet)
    heldout_tokens: int = 0


@dataclass
class SourceScan:
    """One pass over a source: its documents (when asked for), files and what was skipped."""

    name: str
    root: Path
    files: dict[str, FileEntry] = field(default_factory=dict)  # relative path → entry
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    read: int = 0  # files actually read in this pass

    @property
    def redactions(self) -> dict[str, int]:
        total: Counter = Counter()
        for entry in self.files.values():
            total.update(entry.redactions)
        return dict(sorted(total.items()))

    def summary(self) -> dict:
        reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
        return {"name": self.name, "path": str(self.root), "files": len(self.files),
                "documents": sum(e.documents for e in self.files.values()),
                "chars": sum(e.chars for e in self.files.values()),
                "tokens": sum(e.tokens for e in self.files.values()),
                "redactions": self.redactions, "skipped": len(self.skipped), "skipped_by_reason": dict(reasons)}


def _matches(patterns: Sequence[str], rel: str) -> str | None:
    base = rel.rsplit("/", 1)[-1]
    for pattern in patterns:
        if fnmatch.fnmatchcase(base, pattern) or fnmatch.fnmatchcase(rel, pattern):
            return pattern
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _walk(spec: SourceSpec, skipped: list[tuple[str, str]]) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every candidate file in a fixed order; skips are listed."""
    root = spec.root
    real_root = root.resolve()

    def on_error(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        skipped.append((rel.replace(os.sep, "/") + "/", f"unreadable folder: {e.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        keep = []
        for d in sorted(dirnames):
            rel = rel_dir + d
            pattern = _matches(spec.exclude, rel)
            if pattern:
                skipped.append((rel + "/", f"excluded: matches {pattern!r}"))
            elif os.path.islink(os.path.join(dirpath, d)):
                target = Path(dirpath, d).resolve()
                skipped.append((rel + "/", "symlink out of the source" if not _inside(target, real_root)
                                else "symlinked folder: not followed (its target is read where it lies)"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = rel_dir + name
            pattern = _matches(spec.exclude, rel)
            if pattern:
                skipped.append((rel, f"excluded: matches {pattern!r}"))
            elif not _matches(spec.include, rel):
                skipped.append((rel, "not included: matches no include pattern"))
            else:
                yield rel, Path(dirpath, name)


def _check_file(path: Path, spec: SourceSpec, real_root: Path) -> tuple[str | None, os.stat_result | None]:
    """(None, stat) for a file we may read, else (the reason to skip it, None). Never opens
    the file, so a FIFO or a device cannot block or harm the scan."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode) and not _inside(path.resolve(), real_root):
            return "symlink out of the source", None
        st = os.stat(path)
    except OSError as e:
        return f"unreadable: {e.strerror or e}", None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file: device, FIFO or socket", None
    if st.st_size > spec.max_file_bytes:
        return f"too large: {st.st_size / 2**20:.1f} MiB, over the {spec.max_file_mb:g} MiB cap", None
    if st.st_size == 0:
        return "empty", None
    return None, st


def _decode(data: bytes) -> tuple[str | None, str | None]:
    if b"\0" in data[:_BINARY_PROBE]:
        return None, "binary: contains NUL bytes"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: invalid byte at offset {e.start}"


def _texts_of(rel: str, text: str) -> tuple[list[tuple[str, int | None]], int]:
    """[(text, jsonl line or None)], bad jsonl lines."""
    if not rel.endswith(JSONL_SUFFIX):
        return [(text, None)], 0
    out, bad = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TypeError
        except (ValueError, TypeError):
            bad += 1
            continue
        out.append((record["text"], lineno))
    return out, bad


class SourceScanner:
    """Scans one source, reusing what it (or the on-disk index) knows about unchanged files."""

    def __init__(self, spec: SourceSpec, max_doc_chars: int, tokenizer=None, origin: str | None = None):
        self.spec = spec
        self.max_doc_chars = max_doc_chars
        self.tokenizer = tokenizer
        self.origin = origin or spec.name
        self.kinds = tuple(parse_kinds(spec.redact))
        self._docs: dict[str, tuple[FileEntry, list[Document]]] = {}  # in memory, for refresh
        self.index: dict[str, FileEntry] = {}
        self.router: str | None = None  # fingerprint of the router the index's routes were made with
        self._rejected: dict[str, tuple[int, int, str]] = {}  # read and skipped: (size, mtime_ns, reason)

    def load_index(self, path: Path) -> None:
        """Start from an index on disk (entries are trusted only while size and mtime match)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("version") != INDEX_VERSION or raw.get("max_doc_chars") != self.max_doc_chars \
                    or raw.get("redact") != list(self.kinds) or raw.get("root") != self.spec.path:
                return  # made under other settings: read everything again
            self.index = {rel: FileEntry(**e) for rel, e in raw["files"].items()}
            self.router = raw.get("router")
        except FileNotFoundError:
            return
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("ignoring the unreadable index %s (%s); the source is read again", path, e)

    def save_index(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"version": INDEX_VERSION, "root": self.spec.path,
                                       "max_doc_chars": self.max_doc_chars, "redact": list(self.kinds),
                                       "router": self.router,
                                       "files": {rel: dataclasses.asdict(e) for rel, e in self.index.items()}},
                                      sort_keys=True))

    def scan(self, need_documents: bool = True) -> SourceScan:
        """Walk the source. Unchanged files (same size and mtime) are not read again: their
        documents come from memory, or, when documents are not needed, their numbers come
        from the index. A file whose mtime changed but whose content hash did not keeps
        its documents too."""
        root = self.spec.root
        scan = SourceScan(self.spec.name, root)
        if not root.is_dir():
            raise DataError(f"source {self.spec.name!r}: {root} is missing or not a directory "
                            f"(remove it with p2ptrain data remove {self.spec.name}, or restore the folder)")
        real_root = root.resolve()
        previous = dict(self.index)
        seen: set[str] = set()
        for rel, path in _walk(self.spec, scan.skipped):
            seen.add(rel)
            reason, st = _check_file(path, self.spec, real_root)
            if reason is not None:
                scan.skipped.append((rel, reason))
                continue
            rejected = self._rejected.get(rel)
            if rejected is not None and rejected[:2] == (st.st_size, st.st_mtime_ns):
                scan.skipped.append((rel, rejected[2]))  # unchanged since we read it and said no
                continue
            old = previous.get(rel)
            same_stat = old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
            if same_stat and rel in self._docs and self._docs[rel][0] is old:
                entry, docs = self._docs[rel]
                self._keep(scan, rel, entry, docs)
                continue
            if same_stat and not need_documents:
                scan.files[rel] = old
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(self.spec.max_file_bytes + 1)
            except OSError as e:
                scan.skipped.append((rel, f"unreadable: {e.strerror}"))
                continue
            scan.read += 1
            digest = hashlib.sha256(data).hexdigest()
            if old is not None and old.sha256 == digest and rel in self._docs:
                entry, docs = self._docs[rel]  # touched, not changed
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                self._keep(scan, rel, entry, docs)
                continue
            text, reason = _decode(data)
            entry, docs = self._documents(rel, path, text, st, digest) if text is not None else (None, [])
            if reason is None and not docs:
                reason = "no text: blank, or no usable .jsonl lines"
            if reason is not None:
                scan.skipped.append((rel, reason))
                self._rejected[rel] = (st.st_size, st.st_mtime_ns, reason)
                continue
            self._rejected.pop(rel, None)
            if old is None:
                scan.added.append(rel)
            elif old.sha256 != digest:
                scan.changed.append(rel)
            self._docs[rel] = (entry, docs)
            self._keep(scan, rel, entry, docs)
        scan.removed = sorted(set(previous) - set(scan.files))
        for rel in scan.removed:
            self._docs.pop(rel, None)
        self.index = dict(scan.files)
        if not need_documents:
            scan.documents = []
        return scan

    def _keep(self, scan: SourceScan, rel: str, entry: FileEntry, docs: list[Document]) -> None:
        scan.files[rel] = entry
        scan.documents.extend(docs)

    def _documents(self, rel: str, path: Path, text: str, st: os.stat_result, digest: str) -> tuple[FileEntry, list[Document]]:
        redactor = Redactor(self.kinds)
        texts, bad = _texts_of(rel, text)
        docs: list[Document] = []
        for body, lineno in texts:
            if self.kinds:
                body = redactor(body)
            where = str(path) if lineno is None else f"{path}:{lineno}"
            docs.extend(Document(piece, where, self.origin) for piece in split_text(body, self.max_doc_chars))
        entry = FileEntry(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest, documents=len(docs),
                          chars=sum(len(d.text) for d in docs), tokens=sum(self._tokens(d.text) for d in docs),
                          redactions=dict(sorted(redactor.counts.items())), bad_lines=bad)
        return entry, docs

    def _tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode("utf-8", "replace")) + 1  # byte tokens plus end-of-document
        return len(self.tokenizer.encode(text)) + 1

    def documents_of(self, rel: str) -> list[Document]:
        """The documents of one indexed file (from memory, else read again)."""
        if rel in self._docs:
            return self._docs[rel][1]
        path = self.spec.root / rel
        reason, st = _check_file(path, self.spec, self.spec.root.resolve())
        if reason is not None:
            return []
        try:
            data = path.read_bytes()
        except OSError:
            return []
        text, reason = _decode(data)
        if text is None:
            return []
        return self._documents(rel, path, text, st, hashlib.sha256(data).hexdigest())[1]


def check_directory(directory: str | Path, max_doc_chars: int, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), redact: str | None = None,
                    max_file_mb: float = DEFAULT_MAX_FILE_MB, tokenizer=None) -> SourceScan:
    """`data check`: what a source at `directory` would read, skip and redact. Writes nothing."""
    root = Path(directory).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    try:
        kinds = parse_kinds(redact)
    except ValueError as e:
        raise UserError(f"--redact: {e}") from None
    spec = SourceSpec(name=root.resolve().name or "source", path=str(root.resolve()),
                      include=list(include) or list(DEFAULT_INCLUDE),
                      exclude=list(DEFAULT_EXCLUDE) + [e for e in exclude if e not in DEFAULT_EXCLUDE],
                      redact=list(kinds), max_file_mb=float(max_file_mb))
    return SourceScanner(spec, max_doc_chars, tokenizer).scan()


def route_files(scanner: SourceScanner, scan: SourceScan, run_state) -> int:
    """Fill each file's training tokens per path (and held-out tokens) under the run's router,
    reusing what the index holds for the same router. Returns how many files were routed."""
    from p2ptrain.model.grid import path_name
    paths = [path_name(p) for p in run_state.grid.paths()]
    heldout_percent = run_state.config.data.heldout_percent
    fingerprint = run_state.router.fingerprint()
    if scanner.router != fingerprint:
        for entry in scan.files.values():
            entry.routes = None
    scanner.router = fingerprint
    routed = 0
    for rel, entry in scan.files.items():
        if entry.routes is not None:
            continue
        routed += 1
        docs = scanner.documents_of(rel)
        train, heldout = split_heldout(docs, heldout_percent)
        routes = run_state.router.route([d.text for d in train])
        entry.routes = {}
        for doc, r in zip(train, routes.tolist()):
            entry.routes[paths[r]] = entry.routes.get(paths[r], 0) + scanner._tokens(doc.text)
        entry.heldout_tokens = sum(scanner._tokens(d.text) for d in heldout)
    return routed


# --------------------------------------------------------------- the feed

@dataclass
class FeedChange:
    """What a refresh found."""

    changed: bool = False
    sources_added: list[str] = field(default_factory=list)
    sources_removed: list[str] = field(default_factory=list)
    files_added: int = 0
    files_changed: int = 0
    files_removed: int = 0
    files_read: int = 0
    documents: int = 0
    skipped: int = 0

    def describe(self) -> str:
        parts = []
        if self.sources_added:
            parts.append(f"sources added: {', '.join(self.sources_added)}")
        if self.sources_removed:
            parts.append(f"sources removed: {', '.join(self.sources_removed)}")
        if self.files_added or self.files_changed or self.files_removed:
            parts.append(f"files +{self.files_added} ~{self.files_changed} -{self.files_removed}")
        return "; ".join(parts) or "no change"


class DocumentFeed:
    """The documents a node trains on, and their bookkeeping at round boundaries.

    Registered sources when the home has any (and no --data was given), else the --data
    directories, else the built-in corpus. Call it for the documents; call `begin_round`
    before each round's inner steps (added, changed and removed files and sources take
    effect there) and `end_round` after each finished round (the ledger).
    """

    def __init__(self, home: Path, max_doc_chars: int, data_dirs: Sequence[str | Path] = (), tokenizer=None):
        self.home = Path(home)
        self.max_doc_chars = max_doc_chars
        self.data_dirs = [str(d) for d in data_dirs]
        self.tokenizer = tokenizer
        self.ledger = Ledger(self.home)
        self.scanners: dict[str, SourceScanner] = {}
        self.scans: dict[str, SourceScan] = {}
        self.mode = ""  # "sources", "data" or "builtin"
        self._documents: list[Document] | None = None

    def __call__(self) -> list[Document]:
        if self._documents is None:
            self.refresh()
        return self._documents

    @property
    def documents(self) -> list[Document]:
        return self()

    def refresh(self) -> FeedChange:
        """Re-read the registry and rescan the sources, re-reading only changed files."""
        change = FeedChange()
        if self.data_dirs:
            if self._documents is None:
                self.mode = "data"
                redactor = Redactor()
                self._documents = load_documents(self.data_dirs, self.max_doc_chars, redact=redactor)
                self.ledger.note_redactions(DATA_DIRS_ORIGIN, dict(redactor.counts))
                change.changed = True
            change.documents = len(self._documents)
            return change
        specs = read_sources(self.home)
        if not specs:
            if self.mode != "builtin":
                change.changed = True
                change.sources_removed = sorted(self.scanners)
                self.scanners.clear()
                self.scans.clear()
                self.mode = "builtin"
                self._documents = load_documents(None, self.max_doc_chars)
            change.documents = len(self._documents)
            return change
        if self.mode != "sources":
            change.changed = True
        self.mode = "sources"
        wanted = {s.name: s for s in specs}
        for name in sorted(set(self.scanners) - set(wanted)):
            del self.scanners[name]
            self.scans.pop(name, None)
            change.sources_removed.append(name)
        for name, spec in wanted.items():
            scanner = self.scanners.get(name)
            if scanner is None or scanner.spec != spec:
                scanner = SourceScanner(spec, self.max_doc_chars, self.tokenizer)
                scanner.load_index(source_dir(self.home, name) / "index.json")
                self.scanners[name] = scanner
                change.sources_added.append(name)
            try:
                scan = scanner.scan()
            except DataError as e:  # e.g. an unplugged drive: train on the other sources meanwhile
                logger.warning("%s; not using it this round", e)
                if self.scans.pop(name, None) is not None:
                    change.sources_removed.append(name)
                del self.scanners[name]
                continue
            self.scans[name] = scan
            change.files_added += len(scan.added)
            change.files_changed += len(scan.changed)
            change.files_removed += len(scan.removed)
            change.files_read += scan.read
            change.skipped += len(scan.skipped)
            if scan.added or scan.changed or scan.removed or name in change.sources_added:
                scanner.save_index(source_dir(self.home, name) / "index.json")
                self.ledger.note_redactions(name, scan.redactions)
        change.changed = change.changed or bool(change.sources_added or change.sources_removed or change.files_added
                                                or change.files_changed or change.files_removed)
        if change.changed or self._documents is None:
            self._documents = [d for name in sorted(self.scans) for d in self.scans[name].documents]
        change.documents = len(self._documents)
        if not self._documents:
            raise DataError("the registered sources hold no usable documents "
                            f"({change.skipped} files skipped; see p2ptrain data list / data check)")
        return change

    def begin_round(self, session) -> FeedChange:
        """Before a round's inner steps: pick up added, changed and removed files and sources
        (re-reading only what changed) and hand the new documents to the session."""
        change = self.refresh()
        if change.changed:
            shard = session.set_documents(self._documents)
            logger.info("data for round %d: %s (%d documents routed to this path)", session.round + 1,
                        change.describe(), shard)
        return change

    def end_round(self, session, round: int, seconds: float, averaged_modules: Sequence[str] | None = None) -> None:
        """After a finished round: record what its inner steps consumed in the ledger."""
        from p2ptrain.model.grid import path_name
        usage = session.take_data_usage()
        self.ledger.record_round(session.cfg.run.id, path_name(session.path), round, list(session.module_ids),
                                 usage.tokens, seconds, usage.tokens_by_source, usage.docs_by_source,
                                 list(averaged_modules or ()), usage.files_by_source, usage.documents_by_source)

    @staticmethod
    def discard_round(session) -> None:
        """Forget the usage of inner steps that were thrown away (an abandoned round)."""
        session.take_data_usage()


def origin_label(origin: str) -> str:
    return {BUILTIN_ORIGIN: "the built-in corpus", DATA_DIRS_ORIGIN: "--data directories"}.get(origin, origin)
