"""Peers on links of their own: one network namespace per peer, all joined by a bridge that
lives in a namespace of its own, each peer's link rate-limited with tc in both directions.

What a loopback swarm cannot show: every peer of it shares one 127.0.0.1 with no rate
limit, so an all-reduce costs CPU, never bandwidth. Here peer i listens on 10.77.0.(i+2)
inside namespace `<prefix>p<i>`; its veth's far end sits on the bridge in `<prefix>sw`.
An upload limit is a tbf qdisc on the peer's own end (what it sends), a download limit a
tbf qdisc on the bridge's end (what it receives). Nothing is routed beyond the bridge, the
machine's own interfaces are untouched, and `close()` deletes every namespace (and with
them every veth). netem (delay, loss) is not in this machine's kernel, so links differ in
rate only (benchmarks/loopback_runs.probe_link_shaping).

Needs root and iproute2 (`ip`, `tc`). Used by `simulate.py --validate --shaped`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

SUBNET = "10.77.0"  # peer i: 10.77.0.(i + 2)/24; nothing outside the namespaces has an address in it
MAX_PEERS = 250
# tbf: a bucket of 10 ms of traffic (at least 4 KiB) and a queue of up to 100 ms, about a home
# router's; with these a 20 Mbit/s link carried 19.1–19.2 Mbit/s of one TCP stream (measured here)
TBF_LATENCY = "100ms"
MIN_BURST_BYTES = 4096
UNLIMITED_MBPS = 10_000.0  # what a peer on a link nothing limits declares (and the model assumes)


@dataclass(frozen=True)
class Link:
    """A peer's link in Mbit/s each way; None: not limited (a veth, CPU-bound like loopback)."""

    up_mbps: Optional[float] = None
    down_mbps: Optional[float] = None

    @classmethod
    def symmetric(cls, mbps: Optional[float]) -> "Link":
        return cls(mbps, mbps)


def tbf(dev: str, mbps: float) -> str:
    burst = max(MIN_BURST_BYTES, int(mbps * 1e6 / 8 / 100))  # 10 ms of traffic at the rate
    return f"tc qdisc add dev {dev} root tbf rate {mbps:g}mbit burst {burst} latency {TBF_LATENCY}"


class ShapedNetwork:
    """`links[i]` is peer i's link. Use as a context manager: it builds the namespaces on
    entry and deletes them on exit (the peers inside must have stopped)."""

    def __init__(self, links: Sequence[Link], prefix: Optional[str] = None, declared: bool = False):
        if not 1 <= len(links) <= MAX_PEERS:
            raise ValueError(f"1 to {MAX_PEERS} peers, not {len(links)}")
        self.links = list(links)
        self.declared = declared  # peers tell the swarm their upload rate (join_args)
        self.prefix = prefix or f"p2pt{os.getpid()}"
        self.switch = f"{self.prefix}sw"
        self._made: list[str] = []  # namespaces created so far, deleted by close()

    def namespace(self, i: int) -> str:
        return f"{self.prefix}p{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 2}"

    def host_maddr(self, i: int) -> str:
        """Where peer i listens (a multiaddr for `p2ptrain join --host-maddrs`)."""
        return f"/ip4/{self.address(i)}/tcp/0"

    def command_prefix(self, i: int) -> list[str]:
        """Run a command inside peer i's namespace (ip execs it: the process keeps its pid)."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def join_args(self, i: int) -> list[str]:
        """Extra `p2ptrain join` options for peer i: with `declared`, its upload rate as
        --upload-mbps (a link nothing limits: UNLIMITED_MBPS), so that each all-reduce gives
        it reducing work in proportion (averaging.balanced_bandwidths)."""
        if not self.declared:
            return []
        up = self.links[i].up_mbps
        return ["--upload-mbps", f"{UNLIMITED_MBPS if up is None else up:g}"]

    def __enter__(self) -> "ShapedNetwork":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        self._netns_add(self.switch)
        _run(f"ip -n {self.switch} link add br0 type bridge")
        _run(f"ip -n {self.switch} link set br0 up")
        for i, link in enumerate(self.links):
            ns, far = self.namespace(i), f"v{i}"
            self._netns_add(ns)
            _run(f"ip link add {far} netns {self.switch} type veth peer name eth0 netns {ns}")
            _run(f"ip -n {self.switch} link set {far} master br0")
            _run(f"ip -n {self.switch} link set {far} up")
            _run(f"ip -n {ns} addr add {self.address(i)}/24 dev eth0")
            _run(f"ip -n {ns} link set eth0 up")
            _run(f"ip -n {ns} link set lo up")
            if link.up_mbps is not None:
                _run(f"ip netns exec {ns} {tbf('eth0', link.up_mbps)}")
            if link.down_mbps is not None:
                _run(f"ip netns exec {self.switch} {tbf(far, link.down_mbps)}")

    def _netns_add(self, name: str) -> None:
        _run(f"ip netns add {name}")
        self._made.append(name)

    def sent_bytes(self) -> int:
        """Bytes all peers have sent so far: what the bridge's ends of their veths received."""
        if self.switch not in self._made:
            return 0
        out = _run(f"ip netns exec {self.switch} cat /proc/net/dev")
        total = 0
        for line in out.splitlines():
            name, sep, rest = line.partition(":")
            if sep and name.strip().startswith("v"):
                total += int(rest.split()[0])  # receive bytes
        return total

    def close(self) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._made.clear()


def _run(cmd: str) -> str:
    try:
        p = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"link shaping needs root and iproute2 (ip, tc): `{cmd}` failed: {e}") from None
    if p.returncode != 0:
        raise SystemExit(f"link shaping needs root and iproute2 (ip, tc): `{cmd}` exited {p.returncode}: "
                         f"{(p.stderr or p.stdout).strip()}")
    return p.stdout
