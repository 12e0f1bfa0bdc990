"""Monitoring a real loopback swarm: `peers`, `join --metrics-port`, the dashboard in a
real headless Chromium, and `monitor`'s reachability probe. Only 127.0.0.1, ever."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest
from hivemind.utils.timed_storage import get_dht_time

from p2ptrain.model.grid import Grid
from p2ptrain.monitor.web import serve_node, stop_node_server
from p2ptrain.swarm.records import make_validators, new_peer_record, peers_key, SwarmRecords
from tests.swarm.browser import headless_chromium
from tests.swarm.conftest import in_parallel, swarm_config
from tests.swarm.prometheus_rules import convention_errors, parse
from tests.swarm.test_cli_swarm import LOOPBACK, finish, p2ptrain

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

GRID_MODULES = set(Grid((2, 2)).all_modules())


def read_json_line(process, timeout: float = 180) -> dict:
    """The next JSON line a p2ptrain process prints (the test's timeout guards a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            pytest.fail(f"p2ptrain exited early ({process.poll()}):\n{process.stderr.read()[-3000:]}")
        if line.startswith("{"):
            return json.loads(line)
    pytest.fail("no JSON line in time")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def stop(process) -> tuple[int, str, str]:
    process.send_signal(signal.SIGINT)
    return finish(process, 120)


def test_peers_lists_every_live_peer_with_its_path_and_round_and_watch_refreshes(swarm):
    # Prepare: three peers on three paths, each one round in
    config = swarm_config("mon-peers")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "0,1", initial_peers=a.maddrs)
    c = swarm.open(config, "1,1", initial_peers=a.maddrs)
    in_parallel(*(lambda n=n: n.node.run(max_rounds=1) for n in (a, b, c)))
    # rounds are numbered on the swarm's clock: each peer's record carries the node's own count
    expected = sorted((n.node.peer_id, path, n.node.round) for n, path in ((a, "0,0"), (b, "0,1"), (c, "1,1")))
    assert all(n.node.round >= 1 for n in (a, b, c))

    # Execute: once as JSON, then --watch for two refreshes and Ctrl-C
    code, out, err = finish(p2ptrain("peers", "--initial-peers", a.maddrs[0], "--run-id", "mon-peers",
                                     "--host-maddrs", LOOPBACK, "--json"), 120)
    watch = p2ptrain("peers", "--initial-peers", b.maddrs[0], "--run-id", "mon-peers", "--host-maddrs", LOOPBACK,
                     "--json", "--watch", "--interval", "1")
    try:
        views = [read_json_line(watch, 120), read_json_line(watch, 120)]
        watch_code, _, watch_err = stop(watch)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)

    # Assert
    assert code == 0, err
    listing = json.loads(out)
    assert listing["run_found"]
    assert sorted((p["peer_id"], p["path"], p["round"]) for p in listing["peers"]) == expected
    assert listing["coverage"] == {"stem": 3, "L0.M0": 2, "L0.M1": 1, "L1.M0": 1, "L1.M1": 2}
    assert listing["uncovered"] == []
    assert all(p["reachability"] == "public" and p["suspended"] == [] for p in listing["peers"])
    assert listing["bootstrap"] == [{"address": a.maddrs[0], "state": "reachable", "error": None}]
    assert watch_code == 0, watch_err
    for view in views:
        assert sorted((p["peer_id"], p["path"], p["round"]) for p in view["peers"]) == expected


def test_status_of_each_of_three_joined_peers_names_its_path_and_round(tmp_path):
    # Prepare: three `p2ptrain join` processes, each in its own home, on three paths
    config_file = tmp_path / "run.toml"
    config_file.write_text(swarm_config("mon-status").to_toml())
    paths = ("0,0", "0,1", "1,1")
    nodes = []

    def join(home: str, path: str, *extra: str):
        nodes.append(p2ptrain("join", "--home", str(tmp_path / home), "--run-config", str(config_file),
                              "--host-maddrs", LOOPBACK, "--path", path, "--no-identity", "--json", *extra))
        return nodes[-1]

    try:
        first = join("a", paths[0], "--new-swarm")
        joined = read_json_line(first)
        for home, path in (("b", paths[1]), ("c", paths[2])):  # both start at once
            join(home, path, "--initial-peers", joined["maddrs"][0])
        assert [read_json_line(node)["event"] for node in nodes[1:]] == ["joined", "joined"]
        for node in nodes:  # every peer one round in
            while read_json_line(node, 180)["event"] != "round":
                pass

        # Execute: `status --json` for each home (all three at once), while the peers train
        asked = [p2ptrain("status", "--home", str(tmp_path / home), "--json") for home in "abc"]
        statuses = [finish(process, 120) for process in asked]
        stopped = [stop(node) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)

    # Assert: each answers for its own node, running, at least one round in
    for (code, out, err), path in zip(statuses, paths):
        assert code == 0, err
        status = json.loads(out)
        assert status["kind"] == "join" and status["state"] == "running" and status["suspended"] == []
        node = status["node"]
        assert node["path"] == path and node["run_id"] == "mon-status"
        assert node["round"] >= 1 and node["rounds_done"] >= 1
        assert node["state"] in ("training", "averaging")
    assert len({json.loads(out)["node"]["peer_id"] for _, out, _ in statuses}) == 3
    assert all(code == 0 for code, _, _ in stopped), [err[-500:] for _, _, err in stopped]


def test_a_record_forged_under_another_peers_key_does_not_show(swarm):
    # Prepare
    config = swarm_config("mon-forged")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "1,1", initial_peers=a.maddrs)

    # Execute: b writes a record claiming a's identity under a's signing key
    forged = new_peer_record(peer_id=a.node.peer_id, path=[1, 0], round=99).dict()
    stored = b.dht.store(peers_key("mon-forged"), forged, get_dht_time() + 60, subkey=a.node.records.public_key)
    code, out, err = finish(p2ptrain("peers", "--initial-peers", b.maddrs[0], "--run-id", "mon-forged",
                                     "--host-maddrs", LOOPBACK, "--json"), 120)

    # Assert: the signature check drops it everywhere; a shows as it published itself
    assert not stored
    assert code == 0, err
    shown = {p["peer_id"]: (p["path"], p["round"]) for p in json.loads(out)["peers"]}
    assert shown == {a.node.peer_id: ("0,0", 0), b.node.peer_id: ("1,1", 0)}


def test_a_record_claiming_another_peers_id_under_its_own_key_does_not_show(swarm):
    # Prepare
    config = swarm_config("mon-impostor")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "1,1", initial_peers=a.maddrs)
    impostor, _ = make_validators("mon-impostor")

    # Execute: b signs, with a key of its own, a record that says it is a
    SwarmRecords(b.dht, "mon-impostor", b.node.records.signer).publish_peer(
        new_peer_record(peer_id=a.node.peer_id, path=[1, 0], round=99, time=time.time() + 5))
    shown = {(p.peer_id, tuple(p.path)) for p in SwarmRecords(a.dht, "mon-impostor", impostor).fetch_peers()}

    # Assert: only a's own record speaks for a
    assert (a.node.peer_id, (1, 0)) not in shown


def test_the_heartbeat_republishes_a_record_only_when_the_node_has_not_published_for_a_period(swarm):
    # Prepare: one node whose record stores are counted by thread (the real store still runs)
    a = swarm.open(swarm_config("heartbeat"), "0,0")
    publishes: list[tuple[str, float]] = []
    publish = a.node.records.publish_peer

    def counted(record, *args, **kwargs):
        publishes.append((threading.current_thread().name, time.monotonic()))
        return publish(record, *args, **kwargs)

    a.node.records.publish_peer = counted
    period = 5.0

    # Execute: the round driver publishes every 0.5 s for 6 s, then nothing for 12 s
    a.node.publish_status()
    a.node.start_heartbeat(period_s=period)
    busy_until = time.monotonic() + 6.0
    while time.monotonic() < busy_until:
        time.sleep(0.5)
        a.node.publish_status()
    quiet_from = time.monotonic()
    time.sleep(12.0)
    found = a.node.records.fetch_peers()

    # Assert: no beat while the driver kept the record fresh; beats once it stopped, so the
    # record stays in the table (its lifetime is three periods)
    beats = [t for thread, t in publishes if thread == "p2ptrain-heartbeat"]
    assert not [t for t in beats if t < quiet_from], publishes
    assert 1 <= len([t for t in beats if t >= quiet_from]) <= 3, publishes
    assert [p.peer_id for p in found] == [a.node.peer_id]


def test_metrics_of_a_training_node_scraped_over_http_move_and_follow_the_conventions(tmp_path):
    # Prepare: `join --metrics-port 0` (any free port) trains alone
    config_file = tmp_path / "run.toml"
    config_file.write_text(swarm_config("mon-metrics", steps_per_round=20).to_toml())
    node = p2ptrain("join", "--home", str(tmp_path / "a"), "--new-swarm", "--run-config", str(config_file),
                    "--host-maddrs", LOOPBACK, "--path", "1,0", "--no-identity", "--metrics-port", "0", "--json")
    try:
        assert read_json_line(node)["event"] == "joined"
        served = read_json_line(node)
        assert served["event"] == "metrics" and served["url"].startswith("http://127.0.0.1:")

        # Execute: scrape after the first round and after the second
        assert read_json_line(node)["event"] == "round"
        first = scrape(served["metrics"])
        assert read_json_line(node)["event"] == "round"
        second = scrape(served["metrics"])
        deadline = time.monotonic() + 60  # the swarm view is re-read from the DHT after each round
        while time.monotonic() < deadline:
            swarm_peers = {s.labels["reachability"]: s.value
                           for s in parse(scrape(served["metrics"]))["p2ptrain_swarm_peers"].samples}
            if swarm_peers["public"] == 1:
                break
            time.sleep(0.5)
        code, out, err = stop(node)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)

    # Assert: counters moved by exactly one round's worth
    before, after = parse(first), parse(second)

    def value(families, name, **labels):
        return sum(s.value for s in families[name].samples
                   if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value(after, "p2ptrain_rounds") == value(before, "p2ptrain_rounds") + 1
    assert value(after, "p2ptrain_inner_steps") >= value(before, "p2ptrain_inner_steps") + 20
    assert value(after, "p2ptrain_tokens") - value(before, "p2ptrain_tokens") == (
        20 * 4 * 32 * (value(after, "p2ptrain_inner_steps") - value(before, "p2ptrain_inner_steps")) / 20)
    for module in ("stem", "L0.M1", "L1.M0"):  # alone in the swarm: every module steps alone
        assert value(after, "p2ptrain_module_rounds", module=module, outcome="alone") == \
            value(before, "p2ptrain_module_rounds", module=module, outcome="alone") + 1
    assert value(after, "p2ptrain_round") == value(before, "p2ptrain_round") + 1
    assert value(after, "p2ptrain_network_bytes") >= value(before, "p2ptrain_network_bytes") > 0
    assert swarm_peers == {"public": 1, "relay": 0, "client": 0}
    assert convention_errors(second, GRID_MODULES) == []
    assert code == 0, err
    with pytest.raises(OSError):  # the server is gone with the node
        scrape(served["metrics"])


def test_the_dashboard_in_headless_chromium_shows_the_grid_every_peer_and_the_loss(swarm, tmp_path):
    # Prepare: two peers train two rounds; a serves its dashboard
    config = swarm_config("mon-dash")
    a = swarm.open(config, "0,0")
    b = swarm.open(config, "1,1", initial_peers=a.maddrs)
    state, server = serve_node(a.node, port=0, refresh_s=1.0)
    try:
        in_parallel(lambda: a.node.run(max_rounds=2, on_step=state.on_step, on_round=state.on_round),
                    lambda: b.node.run(max_rounds=2))
        deadline = time.monotonic() + 60
        while (state.snapshot()["swarm"] is None or len(state.snapshot()["swarm"]["peers"]) < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.5)

        # Execute: open it in a real browser and wait for the page to draw the state
        from selenium.webdriver.support.ui import WebDriverWait
        with headless_chromium() as browser:
            browser.get(server.url)
            WebDriverWait(browser, 60).until(
                lambda d: len(d.find_elements("css selector", "#peers tr.peer")) == 2
                and len(d.find_elements("css selector", "#loss-chart circle.point")) >= 2)
            cells = {c.get_attribute("data-module"): c.text.split()[0]
                     for c in browser.find_elements("css selector", "#grid .cell")}
            rows = [r.get_attribute("data-peer") for r in browser.find_elements("css selector", "#peers tr.peer")]
            points = len(browser.find_elements("css selector", "#loss-chart circle.point"))
            round_rows = len(browser.find_elements("css selector", "#rounds-table tr.round"))
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            shot = tmp_path / "dashboard.png"
            assert browser.save_screenshot(str(shot))
            if os.environ.get("P2PTRAIN_DOCS_SCREENSHOT"):  # =FILE: keep a copy of the screenshot there
                browser.save_screenshot(os.environ["P2PTRAIN_DOCS_SCREENSHOT"])
    finally:
        stop_node_server(state, server)

    # Assert
    assert cells == {"stem": "2", "L0.M0": "1", "L0.M1": "1", "L1.M0": "1", "L1.M1": "1"}
    assert sorted(rows) == sorted([a.node.peer_id, b.node.peer_id])
    assert points == 2 and round_rows == 2
    assert errors == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_monitor_shows_a_peer_announcing_an_undialable_address_as_unreachable(swarm):
    # Prepare: two public peers, and a third that announces a loopback port where nothing
    # listens (bound, never listening, so no one else can take it during the test)
    config = swarm_config("mon-probe")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        a = swarm.open(config, "0,0")
        b = swarm.open(config, "1,1", initial_peers=a.maddrs)
        c = swarm.open(config, "0,1", initial_peers=a.maddrs,
                       announce_maddrs=[f"/ip4/127.0.0.1/tcp/{dead.getsockname()[1]}"])
        for n in (a, b, c):
            n.node.start_heartbeat(period_s=10.0)  # keep the records alive however long the test takes
        monitor = p2ptrain("monitor", "--initial-peers", a.maddrs[0], "--run-id", "mon-probe",
                           "--host-maddrs", LOOPBACK, "--port", "0", "--refresh", "1", "--probe-timeout", "3", "--json")
        try:
            started = read_json_line(monitor)
            assert started["event"] == "monitor" and started["url"].startswith("http://127.0.0.1:")

            # Execute: wait for a view in which all three peers were probed
            view = read_json_line(monitor)
            while len([p for p in view["peers"] if p["probe"]]) < 3:
                view = read_json_line(monitor)
            metrics = scrape(started["metrics"])
            state = json.loads(scrape(started["url"] + "api/state"))
            code, out, err = stop(monitor)
        finally:
            if monitor.poll() is None:
                os.killpg(monitor.pid, signal.SIGKILL)
    finally:
        dead.close()

    # Assert
    probes = {p["peer_id"]: (p["reachability"], p["probe"]) for p in view["peers"]}
    assert probes == {a.node.peer_id: ("public", "reachable"), b.node.peer_id: ("public", "reachable"),
                      c.node.peer_id: ("public", "unreachable")}
    assert view["coverage"] == {"stem": 3, "L0.M0": 2, "L0.M1": 1, "L1.M0": 1, "L1.M1": 2}
    assert view["bootstrap"][0]["state"] == "reachable"
    families = parse(metrics)
    probed = {s.labels["result"]: s.value for s in families["p2ptrain_swarm_peers_probed"].samples}
    assert probed == {"reachable": 2, "unreachable": 1}
    assert convention_errors(metrics, GRID_MODULES) == []
    assert state["kind"] == "monitor" and len(state["swarm"]["peers"]) == 3
    assert code == 0, err


def test_a_monitor_whose_dht_process_dies_stops_watching_and_says_why(swarm):
    # Prepare: a run with one peer, watched by a SwarmMonitor on its own (client) DHT
    from p2ptrain.errors import DHTProcessExited
    from p2ptrain.monitor.health import SwarmMonitor
    from p2ptrain.swarm.dht import start_dht
    config = swarm_config("mon-dht-dies")
    a = swarm.open(config, "0,0")
    _, validators = make_validators(config.run.id)
    dht = start_dht(a.maddrs, host_maddrs=[LOOPBACK], client_mode=True, record_validators=validators)
    watcher = SwarmMonitor(dht, config.run.id, refresh_s=0.5, probe=False).start()
    try:
        assert watcher.wait_for_view(60) is not None

        # Execute: the monitor's DHT process is killed
        os.kill(dht.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while watcher.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        watcher.shutdown()
        dht.shutdown()

    # Assert: the watch ended with the error that names the cause (the CLI prints it and
    # exits), instead of logging a failed read every refresh for ever
    assert isinstance(watcher.failure, DHTProcessExited)
    assert "DHT process" in str(watcher.failure)
    assert not watcher._thread.is_alive()
