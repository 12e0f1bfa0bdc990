"""Commands for node operators: `peers` (once or --watch), `monitor`, and the dashboard and
/metrics server that `join --metrics-port` starts. Thin shells over p2ptrain.monitor."""

from __future__ import annotations

import json
import sys
import threading
import time

import click

from p2ptrain.errors import SwarmError, UserError


def warn_if_exposed(host: str, what: str) -> None:
    from p2ptrain.monitor.web import is_loopback
    if not is_loopback(host):
        click.echo(f"warning: {what} listens on {host}, not only on this machine: anyone who can reach it "
                   "sees this node's status (there is no authentication)", err=True)


# ------------------------------------------------------------------- join

def start_node_monitor(node, host: str, port: int, emit=None):
    """`join --metrics-port`: start the dashboard and /metrics; returns (state, server)."""
    from p2ptrain.monitor.web import serve_node
    warn_if_exposed(host, "--metrics-host")
    try:
        state, server = serve_node(node, host, port)
    except OSError as e:
        raise UserError(f"--metrics-port {port}: cannot listen on {host}: {e.strerror}") from None
    if emit:
        emit({"event": "metrics", "url": server.url, "metrics": server.url + "metrics"})
    else:
        click.echo(f"dashboard at {server.url}  (Prometheus: {server.url}metrics)")
    return state, server


# ------------------------------------------------------------------ peers

def open_observer(initial_peers, bootstrap_file, host_maddrs, run_id):
    """A short-lived client-mode DHT peer with the run's validators: (dht, records, run id, addrs)."""
    from p2ptrain.cli import _initial_peers
    from p2ptrain.config import RunConfig
    from p2ptrain.swarm.dht import LOOPBACK_MADDRS, start_dht
    from p2ptrain.swarm.records import SwarmRecords, make_validators, split_run_id
    from p2ptrain.daemon import lifeline
    from p2ptrain.swarm.signals import children_ignore_sigint

    addrs, source = _initial_peers(initial_peers, bootstrap_file, False)
    if not addrs:
        raise SwarmError(f"no initial peers ({source} lists none): pass --initial-peers ADDR")
    run_id = run_id or RunConfig.load().run.id  # NAME or NAME@CREATOR
    name, creator = split_run_id(run_id)
    signer, validators = make_validators(name)  # a throwaway key: an observer publishes nothing
    lifeline.install()  # its DHT process and p2pd die with it, however it ends
    with children_ignore_sigint():
        # client mode: nobody routes DHT traffic through an observer
        dht = start_dht(addrs, host_maddrs=list(host_maddrs) or LOOPBACK_MADDRS, client_mode=True,
                        record_validators=validators)
    return dht, SwarmRecords(dht, name, signer, creator=creator), run_id, addrs


def read_view(records, addrs, dht, timeout: float, grid_cache: dict, wait_for_peers: bool,
              stop: threading.Event | None = None):
    """One look at the swarm: the run's grid, live peers (waiting up to `timeout` for the
    first record, unless `stop` is set), and whether each bootstrap peer answers."""
    from p2ptrain.monitor.health import read_grid
    from p2ptrain.monitor.probe import bootstrap_states
    from p2ptrain.monitor.swarm_view import build_view

    deadline = time.monotonic() + timeout
    if grid_cache.get("grid") is None:
        grid_cache["grid"], grid_cache["creator"], grid_cache["problem"] = read_grid(records)
    found = records.fetch_peers()
    while wait_for_peers and not found and time.monotonic() < deadline and not (stop and stop.is_set()):
        time.sleep(0.5)
        found = records.fetch_peers()
    bootstrap = bootstrap_states(dht, addrs, timeout_s=min(5.0, timeout))
    return build_view(records.run_id, grid_cache["grid"], found, bootstrap=bootstrap,
                      run_problem=grid_cache["problem"], creator=grid_cache["creator"])


def run_peers(initial_peers, bootstrap_file, host_maddrs, run_id, timeout, as_json, watch, interval) -> None:
    from p2ptrain.monitor.swarm_view import format_view
    from p2ptrain.monitor.web import json_safe

    from p2ptrain.swarm.signals import stop_on_signals

    dht, records, run_id, addrs = open_observer(initial_peers, bootstrap_file, host_maddrs, run_id)
    grid_cache: dict = {}
    stop = threading.Event()
    if watch:  # Ctrl-C ends the watch between two looks, never inside a call to the DHT
        stop_on_signals(stop)
    try:
        first = True
        while not stop.is_set():
            view = read_view(records, addrs, dht, timeout, grid_cache, wait_for_peers=first, stop=stop)
            if as_json:
                click.echo(json.dumps(json_safe(view.to_dict()), indent=None if watch else 2))
            else:
                if watch:
                    click.echo("\x1b[H\x1b[2J", nl=False)  # clear the screen, cursor home: refresh in place
                    click.echo(f"{time.strftime('%H:%M:%S')}  every {interval:g} s, Ctrl-C to stop")
                click.echo(format_view(view))
            sys.stdout.flush()
            if not watch:
                return
            first = False
            stop.wait(interval)
    except KeyboardInterrupt:  # a second Ctrl-C while watching: leave now
        if not watch:
            raise
    finally:
        dht.shutdown()


# ---------------------------------------------------------------- monitor

@click.command()
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="A peer's full multiaddr (…/p2p/12D3KooW…); repeatable. [default: bootstrap_peers.txt]")
@click.option("--bootstrap-file", type=click.Path(dir_okay=False), default=None,
              help="Read initial peers from this file instead of ./bootstrap_peers.txt.")
@click.option("--host-maddrs", multiple=True, metavar="MULTIADDR",
              help="Where the monitor's DHT peer and probe listen. [default: /ip4/127.0.0.1/tcp/0]")
@click.option("--run-id", default=None, help="Run to watch. [default: the default run]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of the dashboard and /metrics; anything but loopback exposes them to the network.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port of the dashboard and /metrics (0: any free port).")
@click.option("--refresh", default=5.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds between reads of the swarm's records.")
@click.option("--probe-every", default=60.0, show_default=True, type=click.FloatRange(1),
              help="Seconds between two reachability probes of the same peer.")
@click.option("--probe-timeout", default=5.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds one dial of a peer's announced address may take.")
@click.option("--no-probe", is_flag=True, help="Don't dial peers; show only what their records say.")
@click.option("--max-minutes", default=None, type=click.FloatRange(0, min_open=True), help="Exit after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print the address as JSON, then one swarm view per refresh.")
def monitor(initial_peers, bootstrap_file, host_maddrs, run_id, host, port, refresh, probe_every, probe_timeout,
            no_probe, max_minutes, as_json) -> None:
    """Watch a swarm: a dashboard and /metrics for all its peers, with reachability probes.

    A client-mode DHT peer that trains nothing reads the run's signed records, and a
    separate probe dials every peer that says it is public, to check that its announced
    addresses really accept connections.
    """
    from p2ptrain.monitor.health import SwarmMonitor
    from p2ptrain.monitor.web import DashboardServer, json_safe
    from p2ptrain.swarm.signals import stop_on_signals

    warn_if_exposed(host, "--host")
    dht, records, run_id, addrs = open_observer(initial_peers, bootstrap_file, host_maddrs, run_id)
    watcher = server = None
    stop = threading.Event()
    try:
        watcher = SwarmMonitor(dht, run_id, initial_peers=addrs, refresh_s=refresh, probe_every_s=probe_every,
                               probe_timeout_s=probe_timeout, probe=not no_probe,
                               host_maddrs=list(host_maddrs) or ("/ip4/127.0.0.1/tcp/0",))
        watcher.start()
        try:
            server = DashboardServer(watcher.snapshot, watcher.registry, host, port).start()
        except OSError as e:
            raise UserError(f"--port {port}: cannot listen on {host}: {e.strerror}") from None
        stop_on_signals(stop, "stopping the monitor")
        if as_json:
            click.echo(json.dumps({"event": "monitor", "run_id": run_id, "url": server.url,
                                   "metrics": server.url + "metrics"}))
        else:
            click.echo(f"watching run {run_id}: dashboard at {server.url}  (Prometheus: {server.url}metrics)")
        deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        shown = None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            if watcher.failure is not None:
                raise watcher.failure
            view = watcher.view
            if view is not None and view is not shown:
                shown = view
                if as_json:
                    click.echo(json.dumps(json_safe(view.to_dict())))
                else:
                    unreachable = [p.short_id for p in view.peers if p.probe == "unreachable"]
                    click.echo(f"{time.strftime('%H:%M:%S')}  {len(view.peers)} live peers  "
                               f"{view.tokens_per_s:,.0f} tok/s  uncovered: {', '.join(view.uncovered) or 'none'}  "
                               f"unreachable: {', '.join(unreachable) or 'none'}")
            stop.wait(0.5)
    finally:
        if server is not None:
            server.shutdown()
        if watcher is not None:
            watcher.shutdown()
        dht.shutdown()
