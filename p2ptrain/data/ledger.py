"""The contribution ledger: what this home trained, per module, per path and per data source.

One JSON file, `<home>/ledger.json`, serves the daemon (tokens, rounds and hours
contributed since install, per module) and the data sources (tokens, documents and
rounds per source and per path, redactions, when a source was removed). A second file,
`<home>/ledger-usage.json`, keeps the bulky part: which files and documents of each
source were used, and up to which round (`p2ptrain data show`).

Every change is a locked read-modify-write (flock on `<home>/ledger.lock`), written to a
temp file, fsynced and renamed, so a `data remove` in one process and the round driver in
another never lose each other's updates, and a crash leaves either the old or the new
file. A file that cannot be parsed is moved aside (`ledger.json.corrupt-<time>`) with a
warning and a new ledger is started: contribution numbers are bookkeeping, never a
reason to stop training.

Numbers are what the inner loop consumed: `tokens` is the sum of the input tokens of
every inner step, attributed to the document each token came from.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
USAGE_FILE = "ledger-usage.json"
LOCK_FILE = "ledger.lock"
FORMAT_VERSION = 1
_REQUIRED = {"tokens": int, "rounds": int, "seconds": (int, float), "modules": dict, "runs": dict, "sources": dict}


def _empty_ledger() -> dict:
    now = time.time()
    return {"format": FORMAT_VERSION, "created_at": now, "updated_at": now,
            "tokens": 0, "rounds": 0, "rounds_averaged": 0, "seconds": 0.0,
            "modules": {}, "runs": {}, "sources": {}, "last_round": None}


def _empty_source() -> dict:
    return {"tokens": 0, "documents": 0, "rounds": 0, "first_round": None, "last_round": None,
            "paths": {}, "redactions": {}, "open": True, "removed_at_round": None, "removed_at": None}


def _span(entry: dict, round: int) -> None:
    entry["first_round"] = round if entry.get("first_round") is None else min(entry["first_round"], round)
    entry["last_round"] = round if entry.get("last_round") is None else max(entry["last_round"], round)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path so that a reader sees either the old or the new file, never half."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Ledger:
    """The contribution ledger of one home. Cheap to construct; every call reads the file."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.path = self.home / LEDGER_FILE
        self.usage_path = self.home / USAGE_FILE
        self.lock_path = self.home / LOCK_FILE

    # ------------------------------------------------------------- updates

    def record_round(self, run_id: str, path: str, round: int, modules: list[str], tokens: int,
                     seconds: float, tokens_by_source: dict[str, int] | None = None,
                     docs_by_source: dict[str, int] | None = None, averaged_modules: list[str] | None = None,
                     files_by_source: dict[str, dict[str, int]] | None = None,
                     documents_by_source: dict[str, list[str]] | None = None) -> None:
        """Add one finished round of inner training.

        run_id, path ("1,0"), round (the round number just finished), modules (the path's
        module ids), tokens (input tokens the inner steps consumed), seconds (wall time of
        the round). Optional, from the data side: tokens_by_source (sums to tokens when
        given), docs_by_source (distinct documents touched this round), averaged_modules
        (modules whose all-reduce included at least one other peer), files_by_source
        ({source: {file: tokens}}) and documents_by_source ({source: [document digest]}) for
        `data show` and the distinct-document counts.
        """
        if tokens < 0 or seconds < 0:
            raise ValueError(f"record_round: tokens ({tokens}) and seconds ({seconds}) must be >= 0")
        if tokens_by_source is not None and sum(tokens_by_source.values()) != tokens:
            raise ValueError(f"record_round: tokens by source sum to {sum(tokens_by_source.values())}, "
                             f"not to the round's {tokens} tokens")
        with self._locked():
            data = self._load()
            data["tokens"] += int(tokens)
            data["rounds"] += 1
            averaged = set(averaged_modules or ())
            data["rounds_averaged"] += int(bool(averaged))
            data["seconds"] += float(seconds)
            for module in modules:
                entry = data["modules"].setdefault(module, {"tokens": 0, "rounds": 0, "averaged_rounds": 0})
                entry["tokens"] += int(tokens)
                entry["rounds"] += 1
                entry["averaged_rounds"] += int(module in averaged)
            run = data["runs"].setdefault(run_id, {"paths": {}})
            path_entry = run["paths"].setdefault(path, {"tokens": 0, "rounds": 0, "first_round": None,
                                                        "last_round": None})
            path_entry["tokens"] += int(tokens)
            path_entry["rounds"] += 1
            _span(path_entry, round)

            usage = self._load_usage() if (files_by_source or documents_by_source) else None
            for name, source_tokens in (tokens_by_source or {}).items():
                if source_tokens <= 0:
                    continue
                src = data["sources"].setdefault(name, _empty_source())
                if not src["open"]:  # removed during this round: the round still used it, and was its last
                    src["removed_at_round"] = max(src["removed_at_round"] or 0, int(round))
                src["tokens"] += int(source_tokens)
                src["rounds"] += 1
                _span(src, round)
                per_path = src["paths"].setdefault(path, {"tokens": 0, "documents": 0, "rounds": 0,
                                                          "first_round": None, "last_round": None})
                per_path["tokens"] += int(source_tokens)
                per_path["rounds"] += 1
                per_path["documents"] += int((docs_by_source or {}).get(name, 0))
                _span(per_path, round)
                if usage is not None:
                    used = usage.setdefault(name, {"files": {}, "documents": []})
                    for file, file_tokens in (files_by_source or {}).get(name, {}).items():
                        f = used["files"].setdefault(file, {"tokens": 0, "first_round": None, "last_round": None})
                        f["tokens"] += int(file_tokens)
                        _span(f, round)
                    digests = set(used["documents"]) | set((documents_by_source or {}).get(name, ()))
                    used["documents"] = sorted(digests)
                    src["documents"] = len(digests)
                elif docs_by_source:
                    # without document digests the best count is the largest single round's
                    src["documents"] = max(src["documents"], int(docs_by_source.get(name, 0)))
            data["last_round"] = {"run_id": run_id, "path": path, "round": int(round), "time": time.time()}
            if usage is not None:
                write_atomic(self.usage_path, json.dumps(usage, sort_keys=True))
            self._save(data)

    def close_source(self, name: str, round: int) -> None:
        """`data remove`: the source is used up to `round` and no later. Its numbers stay (what
        was averaged into the model cannot be taken out); it stops growing."""
        with self._locked():
            data = self._load()
            src = data["sources"].setdefault(name, _empty_source())
            src["open"] = False
            src["removed_at_round"] = int(round)
            src["removed_at"] = time.time()
            self._save(data)

    def reopen_source(self, name: str) -> None:
        """`data add` of a name used before: counting continues on the same entry."""
        with self._locked():
            data = self._load()
            if name in data["sources"]:
                src = data["sources"][name]
                src["open"], src["removed_at_round"], src["removed_at"] = True, None, None
                self._save(data)

    def note_redactions(self, name: str, counts: dict[str, int]) -> None:
        """The redactions made in a source's current contents (replaces the previous counts)."""
        with self._locked():
            data = self._load()
            src = data["sources"].setdefault(name, _empty_source())
            if src["redactions"] != counts:
                src["redactions"] = {k: int(v) for k, v in sorted(counts.items())}
                self._save(data)

    # -------------------------------------------------------------- reading

    def totals(self) -> dict:
        """{"tokens", "rounds" (run), "rounds_averaged" (with at least one peer), "hours",
        "modules": {module: {"tokens", "rounds", "averaged_rounds"}},
        "sources": {name: {"tokens", "documents", "rounds", "first_round", "last_round", "paths",
        "redactions", "open", "removed_at_round", "removed_at"}}, "runs", "last_round"}."""
        data = self.read()
        return {"tokens": data["tokens"], "rounds": data["rounds"], "rounds_averaged": data["rounds_averaged"],
                "hours": data["seconds"] / 3600.0,
                "modules": copy.deepcopy(data["modules"]), "sources": copy.deepcopy(data["sources"]),
                "runs": copy.deepcopy(data["runs"]), "last_round": data["last_round"]}

    def summary(self) -> dict:
        """{"tokens", "rounds", "rounds_averaged", "hours"} since install: what the node publishes
        in its peer record."""
        data = self.read()
        return {"tokens": data["tokens"], "rounds": data["rounds"], "rounds_averaged": data["rounds_averaged"],
                "hours": data["seconds"] / 3600.0}

    def source(self, name: str) -> dict | None:
        return copy.deepcopy(self.read()["sources"].get(name))

    def usage(self, name: str) -> dict:
        """{"files": {file: {"tokens", "first_round", "last_round"}}, "documents": [digest]} of a source."""
        return self._load_usage().get(name, {"files": {}, "documents": []})

    def read(self) -> dict:
        """The whole ledger (a fresh empty one when there is no file yet)."""
        if not self.path.exists():
            return _empty_ledger()
        with self._locked():
            return self._load()

    # ------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _empty_ledger()
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}")
            for key, kinds in _REQUIRED.items():
                if not isinstance(data.get(key), kinds) or isinstance(data.get(key), bool):
                    raise ValueError(f"field {key!r} is missing or has the wrong type")
            if "rounds_averaged" not in data:
                # a ledger from before the count: no round averaged fewer peers than its
                # best-averaged module did, so that module's count is a true lower bound
                data["rounds_averaged"] = max((int(m.get("averaged_rounds", 0)) for m in data["modules"].values()
                                               if isinstance(m, dict)), default=0)
            elif not isinstance(data["rounds_averaged"], int) or isinstance(data["rounds_averaged"], bool):
                raise ValueError("field 'rounds_averaged' has the wrong type")
            return data
        except (ValueError, TypeError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            logger.warning("the contribution ledger %s is unreadable (%s): kept it as %s and started a new one",
                           self.path, e, aside.name)
            return _empty_ledger()

    def _load_usage(self) -> dict:
        try:
            usage = json.loads(self.usage_path.read_text(encoding="utf-8"))
            return usage if isinstance(usage, dict) else {}
        except FileNotFoundError:
            return {}
        except ValueError as e:
            logger.warning("the ledger's usage file %s is unreadable (%s); starting it again", self.usage_path, e)
            return {}

    def _save(self, data: dict) -> None:
        data["updated_at"] = time.time()
        write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))
