"""Joining a swarm end to end: DHT → run state → path → session → node.

`open_node` does everything up to a ready `SwarmNode`; `p2ptrain join` and the demo
drive it, and `close` shuts everything down in reverse order.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import Document
from p2ptrain.errors import SwarmError
from p2ptrain.model.grid import PathIndex
from p2ptrain.home import run_dir
from p2ptrain.run_state import RunState, save_run_state
from p2ptrain.swarm.dht import LOOPBACK_MADDRS, start_dht, visible_maddrs
from p2ptrain.swarm.identity import Identity
from p2ptrain.swarm.membership import least_covered_path
from p2ptrain.swarm.node import SwarmNode
from p2ptrain.swarm.records import PublishedRun, SwarmRecords, make_validators, split_run_id
from p2ptrain.swarm.schedule import RoundSchedule
from p2ptrain.swarm.signals import children_ignore_sigint
from p2ptrain.train.session import PathSession

logger = logging.getLogger(__name__)


@dataclass
class JoinOptions:
    initial_peers: Sequence[str] = ()
    new_swarm: bool = False
    host_maddrs: Sequence[str] = LOOPBACK_MADDRS
    announce_maddrs: Sequence[str] | None = None
    client_mode: bool = False
    identity_path: str | None = None  # None: a throw-away identity for this run only
    path: str | None = None  # "1,0"; None picks the least-covered path
    run_config: RunConfig | None = None  # given explicitly: must match the swarm's
    run_id: str | None = None  # which run to join when no config is given: NAME or NAME@CREATOR
    device: str = "cpu"
    data_seed: int | None = None  # None: derived from the peer id, so two peers never draw the same batches
    catch_up: bool = True
    closed: bool = False  # creating a run: only peers invited by this node (`p2ptrain invite`) may join
    credential: str | None = None  # joining a closed run: the creator's invite (the text of the file)
    upload_mbps: float | None = None  # this node's upload link: its share of each all-reduce's reducing


@dataclass
class OpenNode:
    node: SwarmNode
    dht: object
    run_state: RunState
    created_run: bool
    creator: str  # the run's creator (peer id): others pin the run with --run-id NAME@CREATOR
    maddrs: list[str]
    restored_round: int | None
    caught_up: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        try:
            self.node.shutdown()
        finally:
            self.dht.shutdown()


def creator_pin_file(home: Path, run_id: str) -> Path:
    return run_dir(home, run_id) / "creator"


def load_creator_pin(home: Path, run_id: str) -> str | None:
    """The run creator this home joined before (trust on first use)."""
    path = creator_pin_file(home, run_id)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def save_creator_pin(home: Path, run_id: str, creator: str) -> None:
    path = creator_pin_file(home, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(creator + "\n")


def resolve_run(records: SwarmRecords, given: RunConfig | None, default: RunConfig,
                docs_loader: Callable[[], Sequence[Document]], own_peer_id: str,
                may_create: bool = True, closed: bool = False) -> tuple[PublishedRun, bool]:
    """The swarm's run (state, creator, epoch); if the DHT has none under this run id, create
    and publish it with this node as its creator. Returns (run, created by us)."""
    published = records.fetch_run()
    if published is None and records.creator is not None and records.creator != own_peer_id:
        raise SwarmError(f"no run '{records.run_id}' from creator {records.creator} on the swarm: check the "
                         "run id and creator, or that its peers are online")
    if published is None and not may_create:
        raise SwarmError(f"the swarm has no run '{records.run_id}': check the run id, or start that run "
                         "with --run-config FILE (whose run.id names it)")
    if published is not None:
        if given is not None and given.fingerprint() != published.state.config.fingerprint():
            raise SwarmError(f"run '{records.run_id}' on the swarm has a different config than --run-config "
                             f"(swarm {published.state.config.fingerprint()[:12]}, yours "
                             f"{given.fingerprint()[:12]}): drop --run-config to use the swarm's, or pick "
                             "another run.id to start a new run")
        return published, False
    config = given or default
    state = RunState.create(config, docs_loader())
    if not records.publish_run(state, closed=closed):
        raise SwarmError("could not publish the run state on the DHT")
    records.creator = own_peer_id
    published = records.fetch_run()
    if published is None:
        raise SwarmError("published the run state but cannot read it back from the DHT")
    return published, True


def open_node(options: JoinOptions, home: Path, docs_loader: Callable[[], Sequence[Document]]) -> OpenNode:
    from p2ptrain.train.inner import resolve_device

    default = options.run_config or RunConfig.load()
    run_name, pinned_creator = split_run_id(options.run_id) if options.run_id else (None, None)
    if options.run_config is not None and run_name and run_name != options.run_config.run.id:
        raise SwarmError(f"--run-id {run_name} differs from run.id {options.run_config.run.id!r} in "
                         "--run-config: give one of them")
    run_id = run_name or default.run.id
    if not options.initial_peers and not options.new_swarm:
        raise SwarmError("no initial peers: pass --initial-peers, list peers in bootstrap_peers.txt, "
                         "or start a new swarm with --new-swarm")
    identity = Identity(Path(options.identity_path) if options.identity_path else None)
    signer, validators = make_validators(run_id, identity.private_key)
    with children_ignore_sigint():
        dht = start_dht(options.initial_peers if not options.new_swarm else (), host_maddrs=options.host_maddrs,
                        announce_maddrs=options.announce_maddrs, client_mode=options.client_mode,
                        identity_path=str(identity.path), record_validators=validators,
                        check_identity_free=not identity.fresh)
    identity.discard_temporary()
    try:
        own_peer_id = dht.peer_id.to_base58()
        creator = pinned_creator or load_creator_pin(home, run_id)
        records = SwarmRecords(dht, run_id, signer, creator=creator)
        docs = _cached(docs_loader)
        published, created = resolve_run(records, options.run_config, default, docs, own_peer_id, may_create=(
            options.run_config is not None or run_id == default.run.id), closed=options.closed)
        if options.closed and not created:
            raise SwarmError(f"--closed: run '{run_id}' already exists; only its creator decides who may join")
        credential = check_own_credential(published, options.credential, run_id, own_peer_id)
        state = published.state
        records.buckets = state.config.averaging.peer_buckets
        if published.closed and records.buckets > 1:
            raise SwarmError(f"run '{run_id}' is closed and splits its peer table (averaging.peer_buckets = "
                             f"{records.buckets}): a closed run checks every group member's credential in its "
                             "record, so it needs the whole table (peer_buckets = 1)")
        save_run_state(home, state)
        records.creator = published.creator  # from now on, no other key's run record counts
        if published.closed:
            records.closed_run = published  # from now on, only credentialed peers' records count
        save_creator_pin(home, run_id, published.creator)
        grid = state.grid
        if options.path is not None:
            path: PathIndex = grid.parse_path(options.path)
        else:
            # a split table: this round's sample of it (coverage in proportion)
            now = RoundSchedule(published.created, state.config.averaging.round_seconds).current_round()
            path = least_covered_path(grid, records.fetch_peers(now, own_peer_id), random.Random())
        data_seed = options.data_seed
        if data_seed is None:
            data_seed = int.from_bytes(hashlib.sha256(dht.peer_id.to_bytes()).digest()[:4], "little")
        session = PathSession(state, path, docs(), resolve_device(options.device), home, data_seed)
        ckpt = session.restore()
        maddrs = visible_maddrs(dht)
        schedule = RoundSchedule(published.created, state.config.averaging.round_seconds)
        feed = docs_loader if hasattr(docs_loader, "begin_round") else None  # registered data sources
        node = SwarmNode(state, session, dht, records, schedule, client_mode=options.client_mode, maddrs=maddrs,
                         feed=feed, upload_mbps=options.upload_mbps)
        node.credential = credential
        opened = OpenNode(node, dht, state, created, published.creator, maddrs, ckpt.round if ckpt else None)
        if options.catch_up:
            try:
                opened.caught_up = node.catch_up()
            except BaseException:
                node.shutdown()
                raise
        return opened
    except BaseException:
        dht.shutdown()
        raise


def check_own_credential(run: PublishedRun, text: str | None, run_id: str, own_peer_id: str) -> str | None:
    """Closed runs: this node's invite, checked before it takes part (a clear error, not a silent
    exclusion by every peer). Returns the credential text to publish."""
    from p2ptrain.swarm.credentials import parse_credential
    if not run.closed or run.creator == own_peer_id:
        return None
    if text is None:
        raise SwarmError(f"run '{run_id}' is closed: ask its creator ({run.creator}) to run `p2ptrain invite "
                         f"{own_peer_id}` and pass the file to --credential")
    credential = parse_credential(text, "--credential")
    problem = credential.problem(run_id, own_peer_id, run.creator, run.creator_key)
    if problem is not None:
        raise SwarmError(f"--credential does not admit this node to run '{run_id}': {problem}")
    return text


def _cached(loader: Callable[[], Sequence[Document]]) -> Callable[[], Sequence[Document]]:
    cache: list = []

    def load():
        if not cache:
            cache.append(loader())
        return cache[0]
    return load
