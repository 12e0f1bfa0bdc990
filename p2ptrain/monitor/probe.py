"""Reachability probe: dial the addresses a peer announces, as a stranger would.

A peer's record says `public` when it accepts connections, but only a dial from outside
tells whether its announced addresses really work (a wrong --announce-maddrs, a closed
port forward, a firewall). The probe runs its own libp2p daemon — a fresh one, with no
relays and no DHT, so it knows nothing about the peer but the addresses it announced
and every dial is a new connection — dials each address with a short timeout, then
hangs up. This is what Petals' health monitor does for its servers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Iterable, Optional, Sequence

from p2ptrain.monitor.swarm_view import ProbeResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


def direct_addresses(maddrs: Iterable[str], peer_id: str) -> list[str]:
    """The announced addresses that are direct (not through a relay), without `/p2p/<id>`."""
    out = []
    for addr in maddrs:
        if "/p2p-circuit" in addr:
            continue
        suffix = f"/p2p/{peer_id}"
        out.append(addr[: -len(suffix)] if addr.endswith(suffix) else addr)
    return out


class ReachabilityProbe:
    """Owns a client-only libp2p daemon on an event loop thread; `probe` is thread-safe.

    Lifecycle: `ReachabilityProbe(start=True)` … `shutdown()`.
    """

    def __init__(self, *, host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",), start: bool = True):
        self.host_maddrs = list(host_maddrs)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._p2p = None
        if start:
            self.start()

    def start(self, timeout_s: float = 60.0) -> None:
        from p2ptrain.swarm.dht import use_fork
        use_fork()
        ready: Future = Future()

        def run_loop() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._p2p = self._loop.run_until_complete(self._create())
            except BaseException as e:  # surfaced by start()
                ready.set_exception(e)
                self._loop.close()
                return
            ready.set_result(True)
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run_loop, name="p2ptrain-probe", daemon=True)
        self._thread.start()
        ready.result(timeout=timeout_s)

    async def _create(self):
        from hivemind.p2p import P2P
        from p2ptrain.swarm.signals import children_ignore_sigint
        with children_ignore_sigint():
            # no relay, NAT traversal or DHT: a dial succeeds only through the announced address itself
            return await P2P.create(host_maddrs=self.host_maddrs, use_relay=False, use_auto_relay=False,
                                    auto_nat=False, nat_port_map=False, dht_mode="client", no_listen=True)

    def probe(self, peer_id: str, maddrs: Iterable[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
        """Dial each direct address of the peer in turn; reachable if any answers in time."""
        if self._loop is None or self._p2p is None:
            raise RuntimeError("the probe is not started")
        future = asyncio.run_coroutine_threadsafe(self._probe(peer_id, list(maddrs), timeout_s), self._loop)
        return future.result(timeout=timeout_s * max(len(list(maddrs)), 1) + 30)

    async def _probe(self, peer_id: str, maddrs: list[str], timeout_s: float) -> ProbeResult:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr
        t0, started = time.perf_counter(), time.time()
        addresses = direct_addresses(maddrs, peer_id)
        if not addresses:
            return ProbeResult(peer_id, False, 0.0, started, "no direct address announced")
        error = None
        try:
            target = PeerID.from_base58(peer_id)
        except Exception as e:
            return ProbeResult(peer_id, False, 0.0, started, f"bad peer id: {e}")
        for address in addresses:
            try:
                await asyncio.wait_for(self._p2p._client.connect(target, [Multiaddr(address)]), timeout_s)
            except Exception as e:  # refused, timed out, wrong peer at that address, bad multiaddr
                error = _short(e) or type(e).__name__
                continue
            finally:
                await self._hang_up(target)
            return ProbeResult(peer_id, True, time.perf_counter() - t0, started, None, address)
        return ProbeResult(peer_id, False, time.perf_counter() - t0, started, error)

    async def _hang_up(self, target) -> None:
        """Close the connection, so the next probe of this peer dials again."""
        try:
            await asyncio.wait_for(self._p2p._client.disconnect(target), 5.0)
        except Exception as e:
            logger.debug("probe: disconnect failed: %s", e)

    def shutdown(self) -> None:
        if self._loop is None:
            return
        if self._p2p is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._p2p.shutdown(), self._loop).result(timeout=30)
            except Exception as e:
                logger.warning("probe: p2pd shutdown failed: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._loop = self._p2p = None


def _short(error: BaseException) -> str:
    """The last line of a p2pd error, e.g. `dial tcp4 127.0.0.1:4001: connect: connection refused`."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip().lstrip("* ")[:200] if lines else ""


# ------------------------------------------------------------ bootstrap peers

async def _dial_from_dht(_dht, node, peer_id: str, address: str, timeout_s: float) -> Optional[str]:
    """Runs inside the DHT's process (DHT.run_coroutine): None if the dial worked, else why."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr
    try:
        await asyncio.wait_for(node.p2p._client.connect(PeerID.from_base58(peer_id), [Multiaddr(address)]),
                               timeout_s)
        return None
    except Exception as e:
        return _short(e) or type(e).__name__


def bootstrap_states(dht, addresses: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Whether this node's DHT can reach each bootstrap peer (an existing connection counts)."""
    import functools
    from p2ptrain.monitor.swarm_view import BootstrapState
    states = []
    for address in addresses:
        if "/p2p/" not in address:
            states.append(BootstrapState(address, "unknown", "no /p2p/ peer id in the address"))
            continue
        base, peer_id = address.rsplit("/p2p/", 1)
        try:
            error = dht.run_coroutine(functools.partial(_dial_from_dht, peer_id=peer_id, address=base,
                                                        timeout_s=timeout_s))
        except Exception as e:
            error = _short(e) or type(e).__name__
        states.append(BootstrapState(address, "reachable" if error is None else "unreachable", error))
    return states
