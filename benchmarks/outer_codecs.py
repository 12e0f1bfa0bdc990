"""Pseudo-gradient codecs for measuring what stronger compression than 8-bit costs in loss
(issue 16 B: "stronger compression with error feedback where it holds loss (4-bit, top-k as
in SparseLoCo), measured on real pseudo-gradients").

Each codec turns a flat float32 pseudo-gradient into what a peer would put on the wire and
back: `roundtrip(flat) -> (decoded, wire_bytes)`. The byte counts are the payload a codec
needs (values, indices, per-block scales), without hivemind's message framing.

- `HivemindCodec`: the swarm's own codecs (`p2ptrain.swarm.averaging.make_compression`:
  fp16, hivemind's blockwise 8-bit), through hivemind's serializer, so the bytes are real.
- `NF4Codec`: bitsandbytes' 4-bit NormalFloat quantization with one absmax per block of 64
  values (`bitsandbytes.functional.quantize_4bit`, the QLoRA format): 4 bits a value plus a
  float32 scale per block, 0.5625 bytes a value.
- `TopKCodec`: per chunk of 4,096 values, the k largest magnitudes (SparseLoCo's chunked
  top-k), each as a float16 value and a 16-bit index in its chunk: 4 bytes per kept value.
- `ErrorFeedback`: wraps any codec with one residual per (worker, module): a worker sends
  C(βe + Δ) and keeps e ← βe + Δ − C(βe + Δ), so what a round leaves out is sent later
  (Seide et al. 2014; Karimireddy et al. 2019). β = 1 is classic error feedback; SparseLoCo
  (Sarfi et al. 2025, arXiv 2508.15706) decays it (β < 1) and drops the outer momentum,
  the residual standing in for it.
"""

from __future__ import annotations

import math
from typing import Hashable, Protocol

import torch


class Codec(Protocol):
    name: str

    def roundtrip(self, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(what the receiver decodes, payload bytes on the wire)."""


class NoCodec:
    name = "fp32 (exact)"

    def roundtrip(self, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        return flat.clone(), 4 * flat.numel()


class HivemindCodec:
    """One of the swarm's wire codecs, through hivemind's own serializer."""

    def __init__(self, compression: str):
        from p2ptrain.swarm.averaging import make_compression
        self.name = {"fp16": "fp16 (hivemind)", "8bit": "8-bit blockwise (hivemind)"}.get(compression, compression)
        self.codec = make_compression(compression)

    def roundtrip(self, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        from hivemind.compression import deserialize_torch_tensor
        from hivemind.compression.base import CompressionInfo
        message = self.codec.compress(flat, CompressionInfo.from_tensor(flat))
        payload = len(message.buffer)
        return deserialize_torch_tensor(message).reshape(flat.shape), payload


class NF4Codec:
    """bitsandbytes' 4-bit NormalFloat with an absmax per block of `blocksize` values."""

    def __init__(self, blocksize: int = 64):
        self.blocksize = blocksize
        self.name = f"4-bit NF4, blocks of {blocksize}"

    def roundtrip(self, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        import bitsandbytes.functional as bnbf
        packed, state = bnbf.quantize_4bit(flat.contiguous(), blocksize=self.blocksize, quant_type="nf4")
        decoded = bnbf.dequantize_4bit(packed, state).reshape(flat.shape).to(flat.dtype)
        return decoded, packed.numel() * packed.element_size() + 4 * state.absmax.numel()


class WireNF4Codec:
    """p2ptrain's own 4-bit wire codec (swarm/wire_codec.py: bitsandbytes' NF4 values, blocks of
    64), used on both legs of the all-reduce by the caller."""

    name = "4-bit NF4 on the wire (averaging.compression = 4bit), both legs"

    def roundtrip(self, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        from p2ptrain.swarm.wire_codec import nf4_payload_bytes, nf4_roundtrip
        return nf4_roundtrip(flat), nf4_payload_bytes(flat.numel())


class TopKCodec:
    """The k = ⌈fraction × chunk⌉ largest |values| of every chunk, as (fp16 value, uint16 index)."""

    def __init__(self, fraction: float, chunk: int = 4096):
        assert 0 < fraction <= 1 and chunk <= 65_536, "indices are 16-bit within a chunk"
        self.fraction, self.chunk = fraction, chunk
        self.name = f"top-k 1/{round(1 / fraction)}"

    def roundtrip(self, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        n = flat.numel()
        chunks = math.ceil(n / self.chunk)
        padded = torch.zeros(chunks * self.chunk, dtype=flat.dtype)
        padded[:n] = flat
        rows = padded.view(chunks, self.chunk)
        k = max(1, math.ceil(self.fraction * self.chunk))
        index = rows.abs().topk(k, dim=1).indices
        kept = rows.gather(1, index).half().float()  # sent as float16
        decoded = torch.zeros_like(rows).scatter_(1, index, kept).view(-1)[:n].clone()
        return decoded, chunks * k * (2 + 2)


class ErrorFeedback:
    """A codec whose workers each keep the part of Δ + e their message left out, per module."""

    def __init__(self, codec: Codec, decay: float = 1.0):
        self.codec, self.decay = codec, decay
        self.name = f"{codec.name} + error feedback" + (f" (β {decay:g})" if decay != 1.0 else "")
        self.residuals: dict[Hashable, torch.Tensor] = {}

    def roundtrip_for(self, key: Hashable, flat: torch.Tensor) -> tuple[torch.Tensor, int]:
        """key: the (worker, module) the residual belongs to."""
        corrected = flat + self.decay * self.residuals[key] if key in self.residuals else flat.clone()
        decoded, payload = self.codec.roundtrip(corrected)
        self.residuals[key] = corrected - decoded
        return decoded, payload


def relative_rms(exact: torch.Tensor, got: torch.Tensor) -> float:
    """‖got − exact‖ / ‖exact‖ (0 for an all-zero exact)."""
    norm = exact.norm().item()
    return (got - exact).norm().item() / norm if norm > 0 else 0.0
