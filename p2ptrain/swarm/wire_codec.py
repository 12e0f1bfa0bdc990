"""4-bit NormalFloat (NF4) for pseudo-gradients on the wire, beside hivemind's own codecs.

hivemind 1.1.12 picks a part's decoder by `runtime_pb2.CompressionType`, a closed enum with
no 4-bit entry. The field is a proto3 enum, so a number outside it crosses the wire intact;
`NF4_WIRE_TYPE` is ours, and `serialize_part` / `deserialize_part` hand every other number
to hivemind. A part in NF4 is a `runtime_pb2.Tensor` whose buffer holds one float32 absmax
per block of 64 values, then two 4-bit level indices per byte (high nibble first):
0.5625 bytes a value, against 2 for fp16 and 1.001 for hivemind's blockwise 8-bit. The
levels are QLoRA's NormalFloat ones (bitsandbytes' `quant_type="nf4"`); coding them here
in torch keeps the format ours, the same on every peer whatever bitsandbytes build it has.

An NF4 all-reduce returns each averaged slice as the average itself, not as a delta from
the sender's own part as hivemind does (see `returns_averages`). With deltas each holder
ends at its own part plus a rounded difference, so two holders of a module end apart by
the codec's error, which for 4 bits is 0.13 of the pseudo-gradient (bench_compression);
with the average every holder adopts the same decoded values and the copies stay equal.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

NF4_WIRE_TYPE = 64  # outside hivemind's CompressionType (0-5), with room for its additions
NF4_BLOCK = 64  # values per absmax: QLoRA's block size (bench_outer_codecs measured loss with it)
NF4_BYTES_PER_VALUE = 0.5 + 4.0 / NF4_BLOCK

# QLoRA's NormalFloat levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def nf4_payload_bytes(values: int) -> int:
    """Bytes of the buffer that carries `values` values."""
    return 4 * math.ceil(values / NF4_BLOCK) + math.ceil(values / 2)


def nf4_encode(values: torch.Tensor) -> bytes:
    """The buffer for a float tensor's values (laid end to end)."""
    flat = values.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = torch.zeros(math.ceil(n / NF4_BLOCK) * NF4_BLOCK)
    blocks[:n] = flat
    blocks = blocks.view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    indices = torch.bucketize(scaled.reshape(-1)[:n], _MIDPOINTS).to(torch.uint8)
    if n % 2:
        indices = torch.cat([indices, indices.new_zeros(1)])
    packed = (indices[0::2] << 4) | indices[1::2]
    return absmax.numpy().tobytes() + packed.numpy().tobytes()


def nf4_decode(buffer: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of `shape` a buffer carries; ValueError for a buffer that cannot be
    one (a stranger's message: checked before anything is allocated from it)."""
    if any(d < 0 for d in shape):
        raise ValueError(f"a negative dimension in shape {tuple(shape)}")
    n = math.prod(shape)
    if len(buffer) != nf4_payload_bytes(n):
        raise ValueError(f"{len(buffer)} bytes for {n} values in 4-bit NF4, expected {nf4_payload_bytes(n)}")
    n_blocks = math.ceil(n / NF4_BLOCK)
    absmax = torch.from_numpy(np.frombuffer(buffer, dtype=np.float32, count=n_blocks).copy())
    if not torch.isfinite(absmax).all() or (absmax < 0).any():
        raise ValueError("a block scale that is negative or not finite")
    packed = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, offset=4 * n_blocks).copy())
    indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    scales = absmax.repeat_interleave(NF4_BLOCK)[:n]
    return (NF4_LEVELS[indices] * scales).reshape(shape)


def nf4_roundtrip(values: torch.Tensor) -> torch.Tensor:
    """What the receiver of `values` in NF4 gets."""
    return nf4_decode(nf4_encode(values), tuple(values.shape))


@functools.cache
def nf4_compression():
    """hivemind's codec interface (what an averager's tensor_part_container calls) for NF4."""
    from hivemind.compression import CompressionBase
    from hivemind.proto import runtime_pb2

    class NF4Compression(CompressionBase):
        compression_type = NF4_WIRE_TYPE

        def compress(self, tensor: torch.Tensor, info=None, allow_inplace: bool = False):
            return runtime_pb2.Tensor(compression=NF4_WIRE_TYPE, buffer=nf4_encode(tensor), size=tensor.shape,
                                      dtype="float32", requires_grad=False)

        def extract(self, serialized_tensor) -> torch.Tensor:
            if serialized_tensor.dtype != "float32":
                raise ValueError(f"4-bit NF4 carries float32 values, not {serialized_tensor.dtype!r}")
            return nf4_decode(serialized_tensor.buffer, tuple(serialized_tensor.size))

        def estimate_compression_ratio(self, info) -> float:
            return NF4_BYTES_PER_VALUE / 4.0

        def __repr__(self) -> str:
            return "p2ptrain.NF4Compression()"

    return NF4Compression()


def returns_averages(compression_type: int) -> bool:
    """Whether a reducer answers parts sent in this codec with the averaged slice itself
    (NF4), rather than with its difference from the sender's part (hivemind's codecs)."""
    return compression_type == NF4_WIRE_TYPE


def serialize_part(tensor: torch.Tensor, compression_type: int):
    """hivemind's serialize_torch_tensor, with NF4 beside its own codecs."""
    if compression_type == NF4_WIRE_TYPE:
        return nf4_compression().compress(tensor)
    from hivemind.compression import serialize_torch_tensor
    return serialize_torch_tensor(tensor, compression_type)


def deserialize_part(serialized_tensor) -> torch.Tensor:
    """hivemind's deserialize_torch_tensor, with NF4 beside its own codecs; a codec number
    neither knows raises ValueError."""
    if serialized_tensor.compression == NF4_WIRE_TYPE:
        return nf4_compression().extract(serialized_tensor)
    from hivemind.compression import deserialize_torch_tensor
    return deserialize_torch_tensor(serialized_tensor)
