"""Property-based tests of every schema a peer's message is parsed with (protocol.py,
records.py, credentials, the run state, checkpoints on disk): any input gives a clean
rejection or a valid message, never an exception the honest node does not expect."""

from __future__ import annotations

import json
import math

import pydantic.v1 as pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ptrain.errors import ConfigError, SwarmError
from p2ptrain.run_state import RunState
from p2ptrain.swarm.credentials import Credential, parse_credential
from p2ptrain.swarm.protocol import RoundClaim, StateMetadata, parse
from p2ptrain.swarm.records import ModuleSync, PeerRecord, RunRecord, SwarmSchema
from tests.faults import tally

pytestmark = [pytest.mark.faults]

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
# what the honest node catches around each parse (records.py fetch_peers / run_creators)
RECORD_ERRORS = (pydantic.ValidationError, AttributeError, TypeError, ValueError)

scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 63, max_value=2 ** 64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.binary(max_size=40))
# what msgpack can carry: nested lists and string-keyed maps of scalars
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=25)

VALID = {
    RoundClaim: {"round": 3, "tokens": 384},
    StateMetadata: {"module": "L0.M0", "round": 2},
    ModuleSync: {"round": 1, "fingerprint": [0.5] * 8, "norm": 1.0, "step": 0.1},
    RunRecord: {"protocol": 1, "fingerprint": "ab" * 32, "state": "{}", "created": 1.0e9,
                "p2ptrain_version": "0.1.0", "closed": False},
    PeerRecord: {"peer_id": "Qm" + "a" * 44, "path": [0, 1], "round": 2, "loss": 2.5, "tokens_per_s": 100.0,
                 "tokens": 1000, "version": "0.1.0", "hardware": "cpu", "reachability": "public",
                 "maddrs": ["/ip4/127.0.0.1/tcp/1"], "paused": None, "time": 1.0e9,
                 "sync": {"stem": {"round": 1, "fingerprint": [0.0] * 8, "norm": 0.0, "step": 0.0}}},
}


def mutated(model):
    """A valid message of `model` with one field replaced by anything, dropped, or an extra one added."""
    valid = VALID[model]
    return st.one_of(
        st.tuples(st.sampled_from(sorted(valid)), values).map(lambda kv: {**valid, kv[0]: kv[1]}),
        st.sampled_from(sorted(valid)).map(lambda k: {x: v for x, v in valid.items() if x != k}),
        st.tuples(st.text(max_size=12), values).map(lambda kv: {**valid, kv[0]: kv[1]}),
    )


def _check_protocol(model, value):
    try:
        message, why = parse(model, value)
    except Exception:  # noqa: BLE001 - the property under test: parse never raises
        tally.bad_input(f"protocol.{model.__name__}", False)
        raise
    clean = (message is None and isinstance(why, str)) or (why is None and isinstance(message, model))
    if message is not None:  # a valid message is within its bounds: it round-trips through the schema
        assert model.parse_obj(message.dict()) == message
        assert all(not isinstance(v, float) or math.isfinite(v) for v in message.dict().values())
    tally.bad_input(f"protocol.{model.__name__}", clean)
    assert clean


@pytest.mark.parametrize("model", [RoundClaim, StateMetadata], ids=lambda m: m.__name__)
def test_protocol_messages_parse_cleanly_from_any_value(model):
    @SETTINGS
    @given(st.one_of(values, mutated(model)))
    def check(value):
        _check_protocol(model, value)

    check()
    assert parse(model, VALID[model])[0] is not None  # and the valid message is accepted


def test_gathered_bytes_decode_and_parse_cleanly():
    """What the averager does with each member's raw `gather` bytes: msgpack, then the schema."""
    from hivemind.utils.serializer import MSGPackSerializer

    @SETTINGS
    @given(st.binary(max_size=200) | values.map(lambda v: MSGPackSerializer.dumps(v)))
    def check(raw):
        try:
            value = MSGPackSerializer.loads(raw)
        except Exception:  # averaging.py: undecodable → None, which parse rejects
            value = None
        _check_protocol(RoundClaim, value)

    check()


def _check_record(model, value):
    try:
        message = model.parse_obj(value)
    except RECORD_ERRORS:
        tally.bad_input(f"records.{model.__name__}", True)
        return
    except Exception:
        tally.bad_input(f"records.{model.__name__}", False)
        raise
    # accepted: no NaN or inf anywhere, and it round-trips
    assert model.parse_obj(json.loads(json.dumps(message.dict(), allow_nan=False))) == message
    tally.bad_input(f"records.{model.__name__}", True)


@pytest.mark.parametrize("model", [ModuleSync, RunRecord, PeerRecord], ids=lambda m: m.__name__)
def test_dht_records_parse_cleanly_from_any_value(model):
    @SETTINGS
    @given(st.one_of(values, mutated(model)))
    def check(value):
        _check_record(model, value)

    check()
    assert model.parse_obj(VALID[model]) is not None


def test_the_dht_schema_validator_answers_any_bytes_with_a_verdict():
    """hivemind's SchemaValidator with our SwarmSchema sees raw record bytes from any peer."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.schema import SchemaValidator
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    validator = SchemaValidator(SwarmSchema, allow_extra_keys=True, prefix="fuzz")
    key = DHTID.generate(source="fuzz_peers").to_bytes()

    @SETTINGS
    @given(st.binary(max_size=200) | values.map(MSGPackSerializer.dumps)
           | mutated(PeerRecord).map(MSGPackSerializer.dumps))
    def check(raw):
        record = DHTRecord(key=key, subkey=MSGPackSerializer.dumps(b"[owner:x]"), value=raw, expiration_time=1e10)
        try:
            verdict = validator.validate(record)
        except Exception:
            tally.bad_input("dht.SwarmSchema", False)
            raise
        tally.bad_input("dht.SwarmSchema", isinstance(verdict, bool))
        assert isinstance(verdict, bool)

    check()


def test_credentials_parse_cleanly_from_any_text():
    @SETTINGS
    @given(st.text(max_size=300) | values.map(lambda v: json.dumps(v, default=repr)))
    def check(text):
        try:
            credential = parse_credential(text, "fuzz")
        except SwarmError:
            tally.bad_input("credentials.Credential", True)
            return
        except Exception:
            tally.bad_input("credentials.Credential", False)
            raise
        tally.bad_input("credentials.Credential", isinstance(credential, Credential))
        assert isinstance(credential, Credential)

    check()


def test_run_states_parse_cleanly_from_any_text():
    """A run record's `state` field: any text is a run state or a ConfigError."""
    @SETTINGS
    @given(st.text(max_size=300) | values.map(lambda v: json.dumps(v, default=repr))
           | values.map(lambda v: json.dumps({"format": 1, "config": v, "router": v}, default=repr)))
    def check(text):
        try:
            RunState.from_json(text, "fuzz")
        except ConfigError:
            tally.bad_input("run_state.RunState", True)
            return
        except Exception:
            tally.bad_input("run_state.RunState", False)
            raise
        tally.bad_input("run_state.RunState", True)

    check()


def test_checkpoints_with_flipped_or_truncated_bytes_fall_back_to_the_last_good_round(fault, tmp_path_factory):
    """A corrupted newest checkpoint is never loaded: the store answers the previous round."""
    from p2ptrain.train.checkpoint import CheckpointStore

    @SETTINGS
    @given(st.integers(min_value=0, max_value=10 ** 9), st.integers(min_value=0, max_value=7), st.booleans())
    def check(position, bit, truncate):
        root = tmp_path_factory.mktemp("ckpt")
        store = CheckpointStore(root)
        good = {"m": {"w": torch.arange(64, dtype=torch.float32)}}
        store.save(1, good, {"round": 1})
        store.save(2, {"m": {"w": torch.arange(64, dtype=torch.float32) * 2}}, {"round": 2})
        files = sorted(p for p in store.directory(2).iterdir() if p.is_file())
        victim = files[position % len(files)]
        data = bytearray(victim.read_bytes())
        if truncate:
            data = data[: position % max(len(data), 1)]
        else:
            data[position % len(data)] ^= 1 << bit
        victim.write_bytes(bytes(data))
        try:
            loaded = store.load_latest()
        except Exception:
            tally.bad_input("checkpoint on disk", False)
            raise
        # round 2 only when the flip changed nothing it reads (a space in the manifest's JSON)
        ok = loaded is not None and (
            (loaded.round == 1 and torch.equal(loaded.groups["m"]["w"], good["m"]["w"]))
            or (loaded.round == 2 and torch.equal(loaded.groups["m"]["w"], good["m"]["w"] * 2)))
        tally.bad_input("checkpoint on disk", ok)
        assert ok

    check()
