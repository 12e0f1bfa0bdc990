"""The run state: the run config plus the fitted router — all a peer needs to route its
data and build its path exactly like every other peer.

Its fingerprint (sha256 over both) is what joiners verify against the copy the run's
creator published on the DHT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import Document, split_heldout
from p2ptrain.errors import ConfigError, DataError
from p2ptrain.home import run_dir
from p2ptrain.model.grid import Grid
from p2ptrain.model.router import Router

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class RunState:
    config: RunConfig
    router: Router

    @property
    def grid(self) -> Grid:
        return Grid.from_config(self.config.grid)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.config.fingerprint()}/{self.router.fingerprint()}".encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, "config": self.config.to_dict(),
                           "router": self.router.to_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "run state") -> "RunState":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT_VERSION:
                raise ConfigError(f"{source}: format {raw.get('format')} is not {FORMAT_VERSION} "
                                  "(written by another p2ptrain version)")
            return cls(RunConfig.from_dict(raw["config"], source), Router.from_dict(raw["router"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: not a valid run state ({type(e).__name__}: {e})") from None

    @classmethod
    def create(cls, config: RunConfig, docs: Sequence[Document]) -> "RunState":
        """Fit the router on the training split of docs (deterministic in the run seed)."""
        train, _ = split_heldout(docs, config.data.heldout_percent)
        grid = Grid.from_config(config.grid)
        texts = [d.text for d in (train or docs)]
        if len(texts) < grid.num_paths:
            raise DataError(f"need at least {grid.num_paths} training documents to fit the router (one per path), "
                            f"got {len(texts)}: add data with --data")
        router = Router.fit(texts, grid.num_paths, config.router, config.run.seed)
        return cls(config, router)


def run_state_file(home: Path, run_id: str) -> Path:
    return run_dir(home, run_id) / "run.json"


def save_run_state(home: Path, state: RunState) -> Path:
    path = run_state_file(home, state.config.run.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)
    return path


def load_local_run_state(home: Path, config: RunConfig) -> RunState | None:
    """The run state saved in this home for config's run id, checked against config."""
    path = run_state_file(home, config.run.id)
    if not path.exists():
        return None
    state = RunState.from_json(path.read_text(), str(path))
    if state.config.fingerprint() != config.fingerprint():
        raise ConfigError(f"{path} holds run '{config.run.id}' with a different config than the one given "
                          f"({config_differences(state.config, config)}): use another run.id, another --home, "
                          "or a config with the saved values")
    return state


def config_differences(saved: RunConfig, given: RunConfig, most: int = 4) -> str:
    """The keys two configs disagree on, with both values ('outer.lr 0.7 saved, 1.0 given'),
    at most `most` of them: what a user must set to reopen a saved run (a preset that
    changed between versions, or an edited file)."""
    saved_dict, given_dict = saved.to_dict(), given.to_dict()
    differing = [(f"{section}.{key}", value, given_dict.get(section, {}).get(key))
                 for section, values in saved_dict.items() for key, value in values.items()
                 if value != given_dict.get(section, {}).get(key)]
    text = "; ".join(f"{name} {saved_value!r} saved, {given_value!r} given"
                     for name, saved_value, given_value in differing[:most])
    return text + (f"; and {len(differing) - most} more" if len(differing) > most else "")


def load_or_create_run_state(home: Path, config: RunConfig, docs_loader) -> RunState:
    """Local commands: reuse this home's run state, or fit a router on local data and save it."""
    state = load_local_run_state(home, config)
    if state is None:
        state = RunState.create(config, docs_loader())
        save_run_state(home, state)
        logger.info("fitted the router for run %s and saved it", config.run.id)
    return state
