"""Every DHT key of a run is built here, and every value is schema-checked and signed.

Records live under `<run id>_<field>` with one subkey per writer: the writer's RSA
public key. Every honest node installs the same validators, so only a key's owner can
write its subkey, and malformed values are dropped on arrival.

    <run>_run    the run state (config + router), published once by the run's creator
    <run>_peers  one status record per live peer: path, round, speed, module sync fingerprints
"""

import logging
import platform
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import pydantic.v1 as pydantic
from pydantic.v1 import StrictBool, StrictFloat, StrictInt, StrictStr, confloat, conint

from hivemind.dht.schema import BytesWithPublicKey

from p2ptrain import __version__
from p2ptrain.run_state import RunState

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
PEER_RECORD_TTL_S = 60.0
RUN_RECORD_TTL_S = 365 * 24 * 3600.0


# ------------------------------------------------------------------ DHT keys

def run_key(run_id: str) -> str:
    return f"{run_id}_run"


def peers_key(run_id: str) -> str:
    return f"{run_id}_peers"


def averager_prefix(run_id: str, module_id: str) -> str:
    """hivemind group prefix of one module's averager (hivemind forbids '.' in prefixes)."""
    return f"{run_id}_avg_{module_id.replace('.', '_')}"


# ------------------------------------------------------------------ schemas

class RunRecord(pydantic.BaseModel):
    protocol: conint(ge=0, strict=True)
    fingerprint: StrictStr
    state: StrictStr  # RunState.to_json()
    created: StrictFloat
    p2ptrain_version: StrictStr


class ModuleSync(pydantic.BaseModel):
    round: conint(ge=0, strict=True)
    fingerprint: List[StrictFloat]  # random projections of the round's averaged pseudo-gradient
    scale: confloat(ge=0.0, strict=True)  # its norm, to compare fingerprints relatively


class PeerRecord(pydantic.BaseModel):
    peer_id: StrictStr
    path: List[conint(ge=0, strict=True)]
    round: conint(ge=0, strict=True)
    loss: Optional[StrictFloat]
    tokens_per_s: confloat(ge=0.0, strict=True)
    tokens: conint(ge=0, strict=True)
    version: StrictStr
    hardware: StrictStr
    reachability: StrictStr  # "public" or "client" (behind NAT, dials out through relays)
    maddrs: List[StrictStr]
    sync: Dict[StrictStr, ModuleSync]
    paused: Optional[StrictStr]
    time: StrictFloat


class SwarmSchema(pydantic.BaseModel):
    """The run's DHT keys (prefixed with `<run id>_`): one signed subkey per writer."""

    run: Dict[BytesWithPublicKey, Optional[RunRecord]]
    peers: Dict[BytesWithPublicKey, Optional[PeerRecord]]


def make_validators(run_ids: Union[str, Sequence[str]], private_key=None):
    """(signature validator, [validators to install in the DHT]) for one or more runs."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator
    from hivemind.utils.crypto import RSAPrivateKey

    signer = RSASignatureValidator(private_key or RSAPrivateKey())
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    schemas = [SchemaValidator(SwarmSchema, allow_extra_keys=True, prefix=run_id) for run_id in run_ids]
    return signer, [*schemas, signer]


def hardware_summary() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    import os
    return f"cpu:{os.cpu_count()}x{platform.machine()}"


@dataclass
class PublishedRun:
    state: RunState
    creator: bytes
    created: float


class SwarmRecords:
    """Reads and writes this run's records on the DHT, signed with this node's key."""

    def __init__(self, dht, run_id: str, signer):
        self.dht = dht
        self.run_id = run_id
        self.signer = signer
        # hivemind's DHT takes commands over one pipe with no lock of its own; the
        # heartbeat thread and the round driver both write records
        self._lock = threading.Lock()

    def _store(self, key: str, value: dict, expiration: float) -> bool:
        with self._lock:
            return bool(self.dht.store(key, value, expiration, subkey=self.public_key))

    def _get(self, key: str):
        with self._lock:
            return self.dht.get(key, latest=True)

    @property
    def public_key(self) -> bytes:
        return self.signer.local_public_key

    # ------------------------------------------------------------- run state

    def publish_run(self, state: RunState) -> bool:
        from hivemind.utils.timed_storage import get_dht_time
        record = RunRecord(protocol=PROTOCOL_VERSION, fingerprint=state.fingerprint(), state=state.to_json(),
                           created=float(get_dht_time()), p2ptrain_version=__version__)
        return self._store(run_key(self.run_id), record.dict(), get_dht_time() + RUN_RECORD_TTL_S)

    def fetch_run(self) -> Optional[PublishedRun]:
        """The run as published by its creator: the earliest record wins a creation race."""
        found = self._get(run_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return None
        candidates = []
        for creator, entry in found.value.items():
            try:
                record = RunRecord.parse_obj(entry.value)
            except (pydantic.ValidationError, AttributeError, TypeError):
                continue
            candidates.append((record.created, bytes(creator), record))
        if not candidates:
            return None
        created, creator, record = min(candidates)
        if record.protocol != PROTOCOL_VERSION:
            from p2ptrain.errors import SwarmError
            raise SwarmError(f"run '{self.run_id}' speaks protocol {record.protocol}, this p2ptrain "
                             f"{__version__} speaks {PROTOCOL_VERSION}: upgrade to {record.p2ptrain_version}")
        state = RunState.from_json(record.state, f"run '{self.run_id}' on the DHT")
        if state.fingerprint() != record.fingerprint:
            from p2ptrain.errors import SwarmError
            raise SwarmError(f"run '{self.run_id}' on the DHT: its run state does not match its own fingerprint")
        return PublishedRun(state, creator, created)

    # ------------------------------------------------------------ peer status

    def publish_peer(self, record: PeerRecord, ttl_s: float = PEER_RECORD_TTL_S) -> bool:
        from hivemind.utils.timed_storage import get_dht_time
        return self._store(peers_key(self.run_id), record.dict(), get_dht_time() + ttl_s)

    def fetch_peers(self) -> list[PeerRecord]:
        """Live peers' records (expired ones are gone from the DHT by themselves)."""
        found = self._get(peers_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return []
        peers = []
        for entry in found.value.values():
            try:
                peers.append(PeerRecord.parse_obj(entry.value))
            except (pydantic.ValidationError, AttributeError, TypeError):
                continue
        return peers


def new_peer_record(**fields) -> PeerRecord:
    defaults = dict(loss=None, tokens_per_s=0.0, tokens=0, version=__version__, hardware=hardware_summary(),
                    reachability="public", maddrs=[], sync={}, paused=None, time=time.time())
    defaults.update(fields)
    return PeerRecord(**defaults)
