"""Joining the DHT: initial peers from flags or bootstrap_peers.txt, retries with backoff,
and one clear error when nobody answers — never a silently separate swarm."""

from __future__ import annotations

import logging
import multiprocessing as mp
import re
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

from p2ptrain.errors import SwarmError

logger = logging.getLogger(__name__)

BOOTSTRAP_FILE = "bootstrap_peers.txt"
LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)
PUBLIC_MADDRS = ("/ip4/0.0.0.0/tcp/0",)


def use_fork() -> None:
    """hivemind's DHT and averagers are forked processes; spawn/forkserver can't pickle them."""
    if mp.get_start_method(allow_none=True) != "fork":
        mp.set_start_method("fork", force=True)


def parse_bootstrap_text(text: str) -> list[str]:
    peers = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            peers.append(line)
    return peers


def bootstrap_peers(path: str | Path | None = None) -> tuple[list[str], str]:
    """Peers from `path`, else ./bootstrap_peers.txt, else the copy packaged with p2ptrain.

    Returns (peers, where they came from).
    """
    if path is not None:
        try:
            return parse_bootstrap_text(Path(path).read_text()), str(path)
        except OSError as e:
            raise SwarmError(f"cannot read bootstrap peers file {path}: {e.strerror}") from None
    local = Path.cwd() / BOOTSTRAP_FILE
    if local.is_file():
        return parse_bootstrap_text(local.read_text()), str(local)
    packaged = resources.files("p2ptrain").joinpath(BOOTSTRAP_FILE)
    return parse_bootstrap_text(packaged.read_text()), f"packaged {BOOTSTRAP_FILE}"


def check_maddrs(maddrs: Sequence[str], what: str, need_peer_id: bool = False) -> None:
    from hivemind.utils.multiaddr import Multiaddr
    for addr in maddrs:
        try:
            parsed = Multiaddr(addr)
        except Exception as e:  # multiaddr raises several unrelated types
            raise SwarmError(f"{what}: {addr!r} is not a valid multiaddr ({e})") from None
        if need_peer_id and "p2p" not in {p.name for p in parsed.protocols()}:
            raise SwarmError(f"{what}: {addr!r} lacks the peer id (…/p2p/12D3KooW…); "
                             "copy the full address the peer printed")


def start_dht(initial_peers: Sequence[str], *, host_maddrs: Sequence[str] = LOOPBACK_MADDRS,
              announce_maddrs: Sequence[str] | None = None, client_mode: bool = False,
              identity_path: str | None = None, record_validators=(), attempts: int = 4,
              backoff_s: float = 1.0, check_identity_free: bool = True):
    """Start a hivemind DHT node; with initial peers, retry with exponential backoff.

    Raises SwarmError when every attempt fails to reach any initial peer.
    """
    use_fork()
    from p2ptrain.swarm import hivemind_patches
    hivemind_patches.apply()
    from hivemind.dht import DHT
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    check_maddrs(initial_peers, "initial peer", need_peer_id=True)
    check_maddrs(host_maddrs, "--host-maddrs")
    check_maddrs(announce_maddrs or (), "--announce-maddrs")
    last_error = None
    for attempt in range(attempts if initial_peers else 1):
        try:
            return DHT(initial_peers=list(initial_peers) or None, start=True, host_maddrs=list(host_maddrs),
                       announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
                       client_mode=client_mode, identity_path=identity_path,
                       record_validators=list(record_validators), use_relay=True,
                       use_auto_relay=client_mode, check_if_identity_free=check_identity_free)
        except (P2PDaemonError, TimeoutError, OSError) as e:
            last_error = e
            if not initial_peers:
                break
            delay = backoff_s * 2 ** attempt
            logger.warning("could not reach the initial peers (attempt %d/%d): %s", attempt + 1, attempts,
                           _short(e))
            if attempt + 1 < attempts:
                time.sleep(delay)
    if initial_peers:
        raise SwarmError(f"none of the {len(initial_peers)} initial peers answered after {attempts} attempts "
                         f"({_short(last_error)}). Check the addresses, your connection, or start a new swarm "
                         "with --new-swarm")
    raise SwarmError(f"could not start the DHT node: {_short(last_error)}")


def _short(error: BaseException | None) -> str:
    """The useful last line of a p2pd error, without its timestamp."""
    if error is None:
        return "unknown error"
    lines = [line for line in str(error).strip().splitlines() if line.strip()] or [repr(error)]
    text = lines[-1].split("Daemon failed to start: ", 1)[-1]
    return re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)


def visible_maddrs(dht) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]
