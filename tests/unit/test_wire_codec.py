"""p2ptrain's 4-bit NF4 wire codec: bitsandbytes' NF4 values in a format of our own, carried
by hivemind's tensor message, and a clear refusal of any buffer that cannot be one."""

from __future__ import annotations

import pytest
import torch

from hivemind.proto import runtime_pb2

from p2ptrain.swarm.averaging import WIRE_BYTES_PER_VALUE, averaging_part_bytes, make_compression
from p2ptrain.swarm.wire_codec import (NF4_BLOCK, NF4_WIRE_TYPE, deserialize_part, nf4_decode, nf4_encode,
                                       nf4_payload_bytes, nf4_roundtrip, returns_averages, serialize_part)


@pytest.mark.parametrize("values", [1, 63, 64, 65, 4097, 100_001])
def test_nf4_decodes_to_exactly_what_bitsandbytes_nf4_decodes_to(values):
    import bitsandbytes.functional as bnbf
    x = torch.randn(values, generator=torch.Generator().manual_seed(values)) * 3e-3
    packed, state = bnbf.quantize_4bit(x, blocksize=NF4_BLOCK, quant_type="nf4")
    reference = bnbf.dequantize_4bit(packed, state).reshape(-1)
    assert torch.equal(nf4_roundtrip(x), reference)


def test_nf4_costs_half_a_byte_a_value_plus_a_scale_per_64_values():
    assert nf4_payload_bytes(64) == 4 + 32
    assert len(nf4_encode(torch.randn(1000))) == nf4_payload_bytes(1000) == 16 * 4 + 500
    assert WIRE_BYTES_PER_VALUE["4bit"] == 0.5625
    assert averaging_part_bytes(1_000_000, "4bit") == pytest.approx(1_000_000 * 0.5625 / 16, abs=1)


def test_nf4_error_on_gaussian_values_is_under_a_tenth_and_zeros_stay_exact():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(0))
    assert float((nf4_roundtrip(x) - x).norm() / x.norm()) < 0.1
    zeros = torch.zeros(130)
    assert torch.equal(nf4_roundtrip(zeros), zeros)
    x[:64] = 0.0  # a block of zeros next to others
    assert torch.equal(nf4_roundtrip(x)[:64], zeros[:64])
    assert nf4_roundtrip(torch.randn(3, 5)).shape == (3, 5)


def test_a_part_in_nf4_crosses_the_wire_in_hiveminds_tensor_message_and_decodes_the_same():
    x = torch.randn(777)
    message = make_compression("4bit").compress(x, None)
    assert message.compression == NF4_WIRE_TYPE and returns_averages(message.compression)
    received = runtime_pb2.Tensor.FromString(message.SerializeToString())
    assert torch.equal(deserialize_part(received), nf4_roundtrip(x))
    # hivemind's own codecs still go to hivemind, and do not return averages
    fp16 = serialize_part(x, runtime_pb2.CompressionType.FLOAT16)
    assert torch.equal(deserialize_part(runtime_pb2.Tensor.FromString(fp16.SerializeToString())), x.half().float())
    assert not returns_averages(runtime_pb2.CompressionType.BLOCKWISE_8BIT)


def nan_scale(message):
    buffer = bytearray(message.buffer)
    buffer[:4] = torch.tensor([float("nan")]).numpy().tobytes()
    message.buffer = bytes(buffer)


BAD_MESSAGES = {
    "a buffer one byte short": lambda m: setattr(m, "buffer", m.buffer[:-1]),
    "a buffer one byte long": lambda m: setattr(m, "buffer", m.buffer + b"\0"),
    "a shape that does not match the buffer": lambda m: m.size.append(2),
    "a huge dimension": lambda m: (m.size.__delitem__(0), m.size.append(2 ** 32 - 1)),
    "a NaN block scale": nan_scale,
    "another dtype": lambda m: setattr(m, "dtype", "float16"),
    "a codec number nobody knows": lambda m: setattr(m, "compression", 99),
}


@pytest.mark.parametrize("damage", list(BAD_MESSAGES), ids=list(BAD_MESSAGES))
def test_a_malformed_part_from_a_stranger_raises_a_value_error_not_anything_else(damage):
    message = make_compression("4bit").compress(torch.randn(200), None)
    BAD_MESSAGES[damage](message)
    with pytest.raises(ValueError):
        deserialize_part(runtime_pb2.Tensor.FromString(message.SerializeToString()))


def test_decoding_checks_the_buffer_before_allocating_for_a_huge_claimed_shape():
    with pytest.raises(ValueError, match="expected"):
        nf4_decode(b"\0" * 36, (10 ** 12,))
