"""`make demo`: a real 4-peer swarm on 127.0.0.1 training the 2×2 grid on the built-in
corpus, with a live table, then a routed evaluation against the untrained start.

Each peer is a separate `p2ptrain join` process with its own home, identity, DHT node
and averagers — exactly what four volunteers would run — except that all listen on
loopback. Run with `python -m p2ptrain.demo [--rounds N] [--steps-per-round H]`.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import click

PATHS = ["0,0", "0,1", "1,0", "1,1"]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def demo_config(rounds: int, steps_per_round: int) -> str:
    from p2ptrain.config import RunConfig
    config = RunConfig.load()
    config.run.id = "p2ptrain-demo"
    config.inner.steps_per_round = steps_per_round
    config.inner.total_rounds = rounds
    config.inner.warmup_steps = min(config.inner.warmup_steps, steps_per_round)
    config.averaging.matchmaking_time = 4.0
    # 25 steps (the lr schedule's nominal round) take ~11 s on 2 shared cores with 4 peers;
    # peers train until the round's end (averaging.fill_round), so no core idles waiting for it
    config.averaging.round_seconds = 16.0
    config.validate("demo")
    return config.to_toml()


class Peer:
    """One `p2ptrain join --json` process; its JSON events go to a shared queue."""

    def __init__(self, index: int, path: str, home: Path, args: list[str], events: "queue.Queue",
                 command_prefix: Sequence[str] = ()):
        self.index = index
        self.path = path
        self.home = home
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", P2PTRAIN_LOGLEVEL="ERROR")
        self.log = open(home / "peer.log", "w")
        # command_prefix: e.g. `ip netns exec NS` (benchmarks/shaped_links.py), which execs the rest
        cmd = [*command_prefix, sys.executable, "-m", "p2ptrain.cli", "join", "--home", str(home), "--json", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.reader.start()

    def _read(self, events: "queue.Queue") -> None:
        for line in self.proc.stdout:
            try:
                events.put((self.index, json.loads(line)))
            except json.JSONDecodeError:
                continue
        events.put((self.index, {"event": "exit", "code": self.proc.wait()}))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: abandon the round, checkpoint, leave
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def launch_swarm(root: Path, config_file: Path, rounds: int, paths: list[str], events: "queue.Queue",
                 device: str = "cpu", network=None) -> list[Peer]:
    """Start one `p2ptrain join` process per path on loopback; the first starts the swarm,
    and all wait for each other before round 1. `network` (benchmarks/shaped_links.py's
    ShapedNetwork) instead puts peer i in its own network namespace, listening on its address."""
    common = ["--run-config", str(config_file), "--no-identity", "--device", device,
              "--max-rounds", str(rounds), "--wait-for-peers", str(len(paths))]
    peers: list[Peer] = []
    first_addr = run_pin = None
    try:
        for i, path in enumerate(paths):
            home = root / f"peer{i}"
            home.mkdir(parents=True, exist_ok=True)
            # joiners pin the run to its creator, so no other run record could ever be used
            swarm = ["--new-swarm"] if i == 0 else ["--initial-peers", first_addr, "--run-id", run_pin]
            listen = network.host_maddr(i) if network is not None else LOOPBACK
            prefix = network.command_prefix(i) if network is not None else ()
            extra = network.join_args(i) if network is not None else []
            peers.append(Peer(i, path, home, [*common, "--host-maddrs", listen, *extra, *swarm, "--path", path],
                              events, command_prefix=prefix))
            if i == 0:
                first_addr, run_pin = _wait_for_join(events, peers[0])
    except BaseException:
        for peer in peers:
            peer.stop()
        raise
    return peers


@click.command()
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(1))
@click.option("--steps-per-round", default=25, show_default=True, type=click.IntRange(1))
@click.option("--home", "root", default="demo-home", show_default=True, type=click.Path(file_okay=False))
def main(rounds: int, steps_per_round: int, root: str) -> None:
    """Start a 4-peer loopback swarm, train, and evaluate."""
    from p2ptrain.logs import setup_logging
    setup_logging()
    root_path = Path(root)
    shutil.rmtree(root_path, ignore_errors=True)
    root_path.mkdir(parents=True)
    config_file = root_path / "run.toml"
    config_file.write_text(demo_config(rounds, steps_per_round))
    events: queue.Queue = queue.Queue()
    peers: list[Peer] = []
    t0 = time.monotonic()
    click.echo(f"p2ptrain demo: 4 peers on 127.0.0.1, grid 2x2, {rounds} rounds of {steps_per_round} "
               f"AdamW8bit steps, fp16 all-reduce per module; logs in {root_path}/peer*/peer.log")
    try:
        peers = launch_swarm(root_path, config_file, rounds, PATHS, events)
        _live_table(events, peers, rounds, t0)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopping the peers", err=True)
    finally:
        for peer in peers:
            peer.stop()
    codes = [p.proc.returncode for p in peers]
    if len(peers) < len(PATHS) or any(codes):
        click.echo(f"some peers failed (exit codes {codes}); see {root_path}/peer*/peer.log", err=True)
        sys.exit(1)
    _evaluate(root_path, config_file, [p.home for p in peers])
    click.echo(f"demo finished in {time.monotonic() - t0:.0f} s")


def _wait_for_join(events: "queue.Queue", first: Peer, timeout: float = 180.0) -> tuple[str, str]:
    """The first peer's address and its run pin (run id @ creator), once it has joined."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            index, event = events.get(timeout=1.0)
        except queue.Empty:
            continue
        if event.get("event") == "joined":
            click.echo(f"peer 0 started the swarm at {event['maddrs'][0]}")
            return event["maddrs"][0], event["run_pin"]
        if event.get("event") == "exit":
            raise click.ClickException(f"the first peer exited with code {event['code']}; "
                                       f"see {first.home / 'peer.log'}")
    raise click.ClickException("the first peer did not start within 3 minutes")


def _peers_per_module(event: dict) -> str:
    """'stem:4  L0.M1:2': a round or landed event's group size per module."""
    return "  ".join(f"{m}:{n}" for m, n in event["peers_per_module"].items())


def _live_table(events: "queue.Queue", peers: list[Peer], rounds: int, t0: float) -> None:
    click.echo(f"{'time':>6}  {'peer':<5}{'path':<6}{'round':>6}{'loss':>8}{'tok/s':>9}{'outer s':>9}  peers per module")
    finished = 0
    while finished < len(peers):
        index, event = events.get()
        kind = event.get("event")
        elapsed = time.monotonic() - t0
        if kind == "joined" and index:
            click.echo(f"{elapsed:>5.0f}s  peer {index} joined, path {event['path']}")
        elif kind == "peers" and index == 0:
            click.echo(f"{elapsed:>5.0f}s  all {event['seen']} peers are in; training starts")
        elif kind == "round":
            modules = _peers_per_module(event)
            flags = "".join(f"  re-synced {m}" for m in event["resynced"])
            click.echo(f"{elapsed:>5.0f}s  {index:<5}{peers[index].path:<6}{event['round']:>6}{event['loss']:>8.3f}"
                       f"{event['tokens_per_s']:>9,.0f}{event['seconds_outer']:>9.1f}  {modules}{flags}")
        elif kind == "landed":  # overlap: the last round's averaging, finished as the peer stopped
            click.echo(f"{elapsed:>5.0f}s  {index:<5}{peers[index].path:<6}{event['round']:>6}  "
                       f"averaging landed at stop  {_peers_per_module(event)}")
        elif kind == "exit":
            finished += 1
            if event["code"]:
                click.echo(f"peer {index} exited with code {event['code']}", err=True)


def _evaluate(root: Path, config_file: Path, homes: list[Path]) -> None:
    from p2ptrain.cli import format_eval
    from p2ptrain.config import RunConfig
    from p2ptrain.data.corpus import load_documents
    from p2ptrain.run_state import RunState, run_state_file
    from p2ptrain.train.evaluate import evaluate
    import torch

    config = RunConfig.load(config_file)
    state = RunState.from_json(run_state_file(homes[0], config.run.id).read_text())
    click.echo("\nrouted held-out evaluation (each document scored by the path the router picks):")
    report = evaluate(state, load_documents(None, config.data.max_doc_chars), homes, torch.device("cpu"),
                      max_tokens_per_path=16_384)
    click.echo(format_eval(report))
    gain = report.mixture_init_loss - report.mixture_loss
    click.echo(f"the swarm lowered the routed mixture loss by {gain:.3f} nats/token vs the untrained start")


if __name__ == "__main__":
    main()
