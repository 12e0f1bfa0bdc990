"""Where a node keeps its files: one home directory per node.

Layout::

    <home>/identity.key                     libp2p / DHT identity (swarm)
    <home>/runs/<run id>/run.json           run config + router this node trained with
    <home>/runs/<run id>/checkpoints/path-1-0/round-000012/   safetensors + manifest

The home is `--home DIR`, else $P2PTRAIN_HOME, else the platform's user data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from p2ptrain.model.grid import PathIndex, path_name


def resolve_home(home: str | Path | None = None) -> Path:
    if home is None:
        home = os.environ.get("P2PTRAIN_HOME") or platformdirs.user_data_dir("p2ptrain", appauthor=False)
    path = Path(home).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def checkpoint_dir(home: Path, run_id: str, path: PathIndex) -> Path:
    return run_dir(home, run_id) / "checkpoints" / f"path-{path_name(path, sep='-')}"


def identity_path(home: Path) -> Path:
    return home / "identity.key"
