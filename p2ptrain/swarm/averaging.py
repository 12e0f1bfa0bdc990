"""One hivemind averager per module: all-reduce of pseudo-gradients among the peers whose
paths contain the module, with checks that hivemind itself does not make.

hivemind returns normally when a peer dies mid all-reduce, leaving that peer's slice of
the vector un-averaged (each survivor keeps its own values there), and its reducers add
parts without checking them. So after every round we
  * reject a non-finite average (a peer sent NaN/inf): the round falls back to our own Δ;
  * compare random-projection fingerprints of the averaged Δ with the group (through the
    DHT peer records): a mismatch means a partial all-reduce, and every peer but one
    reference re-syncs the module's global state from that reference;
  * compare round numbers and global-state fingerprints sent through `gather`: a peer
    that is behind or has drifted re-syncs from one that is ahead.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

FINGERPRINT_DIMS = 8
_FINGERPRINT_SEED = 0x5EED


def fingerprint(tensors: Sequence[torch.Tensor], dims: int = FINGERPRINT_DIMS) -> tuple[list[float], float]:
    """Random projections of the concatenated tensors, and their L2 norm.

    Two peers holding the same values (up to wire-compression error) get fingerprints
    within a small fraction of the norm; a slice that differs by a sizeable fraction of
    the vector moves at least one projection by about its own norm.
    """
    projections = torch.zeros(dims, dtype=torch.float64)
    sq = 0.0
    for index, t in enumerate(tensors):
        flat = t.detach().reshape(-1).to(torch.float32)
        gen = torch.Generator().manual_seed(_FINGERPRINT_SEED + index)
        directions = torch.randn(dims, flat.numel(), generator=gen) if flat.numel() <= 1 << 20 else None
        if directions is not None:
            projections += (directions @ flat).double()
        else:  # large tensors: one direction at a time to bound memory
            for j in range(dims):
                projections[j] += float(torch.randn(flat.numel(), generator=gen) @ flat)
        sq += float((flat.double() ** 2).sum())
    return projections.tolist(), math.sqrt(sq)


# Relative fingerprint difference that wire compression alone can cause between peers
# holding "the same" average: each projection moves by about the codec's relative RMS
# error (fp16 ~7e-4 after the two compressions of an all-reduce, blockwise 8-bit ~1.5e-2),
# so these bounds sit at ~7 standard deviations. A slice left un-averaged moves a
# projection by about that slice's share of the vector's norm: far above them.
SYNC_TOLERANCE = {"none": 1e-5, "fp16": 5e-3, "8bit": 1e-1}


def sync_tolerance(compression: str, configured: float) -> float:
    """The configured tolerance, or the codec's own bound when configured is 0 (auto)."""
    return configured if configured > 0 else SYNC_TOLERANCE[compression]


def fingerprint_distance(a: Sequence[float], b: Sequence[float], scale: float) -> float:
    """Largest projection difference as a fraction of the vector's norm (inf if incomparable)."""
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) for x, y in zip(a, b)) / max(scale, 1e-12)


def fingerprints_agree(a: Sequence[float], b: Sequence[float], scale: float, tolerance: float) -> bool:
    """True when two fingerprints differ by at most tolerance × scale in every projection."""
    return fingerprint_distance(a, b, scale) <= tolerance


# Bytes per value on the wire for each codec (hivemind's blockwise 8-bit: one fp32 absmax
# per 4096 values; each part also carries its 256-entry fp32 codebook, 1 KiB, not counted here).
WIRE_BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "8bit": 1.0 + 4.0 / 4096}
MIN_PART_BYTES, MAX_PART_BYTES, PARTS_PER_MODULE = 1 << 10, 512 << 10, 16


def averaging_part_bytes(values: int, compression: str) -> int:
    """Size of the parts an all-reduce cuts a module into: 1/16 of its compressed size, so
    that every reducer of a group of up to 16 gets a share of even a small module (and a
    reducer that dies always leaves a slice the fingerprints can see), within [1 KiB,
    512 KiB]. Measured on loopback, a part costs about 140 bytes of framing (4 KiB parts:
    1.054x the all-reduce bound, 50 KB parts 1.020x); 512 KiB is hivemind's default."""
    payload = values * WIRE_BYTES_PER_VALUE[compression]
    return int(min(max(payload / PARTS_PER_MODULE, MIN_PART_BYTES), MAX_PART_BYTES))


def make_compression(name: str):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression
    return {"none": NoCompression, "fp16": Float16Compression, "8bit": BlockwiseQuantization}[name]()


def _averager_class():
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils.asyncio import aiter_with_timeout
    from hivemind.utils.mpfuture import MPFuture
    from hivemind.utils.streaming import combine_from_streaming

    class ModuleAverager(DecentralizedAverager):
        """A DecentralizedAverager that serves a module's global state and can download it
        from a chosen peer (hivemind's own `load_state_from_peers` picks by priority)."""

        def __init__(self, averaged_tensors, dht, *, state_provider: Callable[[], tuple[Any, list]], **kwargs):
            self._state_provider = state_provider
            super().__init__(averaged_tensors, dht, **kwargs)

        def get_current_state(self):
            metadata, tensors = self._state_provider()
            return metadata, tensors, None

        def download_state_from(self, peers: Sequence[str], timeout: float) -> Optional[tuple[Any, list]]:
            """Try peers in order; (metadata, tensors) from the first that answers, else None."""
            future = MPFuture()
            self._outer_pipe.send(("_download_state_from", [], dict(peers=list(peers), timeout=timeout,
                                                                   future=future)))
            return future.result(timeout=timeout * max(len(peers), 1) + 10)

        async def _download_state_from(self, peers: list, timeout: float, future):
            try:
                for peer_text in peers:
                    peer = PeerID.from_base58(peer_text)
                    if peer == self.peer_id:
                        continue
                    try:
                        result = await asyncio.wait_for(self._download_one(peer, timeout), timeout)
                    except Exception as e:  # a dead or misbehaving peer: try the next one
                        logger.warning("state download from %s failed: %r", peer_text[-8:], e)
                        continue
                    if result is not None:
                        future.set_result(result)
                        return
            finally:
                if not future.done():
                    future.set_result(None)

        async def _download_one(self, peer, timeout: float):
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, parts, tensors = None, [], []
            async for message in aiter_with_timeout(stream, timeout=timeout):
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            return None if metadata is None else (metadata, tensors)

    return ModuleAverager


_CLASS = None


def module_averager_class():
    global _CLASS
    if _CLASS is None:
        from p2ptrain.swarm import hivemind_patches
        hivemind_patches.apply()
        _CLASS = _averager_class()
    return _CLASS
