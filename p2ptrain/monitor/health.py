"""The swarm health monitor behind `p2ptrain monitor`: a client-mode DHT peer that trains
nothing, reads the run's signed records, probes every peer that claims to be public, and
keeps the results (like Petals' health monitor). The dashboard and /metrics are views of
its latest state.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional, Sequence

from p2ptrain.errors import DHTProcessExited
from p2ptrain.monitor.metrics import SwarmMetrics
from p2ptrain.monitor.probe import DEFAULT_TIMEOUT_S, ReachabilityProbe
from p2ptrain.monitor.swarm_view import BootstrapState, ProbeResult, SwarmView, build_view
from p2ptrain.monitor.web import HISTORY_LEN

logger = logging.getLogger(__name__)


class SwarmMonitor:
    """Watches one run. Lifecycle: `SwarmMonitor(dht, run_id, ...).start()` … `shutdown()`.

    dht: a started hivemind DHT with the run's validators installed (client mode is enough).
    refresh_s: how often the records are read; probe_every_s: how often each public peer is
    dialled again; probe_timeout_s: how long one dial may take. Increase the timeout for
    peers far away; a probe never holds a connection open.
    """

    def __init__(self, dht, run_id: str, *, initial_peers: Sequence[str] = (), refresh_s: float = 5.0,
                 probe_every_s: float = 60.0, probe_timeout_s: float = DEFAULT_TIMEOUT_S, probe: bool = True,
                 host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)):
        from p2ptrain.swarm.records import SwarmRecords, make_validators, split_run_id
        name, creator = split_run_id(run_id)
        signer, _ = make_validators(name)  # reads only: the key signs nothing
        self.records = SwarmRecords(dht, name, signer, creator=creator)
        self.run_id = name
        self.run_problem: Optional[str] = None  # why the run record could not be used, if it could not
        self.creator: Optional[str] = None  # the run creator's peer id
        self.initial_peers = list(initial_peers)
        self.refresh_s, self.probe_every_s, self.probe_timeout_s = refresh_s, probe_every_s, probe_timeout_s
        self.grid = None
        self.view: Optional[SwarmView] = None
        self.history: collections.deque = collections.deque(maxlen=HISTORY_LEN)
        self.probes: dict[str, ProbeResult] = {}
        self.bootstrap: list[BootstrapState] = []
        self._bootstrap_checked = 0.0
        self.metrics = SwarmMetrics(lambda: self.view, impersonations=lambda: self.records.impersonations)
        self._rounds_seen: dict[str, int] = {}
        self._probe = ReachabilityProbe(host_maddrs=host_maddrs, start=False) if probe else None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.failure: Optional[DHTProcessExited] = None  # set when the watch stopped for good

    @property
    def registry(self):
        return self.metrics.registry

    # ------------------------------------------------------------- one pass

    def refresh(self) -> SwarmView:
        """Read the records, probe who is due, rebuild the view."""
        t0 = time.perf_counter()
        try:
            if self.grid is None:
                self.grid, self.creator, self.run_problem = read_grid(self.records)
            found = self.records.fetch_peers()
        except Exception:
            self.metrics.refresh_failures.inc()
            raise
        self.metrics.refresh_seconds.observe(time.perf_counter() - t0)
        now = time.time()
        if self._probe is not None:
            for record in found:
                last = self.probes.get(record.peer_id)
                if record.reachability == "public" and (last is None or now - last.checked_at >= self.probe_every_s):
                    result = self._probe.probe(record.peer_id, record.maddrs, self.probe_timeout_s)
                    self.probes[record.peer_id] = result
                    self.metrics.on_probe(result)
            if not self.bootstrap or now - self._bootstrap_checked >= self.probe_every_s:
                self.bootstrap = [self._probe_bootstrap(addr) for addr in self.initial_peers]
                self._bootstrap_checked = now
        live = {r.peer_id for r in found}
        self.probes = {p: r for p, r in self.probes.items() if p in live}
        for record in found:  # count each module's outcome once per round a peer completes
            seen = self._rounds_seen.get(record.peer_id)
            if seen is not None and record.round > seen:
                self.metrics.on_peer_round({e.module: e.outcome for e in record.last_round})
            self._rounds_seen[record.peer_id] = record.round
        view = build_view(self.run_id, self.grid, found, probes=self.probes, bootstrap=self.bootstrap, now=now,
                          run_problem=self.run_problem, creator=self.creator)
        losses = [p.loss for p in view.peers if p.loss is not None]
        with self._lock:
            self.view = view
            self.history.append({"time": now, "peers": len(view.peers), "tokens_per_s": view.tokens_per_s,
                                 "loss": sum(losses) / len(losses) if losses else None,
                                 "uncovered": len(view.uncovered)})
        return view

    def _probe_bootstrap(self, address: str) -> BootstrapState:
        peer_id = address.rsplit("/p2p/", 1)[-1] if "/p2p/" in address else ""
        result = self._probe.probe(peer_id, [address], self.probe_timeout_s)
        return BootstrapState(address, "reachable" if result.reachable else "unreachable", result.error)

    def snapshot(self) -> dict:
        with self._lock:
            view, history = self.view, list(self.history)
        return {"kind": "monitor", "time": time.time(), "run_id": self.run_id,
                "swarm": view.to_dict() if view is not None else None, "history": history}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "SwarmMonitor":
        if self._probe is not None:
            self._probe.start()

        def run() -> None:
            while True:
                try:
                    self.refresh()
                except DHTProcessExited as e:  # no later read can succeed: stop, and say why
                    self.failure = e
                    logger.error("monitor: %s", e)
                    return
                except Exception as e:  # the DHT is best effort: keep the last view, try again
                    logger.warning("monitor: could not read the swarm: %s", e)
                if self._stop.wait(self.refresh_s):
                    return

        self._thread = threading.Thread(target=run, name="p2ptrain-monitor", daemon=True)
        self._thread.start()
        return self

    def wait_for_view(self, timeout_s: float) -> Optional[SwarmView]:
        deadline = time.monotonic() + timeout_s
        while self.view is None and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.1)
        return self.view

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self._probe is not None:
            self._probe.shutdown()


def read_grid(records) -> tuple:
    """(the run's grid, its creator's peer id, why not): None, None and the reason when the
    run record cannot be used (several creators, a version skew), which still lets the
    peers be listed."""
    from p2ptrain.errors import SwarmError
    try:
        published = records.fetch_run()
    except DHTProcessExited:  # not a problem of the run's: nothing can be read any more
        raise
    except SwarmError as e:
        return None, None, str(e)
    if published is None:
        return None, None, None
    return published.state.grid, published.creator, None
