"""Property-based tests of every schema a peer's message is parsed with (protocol.py,
records.py, credentials, the run state, checkpoints on disk): any input gives a clean
rejection or a valid message, never an exception the honest node does not expect."""

from __future__ import annotations

import json
import math
import typing

import pydantic.v1 as pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2ptrain.errors import ConfigError, SwarmError
from p2ptrain.run_state import RunState
from p2ptrain.swarm import records
from p2ptrain.swarm.credentials import Credential, parse_credential
from p2ptrain.swarm.protocol import RoundClaim, StateMetadata, parse
from p2ptrain.swarm.records import (Contribution, HardwareInfo, ModuleOutcome, ModuleSync, PeerRecord, RunRecord,
                                    SwarmSchema)
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

# Every record schema of records.py (the DHT's peer and run records and their parts), found
# by type so that a schema added later is fuzzed too
RECORD_MODELS = sorted((m for m in vars(records).values() if isinstance(m, type)
                        and issubclass(m, records._Bounded) and m is not records._Bounded), key=lambda m: m.__name__)


# ------------------------------------------------------------- valid messages, from the schema

def _example_of(tp):
    """A valid value of a pydantic v1 field type: the smallest one its constraints allow."""
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return schema_example(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _example_of(next(a for a in args if a is not type(None)))
    if origin in (list, typing.List):
        return [_example_of(args[0])]
    if origin in (dict, typing.Dict):
        return {_example_of(args[0]): _example_of(args[1])}
    if isinstance(tp, type) and issubclass(tp, pydantic.ConstrainedList):
        count = max(tp.min_items or 0, 1)
        return [_example_of(tp.item_type)] * (min(count, tp.max_items) if tp.max_items is not None else count)
    if isinstance(tp, type) and issubclass(tp, pydantic.ConstrainedStr):
        return "x" * max(tp.min_length or 0, 1)
    if isinstance(tp, type) and issubclass(tp, bool):  # StrictBool
        return True
    if isinstance(tp, type) and issubclass(tp, (int, float)):  # conint / confloat / StrictFloat / int / float
        low = getattr(tp, "ge", None)
        if low is None and getattr(tp, "gt", None) is not None:
            low = tp.gt + 1
        value = max(low if low is not None else 1, 1)
        high = getattr(tp, "le", None)
        value = min(value, high) if high is not None else value
        return float(value) if issubclass(tp, float) else int(value)
    if isinstance(tp, type) and issubclass(tp, str):
        return "x"
    raise TypeError(f"no example for field type {tp!r}: teach _example_of about it")


def schema_example(model) -> dict:
    """A valid message of `model` with every field set (optional ones too, so they are fuzzed)."""
    return {name: _example_of(field.outer_type_) for name, field in model.__fields__.items()}


# meaningful values where a field has them; every other field comes from the schema
HAND_WRITTEN = {
    RoundClaim: {"round": 3, "tokens": 384},
    StateMetadata: {"module": "L0.M0", "round": 2},
    ModuleSync: {"round": 1, "fingerprint": [0.5] * 8, "norm": 1.0, "step": 0.1},
    RunRecord: {"protocol": 1, "fingerprint": "ab" * 32, "state": "{}", "created": 1.0e9,
                "p2ptrain_version": "0.1.0", "closed": False},
    PeerRecord: {"peer_id": "Qm" + "a" * 44, "path": [0, 1], "round": 2, "loss": 2.5, "tokens_per_s": 100.0,
                 "tokens": 1000, "version": "0.1.0", "hardware": "cpu", "reachability": "public",
                 "maddrs": ["/ip4/127.0.0.1/tcp/1"], "paused": None, "time": 1.0e9,
                 "sync": {"stem": {"round": 1, "fingerprint": [0.0] * 8, "norm": 0.0, "step": 0.0}}},
    HardwareInfo: {"cpu": "x86_64", "cpu_count": 2, "ram_bytes": 8 << 30},
    ModuleOutcome: {"module": "L0.M0", "outcome": "ok", "peers": 3},
}
VALID = {model: {**schema_example(model), **HAND_WRITTEN.get(model, {})}
         for model in [RoundClaim, StateMetadata, *RECORD_MODELS]}


def _submodels(model):
    """(field, sub-schema, how a sub-message sits in the field) for each field holding records."""
    for name, field in model.__fields__.items():
        tp = field.outer_type_
        if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
            yield name, tp, lambda v: v
        elif isinstance(tp, type) and issubclass(tp, pydantic.ConstrainedList) \
                and isinstance(tp.item_type, type) and issubclass(tp.item_type, pydantic.BaseModel):
            yield name, tp.item_type, lambda v: [v]
        elif typing.get_origin(tp) in (dict, typing.Dict) and isinstance(typing.get_args(tp)[1], type) \
                and issubclass(typing.get_args(tp)[1], pydantic.BaseModel):
            key = _example_of(typing.get_args(tp)[0])
            yield name, typing.get_args(tp)[1], lambda v, key=key: {key: v}


def mutated(model):
    """A valid message of `model` with one field replaced by anything, dropped, or an extra one
    added — at the top level or inside one of its sub-records."""
    valid = VALID.get(model) or schema_example(model)
    options = [
        st.tuples(st.sampled_from(sorted(valid)), values).map(lambda kv: {**valid, kv[0]: kv[1]}),
        st.sampled_from(sorted(valid)).map(lambda k: {x: v for x, v in valid.items() if x != k}),
        st.tuples(st.text(max_size=12), values).map(lambda kv: {**valid, kv[0]: kv[1]}),
    ]
    for name, sub, place in _submodels(model):
        options.append(st.deferred(lambda sub=sub: mutated(sub)).map(
            lambda v, name=name, place=place: {**valid, name: place(v)}))
    return st.one_of(*options)


def _check_protocol(model, value):
    kind = f"protocol.{model.__name__}"
    try:
        message, why = parse(model, value)
    except Exception:  # noqa: BLE001 - the property under test: parse never raises
        tally.hostile_input(kind, "mishandled")
        raise
    if message is None and isinstance(why, str):
        tally.hostile_input(kind, "rejected")
        return
    # a valid message is within its bounds: it round-trips through the schema
    valid = (why is None and isinstance(message, model) and model.parse_obj(message.dict()) == message
             and all(not isinstance(v, float) or math.isfinite(v) for v in message.dict().values()))
    tally.hostile_input(kind, "accepted" if valid else "mishandled")
    assert valid


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
    kind = f"records.{model.__name__}"
    try:
        message = model.parse_obj(value)
    except RECORD_ERRORS:
        tally.hostile_input(kind, "rejected")
        return
    except Exception:
        tally.hostile_input(kind, "mishandled")
        raise
    # accepted: no NaN or inf anywhere, and it round-trips
    try:
        valid = model.parse_obj(json.loads(json.dumps(message.dict(), allow_nan=False))) == message
    except (ValueError, TypeError):
        valid = False
    tally.hostile_input(kind, "accepted" if valid else "mishandled")
    assert valid


def test_every_record_schema_is_fuzzed_from_a_valid_message_that_sets_every_field():
    assert {HardwareInfo, Contribution, ModuleOutcome, ModuleSync, RunRecord, PeerRecord} <= set(RECORD_MODELS)
    for model in RECORD_MODELS:
        assert set(VALID[model]) == set(model.__fields__), model
        assert model.parse_obj(VALID[model]).__fields_set__ == set(model.__fields__), model


@pytest.mark.parametrize("model", RECORD_MODELS, ids=lambda m: m.__name__)
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
            tally.hostile_input("dht.SwarmSchema", "mishandled")
            raise
        tally.hostile_input("dht.SwarmSchema", "mishandled" if not isinstance(verdict, bool)
                            else "accepted" if verdict else "rejected")
        assert isinstance(verdict, bool)

    check()


def test_credentials_parse_cleanly_from_any_text():
    @SETTINGS
    @given(st.text(max_size=300) | values.map(lambda v: json.dumps(v, default=repr)))
    def check(text):
        try:
            credential = parse_credential(text, "fuzz")
        except SwarmError:
            tally.hostile_input("credentials.Credential", "rejected")
            return
        except Exception:
            tally.hostile_input("credentials.Credential", "mishandled")
            raise
        tally.hostile_input("credentials.Credential",
                            "accepted" if isinstance(credential, Credential) else "mishandled")
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
            tally.hostile_input("run_state.RunState", "rejected")
            return
        except Exception:
            tally.hostile_input("run_state.RunState", "mishandled")
            raise
        tally.hostile_input("run_state.RunState", "accepted")

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
            tally.hostile_input("checkpoint on disk", "mishandled")
            raise
        # the corrupted round 2 is rejected and round 1 loads; round 2 only when the flip
        # changed nothing it reads (a space in the manifest's JSON): then it is still valid
        fell_back = loaded is not None and loaded.round == 1 and torch.equal(loaded.groups["m"]["w"], good["m"]["w"])
        intact = loaded is not None and loaded.round == 2 and torch.equal(loaded.groups["m"]["w"],
                                                                          good["m"]["w"] * 2)
        tally.hostile_input("checkpoint on disk", "rejected" if fell_back else "accepted" if intact
                            else "mishandled")
        assert fell_back or intact

    check()
