"""Monitoring without a swarm: record schema evolution, the swarm view, the dashboard
server's routes (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.timed_storage import get_dht_time
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from p2ptrain.model.grid import Grid
from p2ptrain.monitor.metrics import reason_label
from p2ptrain.monitor.swarm_view import ProbeResult, build_view, format_view
from p2ptrain.monitor.web import DashboardServer, json_safe
from p2ptrain.swarm.records import (MAX_PEER_BUCKETS, MONITORING_FIELDS, ModuleOutcome, SinceInstall, make_validators,
                                    new_peer_record, peer_bucket, peers_key, status_record_fields)

RUN = "unit-monitor"


def dht_record(signer, value: dict, key: str | None = None) -> DHTRecord:
    return DHTRecord(key=DHTID.generate(source=key or peers_key(RUN)).to_bytes(),
                     subkey=DHTProtocol.serializer.dumps(signer.local_public_key),
                     value=DHTProtocol.serializer.dumps(value), expiration_time=get_dht_time() + 60)


def test_peer_records_with_or_without_the_monitoring_fields_pass_the_dht_schema_check():
    # Prepare: the schema validator every node installs
    signer, validators = make_validators(RUN)
    schema = validators[0]
    new = new_peer_record(peer_id="A", path=[0, 1], round=3, **status_record_fields(
        {"suspended": ["on batteries"], "tokens": 96, "rounds_done": 1, "uptime_s": 3.0,
         "last_round": {"stem": {"peers": 3, "outcome": "ok"}}})).dict()
    old = {k: v for k, v in new.items() if k not in MONITORING_FIELDS}  # what a peer before issue 13 sends

    # Execute / Assert: both land; oversized monitoring fields are refused
    assert schema.validate(dht_record(signer, new))
    assert schema.validate(dht_record(signer, old))
    assert set(MONITORING_FIELDS) <= set(new) and not set(MONITORING_FIELDS) & set(old)
    assert not schema.validate(dht_record(signer, dict(new, suspended=[f"reason {i}" for i in range(17)])))
    assert not schema.validate(dht_record(signer, dict(new, suspended=["x" * 65])))
    assert not schema.validate(dht_record(signer, dict(new, last_round=[
        {"module": f"L0.M{i}", "outcome": "ok", "peers": 1} for i in range(65)])))
    assert not schema.validate(dht_record(signer, dict(new, hardware_info=dict(new["hardware_info"], cpu_count=2.0))))


def test_since_install_totals_are_optional_and_schema_checked_in_the_signed_record():
    # Prepare: a node with a ledger, and the same record as a node without one sends it
    signer, validators = make_validators(RUN)
    schema = validators[0]
    status = {"tokens": 96, "rounds_done": 1, "uptime_s": 3.0,
              "since_install": {"tokens": 5_000_000, "rounds": 120, "rounds_averaged": 97, "hours": 12.5}}
    with_ledger = new_peer_record(peer_id="A", path=[0, 1], round=3, **status_record_fields(status)).dict()
    without = {k: v for k, v in with_ledger.items() if k != "since_install"}

    # Execute / Assert: both land, and parse back to what was sent
    assert with_ledger["since_install"] == {"tokens": 5_000_000, "rounds": 120, "rounds_averaged": 97, "hours": 12.5}
    assert schema.validate(dht_record(signer, with_ledger))
    assert schema.validate(dht_record(signer, without))
    assert "since_install" not in new_peer_record(peer_id="A", path=[0, 1], round=3,
                                                  **status_record_fields(dict(status, since_install=None))).dict()
    # Assert: a wrong type, a negative or an absurd number is refused
    for bad in ({"rounds": 120.0}, {"tokens": -1}, {"rounds_averaged": 10 ** 10}, {"hours": float("nan")},
                {"hours": 1e9}):
        assert not schema.validate(dht_record(signer, dict(with_ledger, since_install={
            **with_ledger["since_install"], **bad}))), bad


def test_status_record_fields_carry_a_nodes_status_in_bounded_form():
    status = {"suspended": ["user active", "on batteries"], "tokens": 1536, "rounds_done": 4, "uptime_s": 61.5,
              "last_round": {"stem": {"peers": 3, "outcome": "ok"}, "L0.M1": {"peers": 1, "outcome": "alone"}}}

    fields = status_record_fields(status)

    assert fields["suspended"] == ["on batteries", "user active"]
    assert fields["contribution"].dict() == {"tokens": 1536, "rounds": 4, "rounds_averaged": 0, "seconds": 61.5}
    assert [(e.module, e.outcome, e.peers) for e in fields["last_round"]] == [("stem", "ok", 3), ("L0.M1", "alone", 1)]
    record = new_peer_record(peer_id="A", path=[1, 0], round=4, **fields)
    assert record.suspended == ["on batteries", "user active"]


def test_the_swarm_view_counts_coverage_speed_outcomes_and_probes():
    # Prepare: a 2×2 grid, three live peers (one behind a relay, one suspended), a lingering
    # older record of a restarted peer, and a probe that could not dial peer B
    grid = Grid((2, 2))
    t = 1000.0
    records = [
        new_peer_record(peer_id="peerA", path=[0, 0], round=5, tokens_per_s=100.0, loss=2.5, time=t - 30,
                        last_round=[ModuleOutcome(module="stem", outcome="ok", peers=3),
                                    ModuleOutcome(module="L0.M0", outcome="alone", peers=1)]),
        new_peer_record(peer_id="peerA", path=[0, 0], round=2, tokens_per_s=999.0, time=t - 50),  # older
        new_peer_record(peer_id="peerB", path=[0, 1], round=5, tokens_per_s=50.0, time=t - 10,
                        last_round=[ModuleOutcome(module="stem", outcome="partial", peers=2)]),
        new_peer_record(peer_id="peerC", path=[0, 1], round=4, tokens_per_s=70.0, time=t - 5, reachability="client",
                        maddrs=["/ip4/127.0.0.1/tcp/1/p2p/R/p2p-circuit/p2p/peerC"],
                        suspended=["need disk space - check preferences", "user request"],
                        since_install=SinceInstall(tokens=1_234_567, rounds=42, rounds_averaged=40, hours=3.14)),
    ]
    probes = {"peerB": ProbeResult("peerB", False, 5.0, t, "connection refused")}

    # Execute
    view = build_view(RUN, grid, records, probes=probes, now=t)

    # Assert
    assert [(p.peer_id, p.path, p.round) for p in view.peers] == [("peerA", "0,0", 5), ("peerB", "0,1", 5),
                                                                  ("peerC", "0,1", 4)]
    assert view.coverage == {"stem": 3, "L0.M0": 3, "L0.M1": 0, "L1.M0": 1, "L1.M1": 2}
    assert view.uncovered == ["L0.M1"]
    assert view.tokens_per_s == 150.0  # the suspended peer's speed does not count
    assert view.outcomes == {"ok": 1, "alone": 1, "partial": 1, "split": 0, "healed": 0, "resynced": 0, "rejected": 0,
                             "failed": 0}
    assert view.outcomes_from == 2
    by_id = {p.peer_id: p for p in view.peers}
    assert [by_id[p].reachability for p in ("peerA", "peerB", "peerC")] == ["public", "public", "relay"]
    assert [by_id[p].probe for p in ("peerA", "peerB", "peerC")] == [None, "unreachable", None]
    assert by_id["peerC"].suspended == ["need disk space - check preferences", "user request"]
    assert by_id["peerA"].age_s == 30.0
    assert by_id["peerC"].since_install == {"tokens": 1_234_567, "rounds": 42, "rounds_averaged": 40, "hours": 3.14}
    assert by_id["peerA"].since_install is None  # its record carries no ledger
    assert view.to_dict()["peers"][2]["since_install"]["rounds_averaged"] == 40  # `peers --json`
    text = format_view(view).splitlines()
    rows = {line.split()[0]: line for line in text[2:5]}
    assert text[0] == "3 live peers of run unit-monitor"
    assert "public:NO" in rows["…peerB"] and rows["…peerB"].split()[7] == "training"
    assert rows["…peerC"].split()[7] == "suspended"
    # Assert: a suspended peer's reasons in full, under the table, like BOINC
    assert text[5] == "…peerC suspended — need disk space - check preferences, user request"
    # Assert: who contributed what since install, for the peers whose records say
    contributed = text[text.index("contributed since install:") + 1:][:2]
    assert contributed[0].split() == ["peer", "tokens", "rounds", "averaged", "hours"]
    assert contributed[1].split() == ["…peerC", "1,234,567", "42", "40", "3.1"]
    assert any("uncovered: L0.M1" in line for line in text)


def test_free_text_becomes_bounded_label_values():
    assert reason_label("all-reduce part refused by our reducer") == "all_reduce_part_refused_by_our_reducer"
    assert reason_label("On batteries") == "on_batteries"
    assert reason_label("x" * 100) == "x" * 48
    assert json_safe({"a": float("nan"), "b": [float("inf"), 1.5]}) == {"a": None, "b": [None, 1.5]}


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_the_dashboard_server_serves_the_page_metrics_and_state_on_loopback():
    # Prepare
    registry = CollectorRegistry()
    Counter("p2ptrain_example", "An example counter.", registry=registry).inc(3)
    server = DashboardServer(lambda: {"kind": "node", "loss": float("nan")}, registry).start()
    try:
        # Execute
        page = get(server.url)
        script = get(server.url + "static/dashboard.js")
        metrics = get(server.url + "metrics")
        state = get(server.url + "api/state")
        missing = get(server.url + "static/../../setup.cfg")
    finally:
        server.shutdown()

    # Assert: loopback only by default; the page has no outside resources
    assert server.host == "127.0.0.1"
    assert page[0] == 200 and page[1].startswith("text/html") and b'id="grid"' in page[2]
    links = re.findall(rb'(?:src|href)="([^"]*)"', page[2]) + re.findall(rb'fetch\("([^"]*)"', script[2])
    assert links and all(link.startswith((b"/", b"data:")) for link in links)  # nothing from outside this server
    assert script[0] == 200 and script[1].startswith("text/javascript")
    families = {f.name: f for f in text_string_to_metric_families(metrics[2].decode())}
    assert families["p2ptrain_example"].samples[0].value == 3.0
    assert state[0] == 200 and json.loads(state[2]) == {"kind": "node", "loss": None}
    assert missing[0] == 404


def test_a_split_peer_table_keeps_the_peer_schema_in_every_bucket():
    # Prepare: averaging.peer_buckets > 1 stores peer records under <run>_peers_<b>
    signer, validators = make_validators(RUN)
    schema = validators[0]
    record = new_peer_record(peer_id="A", path=[0, 1], round=3).dict()

    # Execute / Assert: a record lands in any bucket; junk is refused there as in the whole table
    for bucket in (0, 17, MAX_PEER_BUCKETS - 1):
        assert schema.validate(dht_record(signer, record, key=peers_key(RUN, bucket)))
        assert not schema.validate(dht_record(signer, dict(record, round=-1), key=peers_key(RUN, bucket)))


def test_peer_buckets_are_a_different_random_sample_each_round():
    # Prepare
    peers = [f"Qm{i:040d}" for i in range(4000)]

    # Execute
    round_7 = [peer_bucket(p, 7, 16) for p in peers]
    round_8 = [peer_bucket(p, 8, 16) for p in peers]

    # Assert: stable within a round, about 1/16 of the peers per bucket, reshuffled next round
    assert round_7 == [peer_bucket(p, 7, 16) for p in peers]
    assert all(150 < round_7.count(b) < 350 for b in range(16))
    same = sum(a == b for a, b in zip(round_7, round_8))
    assert same < 2 * len(peers) / 16
    assert {peer_bucket(p, 7, 1) for p in peers} == {0}
