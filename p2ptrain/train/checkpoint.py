"""Checkpoints: one safetensors file per module plus a JSON manifest with checksums.

A checkpoint is a directory `round-000012/` written atomically: every file goes into a
temporary directory, is fsynced, then the directory is renamed into place. On load each
file's sha256 is checked against the manifest; a corrupt or truncated checkpoint is
reported and the previous good one is used. No pickles are ever read.

A swarm node saves after every round; `save_in_background` copies the tensors at once
(so training and the next outer step may change them) and leaves serialization, the
checksums and the fsyncs to a writer thread, so disk time is not taken from training.
At most one write is in flight; the next save, or `wait`, waits for it.

Nothing half-written survives: a write that fails (a full disk: safetensors raises its own
error type, not OSError) removes its temporary directory and leaves the previous
checkpoints as they were, and temporary directories left by a killed process are removed
when the store is next opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from p2ptrain.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TEMP_PREFIX = ".tmp-round-"


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, I/O error); the previous ones stay."""


@dataclass
class Checkpoint:
    directory: Path
    round: int
    meta: dict[str, Any]
    groups: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # file stem → tensors


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass


@dataclass
class WriteStats:
    """Checkpoint writes so far, for the metrics endpoint."""

    writes: int = 0  # successful writes
    failures: int = 0
    write_seconds: float = 0.0  # summed over the successful writes


class CheckpointStore:
    """Round-numbered checkpoints of one path under one directory; keeps the newest `keep`."""

    def __init__(self, root: Path, keep: int = 3):
        self.root = Path(root)
        self.stats = WriteStats()
        self.keep = keep
        self._writer: threading.Thread | None = None
        self.last_error: str | None = None  # why the latest write failed; None once one succeeds
        remove_stale_temp_dirs(self.root)

    def directory(self, round_: int) -> Path:
        return self.root / f"round-{round_:06d}"

    def rounds(self) -> list[int]:
        if not self.root.exists():
            return []
        found = []
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("round-"):
                try:
                    found.append(int(d.name.split("-", 1)[1]))
                except ValueError:
                    continue
        return sorted(found)

    def save(self, round_: int, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
        """Write each group (e.g. a module, or 'optimizer') as <name>.safetensors plus the manifest."""
        self.wait()
        return self._write(round_, _snapshot(groups), meta)

    def save_in_background(self, round_: int, groups: dict[str, dict[str, torch.Tensor]],
                           meta: dict[str, Any]) -> None:
        """Like `save`, but only the copy of the tensors happens now; a failed write is logged
        and the previous checkpoints stay."""
        self.wait()
        snapshot = _snapshot(groups)

        def write() -> None:
            try:
                self._write(round_, snapshot, meta)
            except CheckpointWriteError as e:
                logger.error("%s", e)

        self._writer = threading.Thread(target=write, name="p2ptrain-checkpoint", daemon=True)
        self._writer.start()

    def wait(self) -> None:
        """Return once the background write (if any) is on disk."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def _write(self, round_: int, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
        t0 = time.perf_counter()
        try:
            final = self._write_files(round_, groups, meta)
        except BaseException:
            self.stats.failures += 1
            raise
        self.stats.writes += 1
        self.stats.write_seconds += time.perf_counter() - t0
        return final

    def _write_files(self, round_: int, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> Path:
        tmp = self.root / f"{TEMP_PREFIX}{round_:06d}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            files = {}
            for name, tensors in groups.items():
                path = tmp / f"{name}.safetensors"
                save_file(tensors, str(path))
                _fsync_file(path)
                files[path.name] = _sha256(path)
            manifest = {"format": FORMAT_VERSION, "round": round_, "files": files, "meta": meta}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync_file(tmp / MANIFEST)
            _fsync_dir(tmp)
        except Exception as e:  # OSError, or safetensors' own SafetensorError on a full disk
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.rounds()
            self.last_error = (f"could not write the round {round_} checkpoint in {self.root}: {_reason(e)}; "
                               + (f"the round {previous[-1]} checkpoint stays" if previous else "no checkpoint yet"))
            raise CheckpointWriteError(self.last_error) from e
        final = self.directory(round_)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self.last_error = None
        self._prune()
        return final

    def load(self, round_: int) -> Checkpoint:
        """Load and verify one checkpoint; raises ValueError saying what is wrong."""
        directory = self.directory(round_)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            files = manifest["files"]
            meta = manifest["meta"]
            round_in_manifest = int(manifest["round"])
            if not isinstance(files, dict) or not isinstance(meta, dict):
                raise TypeError("'files' and 'meta' must be tables")
        except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError includes JSONDecodeError
            raise ValueError(f"{directory}: unreadable manifest ({type(e).__name__})") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory}: manifest format {manifest.get('format')} is not {FORMAT_VERSION}")
        if round_in_manifest != round_:
            # the manifest is not checksummed itself: one flipped bit can turn round 2 into 3
            raise ValueError(f"{directory}: the manifest says round {round_in_manifest}")
        groups = {}
        for filename, digest in files.items():
            path = directory / filename
            if not path.exists():
                raise ValueError(f"{path}: missing")
            if _sha256(path) != digest:
                raise ValueError(f"{path}: checksum mismatch (corrupt or truncated)")
            try:
                groups[filename.removesuffix(".safetensors")] = load_file(str(path))
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
        return Checkpoint(directory, round_in_manifest, meta, groups)

    def load_latest(self, accept=None) -> Checkpoint | None:
        """The newest checkpoint that verifies (and that `accept(ckpt)` takes, if given).

        Corrupt ones are reported with a warning and skipped, never deleted: the user may
        want to inspect them.
        """
        for round_ in reversed(self.rounds()):
            try:
                ckpt = self.load(round_)
            except ValueError as e:
                logger.warning("skipping corrupt checkpoint: %s; falling back to an older one", e)
                continue
            if accept is not None and not accept(ckpt):
                continue
            return ckpt
        return None

    def _prune(self) -> None:
        for round_ in self.rounds()[:-self.keep]:
            shutil.rmtree(self.directory(round_), ignore_errors=True)


def _reason(e: BaseException) -> str:
    """A short cause: 'No space left on device' whether it came from the OS or safetensors."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return "no space left on device" if "No space left" in text or "os error 28" in text else text


def remove_stale_temp_dirs(root: Path) -> list[Path]:
    """Remove temporary checkpoint directories whose writer is gone (a killed process); a
    live writer's (another process saving into the same directory) is left alone."""
    removed = []
    if not root.is_dir():
        return removed
    for tmp in root.glob(f"{TEMP_PREFIX}*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if _pid_alive(pid):  # (our own pid: a write of this process, maybe in flight)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("removed %s, a checkpoint left half-written by a process that was stopped", tmp)
        removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _snapshot(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of every tensor. Copies also because bitsandbytes shares one quantization
    map between tensors, and safetensors refuses aliased tensors."""
    return {name: {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()} for name, tensors in groups.items()}
