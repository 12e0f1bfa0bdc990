"""Closed runs: the run's creator invites peers by signing a credential for their peer id.

    p2ptrain join --new-swarm --closed      the creator's run record says the run is closed
    p2ptrain invite PEER_ID --expires 30d   the creator signs {run, peer, expires}
    p2ptrain join --credential FILE         the peer presents it in its signed peer record

Every honest node of a closed run then counts, averages with and downloads from only peers
whose record carries a credential signed by the creator's key for that very peer id, not
expired. The peer id is the one libp2p authenticates on every connection, so a credential
cannot be borrowed by another identity.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import pydantic.v1 as pydantic
from pydantic.v1 import confloat, constr

from p2ptrain.errors import SwarmError

MAX_CREDENTIAL_BYTES = 4096


class Credential(pydantic.BaseModel):
    run: constr(strict=True, max_length=64)
    peer: constr(strict=True, max_length=128)  # the invited peer id
    expires: confloat(strict=True)  # unix time
    issuer: constr(strict=True, max_length=128)  # the run creator's peer id
    signature: constr(strict=True, max_length=2048)  # base64, by the issuer's RSA key

    class Config:
        extra = "forbid"
        allow_inf_nan = False

    def signed_bytes(self) -> bytes:
        return json.dumps({"run": self.run, "peer": self.peer, "expires": self.expires, "issuer": self.issuer},
                          sort_keys=True, separators=(",", ":")).encode()

    def problem(self, run_id: str, peer_id: str, creator: str, creator_key: bytes,
                now: Optional[float] = None) -> Optional[str]:
        """Why this credential does not admit peer_id to the run, or None."""
        from hivemind.utils.crypto import RSAPublicKey
        if self.run != run_id:
            return f"it is for run {self.run!r}"
        if self.peer != peer_id:
            return "it was issued to another peer"
        if self.issuer != creator:
            return "it was not issued by the run's creator"
        if (now if now is not None else time.time()) > self.expires:
            return "it has expired"
        try:
            key = RSAPublicKey.from_bytes(creator_key)
        except Exception:
            return "the creator's key is unreadable"
        if not key.verify(self.signed_bytes(), self.signature.encode()):
            return "its signature is not the creator's"
        return None


def issue(private_key, run_id: str, issuer: str, peer_id: str, lifetime_s: float) -> Credential:
    """A credential for peer_id, signed with the creator's identity key."""
    unsigned = Credential(run=run_id, peer=peer_id, expires=float(time.time() + lifetime_s), issuer=issuer,
                          signature="")
    signature = private_key.sign(unsigned.signed_bytes())
    return unsigned.copy(update={"signature": signature.decode() if isinstance(signature, bytes) else signature})


def parse_credential(text: str, source: str) -> Credential:
    if len(text.encode()) > MAX_CREDENTIAL_BYTES:
        raise SwarmError(f"{source}: too large to be a p2ptrain credential")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise SwarmError(f"{source}: not a p2ptrain credential (not JSON)") from None
    if not isinstance(obj, dict):  # pydantic would turn a list of pairs into a mapping, keys of any type
        raise SwarmError(f"{source}: not a p2ptrain credential (a JSON {type(obj).__name__}, not an object)")
    try:
        return Credential.parse_obj(obj)
    except (pydantic.ValidationError, TypeError, ValueError) as e:
        raise SwarmError(f"{source}: not a p2ptrain credential ({str(e).splitlines()[-1].strip()})") from None


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s' → seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        value, unit = float(text[:-1]), text[-1]
        if unit not in units or value <= 0:
            raise ValueError
    except (ValueError, IndexError):
        raise SwarmError(f"--expires {text!r}: use a number and a unit, e.g. 30d, 12h, 90m") from None
    return value * units[unit]

