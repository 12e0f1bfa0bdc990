"""Where a node keeps its files: one home directory per node, plus the platform's places
for settings, state, logs and the control socket.

Layout of the home (the data directory)::

    <home>/identity.key                     libp2p / DHT identity (swarm)
    <home>/runs/<run id>/run.json           run config + router this node trained with
    <home>/runs/<run id>/checkpoints/path-1-0/round-000012/   safetensors + manifest

The home is `--home DIR`, else $P2PTRAIN_HOME, else the platform's user data dir. The
daemon's other files go to the platform's directories (platformdirs: XDG on Linux,
`~/Library/…` on macOS), or all under the home when one is given (`Places`).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from p2ptrain.model.grid import PathIndex, path_name

APP = "p2ptrain"


def resolve_home(home: str | Path | None = None, create: bool = True) -> Path:
    if home is None:
        home = os.environ.get("P2PTRAIN_HOME") or platformdirs.user_data_dir(APP, appauthor=False)
    path = Path(home).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def checkpoint_dir(home: Path, run_id: str, path: PathIndex) -> Path:
    return run_dir(home, run_id) / "checkpoints" / f"path-{path_name(path, sep='-')}"


def identity_path(home: Path) -> Path:
    return home / "identity.key"


# ------------------------------------------------------------- all places

@dataclass(frozen=True)
class Places:
    """Every directory a node uses. With an explicit home (`--home`, $P2PTRAIN_HOME) they are
    all inside it, so one directory holds everything (tests, several nodes on one machine)."""

    data: Path  # the home: runs, checkpoints, identity key, contribution ledger
    config: Path  # prefs.toml (computing preferences)
    state: Path  # daemon.pid, run mode, how the last daemon ended
    logs: Path  # daemon.log and its rotated copies
    runtime: Path  # the control socket (or port + token file); private to this user

    @property
    def prefs_file(self) -> Path:
        return self.config / "prefs.toml"

    @property
    def pid_file(self) -> Path:
        return self.state / "daemon.pid"

    @property
    def log_file(self) -> Path:
        return self.logs / "daemon.log"

    @property
    def socket_file(self) -> Path:
        return self.runtime / "control.sock"

    def describe(self) -> dict[str, str]:
        return {"data": str(self.data), "prefs": str(self.prefs_file), "pid_file": str(self.pid_file),
                "log_file": str(self.log_file), "runtime": str(self.runtime)}


def explicit_home(home: str | Path | None = None) -> str | Path | None:
    """The home the user chose (`--home`, else $P2PTRAIN_HOME), or None for the platform's."""
    return home if home is not None else (os.environ.get("P2PTRAIN_HOME") or None)


def places(home: str | Path | None = None, create: bool = True) -> Places:
    """The places of the node whose home is `home` (see resolve_home); directories are
    created on first use by whoever writes into them (see private_dir). create=False: not
    even the home (for commands that only look, such as `status`)."""
    explicit = explicit_home(home)
    if explicit:
        root = resolve_home(explicit, create)
        return Places(data=root, config=root, state=root / "daemon", logs=root / "logs", runtime=root / "run")
    data = resolve_home(None, create)
    state = Path(platformdirs.user_state_dir(APP, appauthor=False))
    if sys.platform.startswith("linux") and not os.environ.get("XDG_RUNTIME_DIR"):
        # platformdirs would fall back to a shared /tmp/runtime-<uid>; the state dir is ours alone
        runtime = state / "run"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runtime = Path(platformdirs.user_runtime_dir(APP, appauthor=False))
    return Places(data=data, config=Path(platformdirs.user_config_dir(APP, appauthor=False)), state=state,
                  logs=Path(platformdirs.user_log_dir(APP, appauthor=False)), runtime=runtime)


# --------------------------------------------------------- private files

def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing and make sure no other user can enter it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file only this user can read (mode 0600), atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def secure_key_file(path: Path) -> None:
    """Key and token files: readable by this user only (hivemind writes keys 0400; a key
    copied in by hand may be world-readable)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, mode & 0o700)
