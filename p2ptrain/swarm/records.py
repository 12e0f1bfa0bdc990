"""Every DHT key of a run is built here, and every value is schema-checked and signed.

Records live under `<run id>_<field>` with one subkey per writer: the writer's RSA
public key, which is also its libp2p identity (identity.py). Every honest node installs
the same validators, so only a key's owner can write its subkey, and malformed values are
dropped on arrival. On reading, a peer record counts only if the peer id it names is the
peer id of the key that signed it, and a run record only if it comes from the run's
creator (pinned: `--run-id NAME@CREATOR`, remembered in the home after the first join).

    <run>_run    the run state (config + router), published once by the run's creator
    <run>_peers  one status record per live peer: path, round, speed, module fingerprints

A swarm too large for every node to read every record each round splits the peer table
(averaging.peer_buckets = B > 1): a peer's record goes to `<run>_peers_<b>` with b a hash
of its peer id and the round, so each round every node reads one bucket, about 1/B of
the live peers, and a different random sample each round. Because the hash takes the
round, no peer id can be ground to sit in one reader's bucket round after round.
"""

import functools
import hashlib
import logging
import platform
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import pydantic.v1 as pydantic
from pydantic.v1 import StrictBool, StrictFloat, StrictStr, confloat, conint, conlist, constr

from hivemind.dht.schema import BytesWithPublicKey

from p2ptrain import __version__
from p2ptrain.errors import DHTProcessExited
from p2ptrain.run_state import RunState
from p2ptrain.swarm.identity import owner_peer_id, owner_public_key

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DHT_ALIVE_CHECK_S = 1.0  # while waiting for the DHT's answer, check this often that its process lives
PEER_RECORD_TTL_S = 60.0  # a record's lifetime in a swarm of very short rounds (see peer_record_ttl)
RUN_RECORD_TTL_S = 365 * 24 * 3600.0


def heartbeat_period(round_seconds: float) -> float:
    """How long a node goes without publishing its record before its heartbeat does: a round
    and 20 s. Every round publishes, so a node that keeps up with the schedule publishes once
    a round and never beats; a fixed 20 s beat made a round's upkeep grow with its length
    (a 5-minute round paid 15 publishes of ~34 KB each in a 4-peer swarm)."""
    return round_seconds + PEER_RECORD_TTL_S / 3


def peer_record_ttl(round_seconds: float) -> float:
    """A published record's lifetime: two heartbeat periods and 20 s (2 × round + 60 s), so
    one late or lost publish does not drop a live node from the table. A departed node stays
    listed up to that long; it costs a holder one matchmaking window, once (`absent`)."""
    return 2 * heartbeat_period(round_seconds) + PEER_RECORD_TTL_S / 3


# ------------------------------------------------------------------ DHT keys

def run_key(run_id: str) -> str:
    return f"{run_id}_run"


MAX_PEER_BUCKETS = 256


def peers_key(run_id: str, bucket: Optional[int] = None) -> str:
    """The whole peer table, or one bucket of it (averaging.peer_buckets > 1)."""
    return f"{run_id}_peers" if bucket is None else f"{run_id}_peers_{bucket}"


def peer_bucket(peer_id: str, round_: int, buckets: int) -> int:
    """The bucket a peer's record is in, and a reader reads, during a round."""
    digest = hashlib.sha256(f"{peer_id}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % buckets


def averager_prefix(run_id: str, module_id: str) -> str:
    """hivemind group prefix of one module's averager (hivemind forbids '.' in prefixes)."""
    return f"{run_id}_avg_{module_id.replace('.', '_')}"


# ------------------------------------------------------------------ schemas

class _Bounded(pydantic.BaseModel):
    class Config:
        allow_inf_nan = False  # a NaN or inf in a record is malformed, not a number


class RunRecord(_Bounded):
    protocol: conint(ge=0, strict=True)
    fingerprint: constr(strict=True, max_length=128)
    state: constr(strict=True, max_length=4 << 20)  # RunState.to_json()
    created: StrictFloat  # DHT time of creation: the epoch of the run's round schedule
    p2ptrain_version: constr(strict=True, max_length=64)
    closed: StrictBool = False  # only peers holding the creator's credential may take part


class ModuleSync(_Bounded):
    """A holder's claim about one module: at `round`, its global state has this fingerprint."""

    round: conint(ge=0, le=10 ** 9, strict=True)
    fingerprint: conlist(StrictFloat, min_items=8, max_items=8)  # random projections of the global parameters
    norm: confloat(ge=0.0, strict=True)  # their L2 norm
    step: confloat(ge=0.0, strict=True)  # L2 norm of the holder's last outer update (drift yardstick)


# --- monitoring schemas (issue 13) ----------------------------------------------------

# the words of ModuleRound.outcome (swarm/node.py)
ROUND_OUTCOMES = ("ok", "alone", "partial", "split", "healed", "resynced", "rejected", "failed")


class HardwareInfo(_Bounded):
    """What the machine brings: shown by `peers` and the dashboard."""

    cpu: constr(strict=True, max_length=128)  # processor model
    cpu_count: conint(ge=0, le=1_000_000, strict=True)  # logical CPUs
    ram_bytes: conint(ge=0, strict=True)
    gpu: Optional[constr(strict=True, max_length=128)] = None  # CUDA device name, if training on one
    gpu_memory_bytes: Optional[conint(ge=0, strict=True)] = None


class Contribution(_Bounded):
    """What this node has contributed in its current session."""

    tokens: conint(ge=0, strict=True)  # tokens trained on
    rounds: conint(ge=0, strict=True)  # rounds completed
    rounds_averaged: conint(ge=0, strict=True)  # rounds in which at least one module averaged with a peer
    seconds: confloat(ge=0.0, strict=True)  # time since the node started


class SinceInstall(_Bounded):
    """What the node's home has contributed since install (its contribution ledger,
    data/ledger.py), across restarts: `peers` shows who contributed what."""

    tokens: conint(ge=0, le=10 ** 18, strict=True)  # tokens trained on
    rounds: conint(ge=0, le=10 ** 9, strict=True)  # rounds run
    rounds_averaged: conint(ge=0, le=10 ** 9, strict=True)  # of those, averaged with at least one peer
    hours: confloat(ge=0.0, le=10 ** 7, strict=True)  # wall time of those rounds


class ModuleOutcome(_Bounded):
    module: constr(strict=True, max_length=32)
    outcome: constr(strict=True, max_length=16)  # one of ROUND_OUTCOMES
    peers: conint(ge=0, le=1_000_000, strict=True)  # group size, this node included


MONITORING_FIELDS = ("hardware_info", "suspended", "contribution", "last_round")
OPTIONAL_FIELDS = (*MONITORING_FIELDS, "since_install")  # left out of a record that does not set them
# --- end of monitoring schemas --------------------------------------------------------


MAX_MODULES_PER_PATH = 64


class PeerRecord(_Bounded):
    peer_id: constr(strict=True, max_length=128)  # must be the peer id of the key that signed the record
    path: conlist(conint(ge=0, le=4096, strict=True), max_items=MAX_MODULES_PER_PATH)
    round: conint(ge=0, le=10 ** 9, strict=True)
    loss: Optional[StrictFloat]
    tokens_per_s: confloat(ge=0.0, strict=True)
    tokens: conint(ge=0, strict=True)
    version: constr(strict=True, max_length=64)
    hardware: constr(strict=True, max_length=256)
    reachability: constr(strict=True, max_length=16)  # "public" or "client" (behind NAT, dials out through relays)
    maddrs: conlist(constr(strict=True, max_length=256), max_items=16)
    sync: Dict[constr(strict=True, max_length=64), ModuleSync]
    paused: Optional[constr(strict=True, max_length=256)]  # suspend reasons, e.g. "on batteries, user active"
    time: StrictFloat
    credential: Optional[constr(strict=True, max_length=4096)] = None  # closed runs: the creator's invite (JSON)

    @pydantic.validator("sync")
    def _few_modules(cls, value):
        if len(value) > MAX_MODULES_PER_PATH + 1:
            raise ValueError("too many modules")
        return value

    # --- monitoring fields (issue 13) -------------------------------------------------
    # Optional and bounded, so a record from a peer that does not send them still parses
    # (and still passes hivemind's SchemaValidator: see `dict` below). Filled from the
    # node's status() by `status_record_fields`.
    hardware_info: Optional[HardwareInfo] = None
    suspended: conlist(constr(strict=True, max_length=64), max_items=16) = []  # the Suspension's reasons
    contribution: Optional[Contribution] = None
    last_round: conlist(ModuleOutcome, max_items=64) = []  # per module, the node's last round
    since_install: Optional[SinceInstall] = None  # the home's ledger; absent when the node keeps none

    def dict(self, **kwargs):
        """hivemind's SchemaValidator accepts a value only if parsing it changes nothing: a
        record that left out the optional fields must not come back with their defaults
        filled in."""
        out = super().dict(**kwargs)
        for name in OPTIONAL_FIELDS:
            if name not in self.__fields_set__:
                out.pop(name, None)
        return out
    # --- end of monitoring fields -----------------------------------------------------


class _SwarmKeys(pydantic.BaseModel):
    run: Dict[BytesWithPublicKey, Optional[RunRecord]]
    peers: Dict[BytesWithPublicKey, Optional[PeerRecord]]


# The run's DHT keys (prefixed with `<run id>_`): one signed subkey per writer; the peer
# table's buckets (`peers_0` … `peers_255`) hold the same records as `peers`.
SwarmSchema = pydantic.create_model(
    "SwarmSchema", __base__=_SwarmKeys,
    **{f"peers_{b}": (Dict[BytesWithPublicKey, Optional[PeerRecord]], None) for b in range(MAX_PEER_BUCKETS)})


def make_validators(run_ids: Union[str, Sequence[str]], private_key=None):
    """(signature validator, [validators to install in the DHT]) for one or more runs.

    private_key: the node's identity key (identity.Identity), so that its records are
    bound to its peer id; a random key only for observers that publish nothing."""
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
    creator: str  # the creator's peer id: the run's identity
    created: float  # DHT time: the epoch of the round schedule
    version: str
    closed: bool = False
    creator_key: bytes = b""  # the creator's public key (OpenSSH form): checks credentials


def split_run_id(text: str) -> tuple[str, Optional[str]]:
    """`NAME@CREATOR` → (NAME, CREATOR peer id); a bare NAME pins no creator."""
    name, _, creator = text.partition("@")
    return name, (creator or None)


class SwarmRecords:
    """Reads and writes this run's records on the DHT, signed with this node's key."""

    def __init__(self, dht, run_id: str, signer, creator: Optional[str] = None):
        self.dht = dht
        self.run_id = run_id
        self.signer = signer
        self.creator = creator  # pinned run creator (peer id), once known
        self.impersonations = 0  # peer records whose peer_id is not their signer's
        self.closed_run: Optional[PublishedRun] = None  # set for closed runs: records need credentials
        self.uncredentialed = 0  # records refused in a closed run
        self.buckets = 1  # averaging.peer_buckets of the run, once its record is read
        # our record's lifetime, from the run's round length once known: every publish of it
        # must use the same, since the DHT keeps a subkey's latest expiration and refuses an
        # earlier one
        self.record_ttl_s = PEER_RECORD_TTL_S
        # hivemind's DHT takes commands over one pipe with no lock of its own; the
        # heartbeat thread and the round driver both write records
        self._lock = threading.Lock()

    def _store(self, key: str, value: dict, expiration: float) -> bool:
        with self._lock:
            return bool(self._ask(lambda: self.dht.store(key, value, expiration, subkey=self.public_key,
                                                         return_future=True)))

    def _get(self, key: str):
        with self._lock:
            return self._ask(lambda: self.dht.get(key, latest=True, return_future=True))

    def _ask(self, request: Callable):
        """The DHT's answer to a request (a call returning hivemind's future). hivemind's own
        lookups time out, but a DHT process that died (SIGKILL, the out-of-memory killer)
        never answers at all: without this check the node waited for it forever (seen when 32
        peers' processes filled this machine's 24 GiB)."""
        try:
            future = request()
            while True:
                try:
                    return future.result(timeout=DHT_ALIVE_CHECK_S)
                except TimeoutError:
                    if future.done():  # the request itself timed out inside the DHT: that is its answer
                        raise
                    if not self.dht.is_alive():
                        future.cancel()
                        break
        except OSError:  # the pipe to the DHT process is closed: gone, or going
            if self.dht.is_alive():
                raise
        raise DHTProcessExited(
            f"this node's DHT process (pid {self.dht.pid}) has exited (exit code {self.dht.exitcode}: killed, or "
            "out of memory?); the node cannot reach the swarm and stops. Its last checkpoint is kept; starting it "
            "again rejoins the swarm")

    @property
    def public_key(self) -> bytes:
        return self.signer.local_public_key

    # ------------------------------------------------------------- run state

    def publish_run(self, state: RunState, closed: bool = False) -> bool:
        from hivemind.utils.timed_storage import get_dht_time
        record = RunRecord(protocol=PROTOCOL_VERSION, fingerprint=state.fingerprint(), state=state.to_json(),
                           created=float(get_dht_time()), p2ptrain_version=__version__, closed=closed)
        return self._store(run_key(self.run_id), record.dict(), get_dht_time() + RUN_RECORD_TTL_S)

    def run_creators(self) -> dict[str, tuple[RunRecord, bytes]]:
        """Every well-formed run record under this run id: signer's peer id → (record, its key)."""
        found = self._get(run_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return {}
        creators = {}
        for subkey, entry in found.value.items():
            creator = owner_peer_id(subkey)
            try:
                record = RunRecord.parse_obj(entry.value)
            except (pydantic.ValidationError, AttributeError, TypeError, ValueError):
                continue
            if creator is not None:
                creators[creator] = (record, owner_public_key(subkey))
        return creators

    def fetch_run(self) -> Optional[PublishedRun]:
        """The run as published by its creator: the pinned one, else the only one there is.

        A second writer of a run record is ignored whatever it claims: with a pin, records of
        other keys never count; without one, several creators are an error naming them, so
        the user pins the right one instead of us guessing (an earlier `created` is a claim
        anyone can make).
        """
        from p2ptrain.errors import SwarmError
        creators = self.run_creators()
        if self.creator is not None:
            if self.creator not in creators:
                return None
            creator = self.creator
            record, key = creators[creator]
        elif not creators:
            return None
        elif len(creators) > 1:
            names = ", ".join(sorted(creators))
            raise SwarmError(f"run '{self.run_id}' was published by {len(creators)} different keys ({names}): "
                             f"pass --run-id {self.run_id}@CREATOR with the creator you trust")
        else:
            (creator, (record, key)), = creators.items()
        if record.protocol != PROTOCOL_VERSION:
            raise SwarmError(f"run '{self.run_id}' speaks protocol {record.protocol} (p2ptrain "
                             f"{record.p2ptrain_version}); this p2ptrain {__version__} speaks protocol "
                             f"{PROTOCOL_VERSION}: install the run's version to join it")
        state = RunState.from_json(record.state, f"run '{self.run_id}' on the DHT")
        if state.fingerprint() != record.fingerprint:
            raise SwarmError(f"run '{self.run_id}' on the DHT: its run state does not match its own fingerprint")
        self.buckets = state.config.averaging.peer_buckets
        self.record_ttl_s = peer_record_ttl(state.config.averaging.round_seconds)
        return PublishedRun(state, creator, record.created, record.p2ptrain_version, record.closed, key)

    # ------------------------------------------------------------ peer status

    def publish_peer(self, record: PeerRecord, round_: Optional[int] = None) -> bool:
        """Store our record; with a split table, in the buckets of the rounds round_ − 1 and
        round_ (`round_`: the schedule's current round): a node reads the bucket of the round
        it averages or verifies, which has just ended when it publishes that round's
        fingerprints, so a bucket holds about 2 × peers / buckets records."""
        from hivemind.utils.timed_storage import get_dht_time
        expiration = get_dht_time() + self.record_ttl_s  # always the same lifetime: see record_ttl_s
        if self.buckets == 1:
            return self._store(peers_key(self.run_id), record.dict(), expiration)
        now = round_ or 0
        buckets = sorted({peer_bucket(record.peer_id, r, self.buckets) for r in (max(now - 1, 0), now)})
        return all([self._store(peers_key(self.run_id, b), record.dict(), expiration) for b in buckets])

    def fetch_peers(self, round_: Optional[int] = None, reader: Optional[str] = None) -> list[PeerRecord]:
        """Live peers' records (expired ones are gone from the DHT by themselves), each signed
        by the key of the peer it names; a record naming another peer is dropped and counted.

        With a split table (averaging.peer_buckets > 1): the bucket `reader` (a peer id, ours
        by default) reads in `round_`, a sample of about 1/B of the peers; with no round, every
        bucket (the monitoring commands: B reads)."""
        if self.buckets == 1:
            return self._parse_peers(self._get(peers_key(self.run_id)))
        if round_ is not None:
            reader = reader or owner_peer_id(self.public_key)
            return self._parse_peers(self._get(peers_key(self.run_id, peer_bucket(reader, round_, self.buckets))))
        return self._read_buckets(range(self.buckets))

    def fetch_group_members(self, round_: int, reader: str, members: Iterable[str]) -> list[PeerRecord]:
        """The records to check round_'s result against: the reader's bucket for round_ and, with
        a split table, each group member's bucket for round_ + 1 — where the member's record
        of round_'s result is stored (it is written in round_ + 1, or round_ + 2 if late, and
        stored under the buckets of the round it is written in and the one before). The
        reader's own bucket alone can hold a member's record from before round_'s average
        and never its new one (measured: a 12 s wait for fingerprints already published)."""
        if self.buckets == 1:
            return self.fetch_peers()
        buckets = {peer_bucket(reader, round_, self.buckets)}
        buckets |= {peer_bucket(member, round_ + 1, self.buckets) for member in members}
        return self._read_buckets(sorted(buckets))

    def _read_buckets(self, buckets: Iterable[int]) -> list[PeerRecord]:
        """The newest record of each peer found in these buckets of a split table."""
        latest: dict[str, PeerRecord] = {}
        for bucket in buckets:
            for record in self._parse_peers(self._get(peers_key(self.run_id, bucket))):
                if record.peer_id not in latest or record.time > latest[record.peer_id].time:
                    latest[record.peer_id] = record
        return list(latest.values())

    def _parse_peers(self, found) -> list[PeerRecord]:
        if found is None or not isinstance(found.value, dict):
            return []
        peers = []
        for subkey, entry in found.value.items():
            try:
                record = PeerRecord.parse_obj(entry.value)
            except (pydantic.ValidationError, AttributeError, TypeError, ValueError):
                continue
            if owner_peer_id(subkey) != record.peer_id:
                self.impersonations += 1
                logger.warning("ignored a peer record naming …%s, signed by another key", record.peer_id[-8:])
                continue
            if self.closed_run is not None and self.credential_problem(record) is not None:
                self.uncredentialed += 1
                continue
            peers.append(record)
        return peers

    def credential_problem(self, record: PeerRecord) -> Optional[str]:
        """Closed runs: why this record's peer may not take part, or None."""
        from p2ptrain.errors import SwarmError
        from p2ptrain.swarm.credentials import parse_credential
        run = self.closed_run
        if record.peer_id == run.creator:
            return None
        if record.credential is None:
            return "no credential"
        try:
            credential = parse_credential(record.credential, "credential")
        except SwarmError as e:
            return str(e)
        return credential.problem(self.run_id, record.peer_id, run.creator, run.creator_key)


def new_peer_record(**fields) -> PeerRecord:
    defaults = dict(loss=None, tokens_per_s=0.0, tokens=0, version=__version__, hardware=hardware_summary(),
                    reachability="public", maddrs=[], sync={}, paused=None, time=time.time(),
                    hardware_info=hardware_info())
    defaults.update(fields)
    return PeerRecord(**defaults)


# --- monitoring helpers (issue 13) ----------------------------------------------------

@functools.lru_cache(maxsize=1)
def hardware_info() -> HardwareInfo:
    """This machine's CPU, RAM and (if torch sees one) GPU; read once per process."""
    import os
    import psutil
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = gpu_memory = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, gpu_memory = props.name[:128], int(props.total_memory)
    return HardwareInfo(cpu=cpu[:128], cpu_count=int(os.cpu_count() or 0),
                        ram_bytes=int(psutil.virtual_memory().total), gpu=gpu, gpu_memory_bytes=gpu_memory)


def status_record_fields(status: dict) -> dict:
    """The monitoring fields of a peer record, from `SwarmNode.status()`:
    `new_peer_record(..., **status_record_fields(node.status()))`."""
    outcomes = [ModuleOutcome(module=str(m)[:32], outcome=str(o.get("outcome", "ok"))[:16],
                              peers=max(int(o.get("peers", 1)), 0))
                for m, o in list((status.get("last_round") or {}).items())[:64]]
    fields = {
        "suspended": [str(r)[:64] for r in sorted(status.get("suspended") or [])[:16]],
        "contribution": Contribution(tokens=max(int(status.get("tokens", 0)), 0),
                                     rounds=max(int(status.get("rounds_done", 0)), 0),
                                     rounds_averaged=max(int(status.get("rounds_averaged", 0)), 0),
                                     seconds=max(float(status.get("uptime_s", 0.0)), 0.0)),
        "last_round": outcomes,
    }
    ledger = status.get("since_install")
    if ledger:
        fields["since_install"] = SinceInstall(
            tokens=min(max(int(ledger["tokens"]), 0), 10 ** 18),
            rounds=min(max(int(ledger["rounds"]), 0), 10 ** 9),
            rounds_averaged=min(max(int(ledger["rounds_averaged"]), 0), 10 ** 9),
            hours=min(max(float(ledger["hours"]), 0.0), 1e7))
    return fields
# --- end of monitoring helpers --------------------------------------------------------
