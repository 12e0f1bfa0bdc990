"""Prometheus metrics of a node (`join --metrics-port`) and of a swarm (`monitor`).

Conventions (https://prometheus.io/docs/practices/naming/): every name starts with
`p2ptrain_`, values are in base units (`_seconds`, `_bytes`, ratios 0–1), counters end in
`_total`, and labels take only bounded values — a module of the run's grid, a round
outcome, a phase, a reason from a fixed vocabulary — never a peer id or an address.

A node's metrics are fed by the round driver's callbacks (`on_step`, `on_round`) and read
from `node.status()`, the node's checkpoint store and its cached swarm view at scrape
time; nothing here reaches into the driver.
"""

from __future__ import annotations

import logging
import platform
import re
import threading
import time
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from p2ptrain import __version__
from p2ptrain.swarm.records import ROUND_OUTCOMES

logger = logging.getLogger(__name__)

# `<counter>_created` series (a gauge per counter) only add noise to a node's scrape
disable_created_metrics()

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
GROUP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
MAX_SUSPEND_REASONS = 32  # distinct suspend-reason labels kept; more fold into "other"
MAX_REJECT_REASONS = 32  # the driver's rejection reasons are a fixed vocabulary in its code


def outcome_of(module_round) -> str:
    """The driver's outcome word for one module's round (ModuleRound.outcome)."""
    outcome = getattr(module_round, "outcome", None)
    if isinstance(outcome, str):
        return outcome
    if module_round.rejected:
        return "rejected"
    if module_round.partial:
        return "partial"
    if module_round.resynced_from:
        return "resynced"
    return "alone" if module_round.alone else "ok"


def reason_label(reason: str) -> str:
    """A suspend reason as a label value: lower-case words joined by `_`, at most 48 chars."""
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")[:48] or "unknown"


def add_build_info(registry: CollectorRegistry) -> None:
    import hivemind
    import torch
    Info("p2ptrain_build", "Versions of p2ptrain and what it runs on.", registry=registry).info({
        "version": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "hivemind": hivemind.__version__})


# --------------------------------------------------------------------- a node

class NodeMetrics:
    """Metrics of one training node. Wire `on_step` / `on_round` into `node.run(...)`, call
    `start()` for the 1 s suspension sampler and `stop()` at the end.

    view: returns the node's latest SwarmView (or None) — coverage and live peers.
    """

    def __init__(self, node, view: Optional[Callable[[], object]] = None,
                 registry: Optional[CollectorRegistry] = None):
        self.node = node
        self.view = view or (lambda: None)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        add_build_info(r)
        cfg = node.cfg
        self.tokens_per_step = cfg.inner.batch_size * cfg.model.context
        self._last_step = node.session.inner.step_count
        self._lock = threading.Lock()
        # --- inner loop
        self.inner_steps = Counter("p2ptrain_inner_steps", "Inner optimizer steps taken.", registry=r)
        self.tokens = Counter("p2ptrain_tokens", "Tokens trained on (inner steps × batch × context).", registry=r)
        self.inner_loss = Gauge("p2ptrain_inner_loss", "Training loss of the latest inner steps (nats per token).",
                                registry=r)
        self.tokens_per_second = Gauge("p2ptrain_tokens_per_second",
                                       "Inner-loop throughput over the current or last round.", registry=r)
        # --- rounds
        self.rounds = Counter("p2ptrain_rounds", "Rounds completed by this node.", registry=r)
        self.round_loss = Gauge("p2ptrain_round_loss", "Mean training loss of the last round (nats per token).",
                                registry=r)
        self.round_seconds = Histogram("p2ptrain_round_seconds", "Seconds per round, by phase: inner (local steps), "
                                       "outer (averaging and the outer step, training stalled), wall (whole round).",
                                       ["phase"], buckets=SECONDS_BUCKETS, registry=r)
        self.module_rounds = Counter("p2ptrain_module_rounds", "Outer steps per module, by outcome: ok (averaged "
                                     "with peers), alone, partial (all-reduce partly failed), split (holders "
                                     "disagree, no majority), resynced (state downloaded from a peer), rejected "
                                     "(average refused), failed (the averaging itself failed).",
                                     ["module", "outcome"], registry=r)
        self.group_size = Histogram("p2ptrain_averaging_group_size", "Peers in a module's all-reduce group, this "
                                    "node included (1 = alone).", ["module"], buckets=GROUP_BUCKETS, registry=r)
        self.group_fill = Gauge("p2ptrain_averaging_group_fill_ratio", "Last round's group size over what was "
                                "possible: min(target group size, live holders of the module).", ["module"],
                                registry=r)
        self.group_target = Gauge("p2ptrain_averaging_group_size_target", "The run's averaging.target_group_size.",
                                  registry=r)
        self.group_target.set(cfg.averaging.target_group_size)
        # measured in the averager's process; a module that averaged alone adds nothing
        self.matchmaking_seconds = Histogram("p2ptrain_matchmaking_seconds", "Seconds from asking for a module's "
                                             "group to the group forming.", ["module"], buckets=SECONDS_BUCKETS, registry=r)
        self.allreduce_seconds = Histogram("p2ptrain_allreduce_seconds", "Seconds of a module's all-reduce.",
                                           ["module"], buckets=SECONDS_BUCKETS, registry=r)
        self.sent_bytes = Counter("p2ptrain_averaging_sent_bytes", "Wire bytes of tensor parts sent in a "
                                  "module's all-reduces (our parts to reducers, our reduced slice back to senders).", ["module"],
                                  registry=r)
        self.received_bytes = Counter("p2ptrain_averaging_received_bytes", "Wire bytes of tensor parts received "
                                      "in a module's all-reduces (senders' parts for our slice, reduced slices back).",
                                      ["module"], registry=r)
        for module in node.session.module_ids:  # series exist (at zero) from the start
            for outcome in ROUND_OUTCOMES:
                self.module_rounds.labels(module, outcome)
        # --- suspension: seconds per reason, sampled once a second
        self.suspended_seconds = Counter("p2ptrain_suspended_seconds", "Seconds suspended, by reason (a node "
                                         "suspended for two reasons counts in both).", ["reason"], registry=r)
        self._suspend_reasons: set[str] = set()
        self._reason_labels: set[str] = set()
        self._labels_lock = threading.Lock()
        self._sampled_at = time.monotonic()
        self._stop = threading.Event()
        self._sampler: Optional[threading.Thread] = None
        r.register(_NodeCollector(self))

    # ------------------------------------------------------------- callbacks

    def on_step(self, report) -> None:
        """`node.run(on_step=...)`: a StepReport every few inner steps."""
        with self._lock:
            steps = max(report.step - self._last_step, 0)
            self._last_step = report.step
        self.inner_steps.inc(steps)
        self.tokens.inc(steps * self.tokens_per_step)
        self.inner_loss.set(report.loss)
        self.tokens_per_second.set(report.tokens_per_s)

    def on_round(self, report) -> None:
        """`node.run(on_round=...)`: a RoundReport after each round."""
        self.rounds.inc()
        self.round_loss.set(report.loss)
        self.tokens_per_second.set(report.tokens_per_s)
        for phase, seconds in (("inner", report.seconds_inner), ("outer", report.seconds_outer),
                               ("wall", report.seconds_wall)):
            self.round_seconds.labels(phase).observe(seconds)
        view = self.view()
        holders = getattr(view, "coverage", {}) or {}
        target = self.node.cfg.averaging.target_group_size
        for module, r in report.modules.items():
            outcome = outcome_of(r)
            self.module_rounds.labels(module, outcome).inc()
            size = len(r.group) if r.group else 1
            self.group_size.labels(module).observe(size)
            possible = min(target, max(holders.get(module, 0), size, 1))
            self.group_fill.labels(module).set(min(size / possible, 1.0))
            for attr, histogram in (("seconds_matchmaking", self.matchmaking_seconds),
                                    ("seconds_allreduce", self.allreduce_seconds)):
                if getattr(r, attr, None) is not None:
                    histogram.labels(module).observe(getattr(r, attr))
            for attr, counter in (("bytes_sent", self.sent_bytes), ("bytes_received", self.received_bytes)):
                if getattr(r, attr, None) is not None:
                    counter.labels(module).inc(getattr(r, attr))

    # ------------------------------------------------------------- sampler

    def sample_suspension(self) -> None:
        """Credit the time since the last sample to the reasons the node was suspended for."""
        now = time.monotonic()
        with self._lock:
            elapsed, self._sampled_at = now - self._sampled_at, now
            previous = self._suspend_reasons
            suspension = getattr(self.node, "suspension", None)
            current = set(suspension.reasons()) if suspension is not None else set()
            self._suspend_reasons = current
        for reason in previous & current:
            self.suspended_seconds.labels(self.reason_label(reason)).inc(elapsed)

    def reason_label(self, reason: str) -> str:
        """Suspend reasons come from the daemon's policy, a small vocabulary; past
        MAX_SUSPEND_REASONS distinct ones, the rest count as `other`."""
        label = reason_label(reason)
        with self._labels_lock:
            if label not in self._reason_labels and len(self._reason_labels) >= MAX_SUSPEND_REASONS:
                return "other"
            self._reason_labels.add(label)
        return label

    def start(self, period_s: float = 1.0) -> "NodeMetrics":
        def run() -> None:
            while not self._stop.wait(period_s):
                try:
                    self.sample_suspension()
                except Exception as e:  # never let metrics take the node down
                    logger.debug("metrics sampler: %s", e)

        self._sampler = threading.Thread(target=run, name="p2ptrain-metrics", daemon=True)
        self._sampler.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)


class _NodeCollector(Collector):
    """Values read at scrape time: the node's status, its checkpoint store, its swarm view."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def collect(self) -> Iterable:
        node = self.metrics.node
        status = node.status()
        yield _gauge("p2ptrain_round", "The node's current round.", status["round"])
        yield _gauge("p2ptrain_start_time_seconds", "Unix time the node started.", node.started_at)
        info = GaugeMetricFamily("p2ptrain_node", "This node's run, path and reachability (value 1).",
                                 labels=["run_id", "path", "reachability", "state"])
        info.add_metric([status["run_id"], status["path"], status["reachability"], status["state"]], 1)
        yield info
        suspended = GaugeMetricFamily("p2ptrain_suspended", "1 while the node is suspended for this reason.",
                                      labels=["reason"])
        for reason in status["suspended"]:
            suspended.add_metric([self.metrics.reason_label(reason)], 1)
        yield suspended
        rejected = CounterMetricFamily("p2ptrain_rejected_contributions", "Messages from peers refused (malformed "
                                       "or implausible claims, states, all-reduce parts), by reason.",
                                       labels=["reason"])
        for reason, n in sorted((status.get("rejected") or {}).get("by_reason", {}).items())[:MAX_REJECT_REASONS]:
            rejected.add_metric([reason_label(reason)], n)
        yield rejected
        downloads = CounterMetricFamily("p2ptrain_resyncs", "Module states downloaded from a peer: catch-up before "
                                        "a round (newcomer, resumed, stale base) and re-sync after one (minority).",
                                        labels=["module"])
        counts = getattr(node, "state_downloads", {})
        for module in node.session.module_ids:
            downloads.add_metric([module], counts.get(module, 0))
        yield downloads
        yield _counter("p2ptrain_impersonated_records", "Peer records dropped because another key signed them.",
                       getattr(node.records, "impersonations", 0))
        moved = p2pd_read_bytes(getattr(node, "dht", None))
        if moved is not None:
            yield _counter("p2ptrain_network_bytes", "Bytes this node moved over the network, in and out together "
                           "(all swarm traffic goes through its libp2p daemon, p2pd, which reads every byte once: "
                           "from the network or from the node; Linux only).", moved)
        stats = getattr(node.session.store, "stats", None)
        if stats is not None:
            writes = SummaryMetricFamily("p2ptrain_checkpoint_write_seconds", "Seconds to write a checkpoint "
                                         "(copy, checksums, fsync, rename).",
                                         count_value=stats.writes, sum_value=stats.write_seconds)
            yield writes
            yield _counter("p2ptrain_checkpoint_write_failures", "Checkpoint writes that failed (the previous "
                           "checkpoint stays).", stats.failures)
        yield from swarm_families(self.metrics.view())


def p2pd_read_bytes(dht) -> Optional[int]:
    """Bytes read by the DHT's p2pd (/proc/PID/io rchar), which carries all of the node's
    traffic (the averagers share it): bytes in + bytes out. None where not measurable."""
    import psutil
    pid = getattr(dht, "pid", None)
    if pid is None:
        return None
    try:
        daemons = [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "p2pd"]
        return sum(p.io_counters().read_chars for p in daemons) if daemons else None
    except (psutil.Error, AttributeError):  # gone, or no io counters on this platform
        return None


# -------------------------------------------------------------------- a swarm

def swarm_families(view) -> Iterable:
    """Gauges of a SwarmView: live peers, coverage, swarm speed (node and monitor alike)."""
    if view is None:
        return
    peers = GaugeMetricFamily("p2ptrain_swarm_peers", "Live peers of the run, by the reachability they announce.",
                              labels=["reachability"])
    for reach in ("public", "relay", "client"):
        peers.add_metric([reach], sum(1 for p in view.peers if p.reachability == reach))
    yield peers
    yield _gauge("p2ptrain_swarm_peers_suspended", "Live peers that are suspended.",
                 sum(1 for p in view.peers if p.suspended))
    holders = GaugeMetricFamily("p2ptrain_swarm_module_holders", "Live peers whose path contains the module.",
                                labels=["module"])
    for module, n in view.coverage.items():
        holders.add_metric([module], n)
    yield holders
    yield _gauge("p2ptrain_swarm_modules_uncovered", "Modules that no live peer holds.", len(view.uncovered))
    if view.coverage:
        yield _gauge("p2ptrain_swarm_coverage_ratio", "Share of the grid's modules held by at least one live peer.",
                     1 - len(view.uncovered) / len(view.coverage))
    yield _gauge("p2ptrain_swarm_tokens_per_second", "Sum of the live, unsuspended peers' tokens/s.",
                 view.tokens_per_s)
    outcomes = GaugeMetricFamily("p2ptrain_swarm_last_round_modules", "Modules by outcome in the live peers' "
                                 "last rounds.", labels=["outcome"])
    for outcome, n in view.outcomes.items():
        outcomes.add_metric([outcome], n)
    yield outcomes


class SwarmMetrics:
    """Metrics of `monitor`: the swarm view at scrape time, plus counters the monitor
    accumulates as it watches (module rounds by outcome, probes)."""

    def __init__(self, view: Callable[[], object], registry: Optional[CollectorRegistry] = None,
                 impersonations: Callable[[], int] = lambda: 0):
        self.view = view
        self.impersonations = impersonations
        self.registry = registry or CollectorRegistry()
        r = self.registry
        add_build_info(r)
        self.module_rounds = Counter("p2ptrain_swarm_module_rounds", "Outer steps seen in the peers' records, by "
                                     "module and outcome.", ["module", "outcome"], registry=r)
        self.probes = Counter("p2ptrain_probes", "Reachability probes of peers that announce themselves public, by "
                              "result.", ["result"], registry=r)
        for result in ("reachable", "unreachable"):
            self.probes.labels(result)
        self.probe_seconds = Histogram("p2ptrain_probe_seconds", "Seconds a reachability probe took.",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.refresh_seconds = Histogram("p2ptrain_swarm_refresh_seconds", "Seconds to read the swarm's records "
                                         "from the DHT.", buckets=SECONDS_BUCKETS, registry=r)
        self.refresh_failures = Counter("p2ptrain_swarm_refresh_failures", "DHT reads of the swarm that failed.",
                                        registry=r)
        r.register(_SwarmCollector(self))

    def on_probe(self, result) -> None:
        self.probes.labels("reachable" if result.reachable else "unreachable").inc()
        self.probe_seconds.observe(result.seconds)

    def on_peer_round(self, last_round: dict[str, str]) -> None:
        """A peer finished a round (its record's round advanced): count its modules' outcomes."""
        for module, outcome in last_round.items():
            if outcome in ROUND_OUTCOMES:
                self.module_rounds.labels(module, outcome).inc()


class _SwarmCollector(Collector):
    def __init__(self, metrics: SwarmMetrics):
        self.metrics = metrics

    def collect(self) -> Iterable:
        view = self.metrics.view()
        yield from swarm_families(view)
        yield _counter("p2ptrain_impersonated_records", "Peer records dropped because another key signed them.",
                       self.metrics.impersonations())
        if view is not None:
            probed = GaugeMetricFamily("p2ptrain_swarm_peers_probed", "Peers announcing themselves public, by what "
                                       "the last probe found.", labels=["result"])
            for result in ("reachable", "unreachable"):
                probed.add_metric([result], sum(1 for p in view.peers if p.probe == result))
            yield probed


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
