"""A node's identity: one RSA key that is both its libp2p identity (its peer id is the hash
of the public key) and the key that signs its DHT records.

Using one key for both is what binds a record to a peer: a record is stored under the
signer's public key (hivemind's RSASignatureValidator), and we accept it only if the
`peer_id` it names is the peer id of that very key. Nobody can then publish a record in
another peer's name, and the peer id that libp2p authenticates on every connection (the
members of an all-reduce group, the server of a state download) is the same one the
records speak for.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Optional

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")


def create_identity(path: Path) -> None:
    """Write a new libp2p RSA identity key (mode 0400), as hivemind's p2pd reads it."""
    from hivemind.p2p import P2P
    path.parent.mkdir(parents=True, exist_ok=True)
    P2P.generate_identity(str(path))


def load_identity(path: Path):
    """The RSAPrivateKey stored in a libp2p identity file."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    data = Path(path).read_bytes()
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
        if message.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = serialization.load_der_private_key(message.data, password=None)
    except Exception as e:
        from p2ptrain.errors import SwarmError
        raise SwarmError(f"{path}: not a libp2p RSA identity key ({e}); move it away to get a new one") from None
    return key


def peer_id_of_public_key(ssh_public_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form."""
    import base58
    import multihash
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2

    key = serialization.load_ssh_public_key(ssh_public_key)
    der = key.public_bytes(encoding=serialization.Encoding.DER,
                           format=serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def owner_public_key(subkey: bytes) -> Optional[bytes]:
    """The OpenSSH public key a DHT subkey is protected with (`[owner:<ssh key>]`), or None."""
    if not isinstance(subkey, bytes):
        return None
    found = _OWNER_RE.findall(subkey)
    return found[0] if len(found) == 1 else None


def owner_peer_id(subkey: bytes) -> Optional[str]:
    """The peer id of the key a DHT subkey is protected with (`[owner:<ssh key>]`), or None."""
    if not isinstance(subkey, bytes):
        return None
    found = _OWNER_RE.findall(subkey)
    if len(found) != 1:
        return None
    try:
        return peer_id_of_public_key(found[0])
    except Exception:  # not a valid RSA key: the record cannot be bound to anyone
        return None


class Identity:
    """The key file a node runs with: a persistent one, or a throw-away one for this run."""

    def __init__(self, path: Optional[Path]):
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="p2ptrain-id-")
            path = Path(self._tmp.name) / "identity.key"
        self.path = Path(path)
        self.fresh = not self.path.exists()
        if self.fresh:
            create_identity(self.path)
        self.private_key = load_identity(self.path)

    def discard_temporary(self) -> None:
        """p2pd has read a throw-away key once it started: remove it from disk."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

