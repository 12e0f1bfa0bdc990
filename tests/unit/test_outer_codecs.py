"""The pseudo-gradient codecs bench_outer_codecs compares: each sends what it says it
sends, costs the bytes it says, and error feedback loses nothing, only delays it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from outer_codecs import ErrorFeedback, HivemindCodec, NF4Codec, NoCodec, TopKCodec, relative_rms  # noqa: E402


def pseudo_gradient(n: int = 10_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-2


def test_top_k_keeps_the_k_largest_magnitudes_of_every_chunk_as_float16():
    # Prepare: two chunks of 8 (the second one short) and k = 2 per chunk
    flat = torch.tensor([0.1, -3.0, 0.2, 2.0, 0.0, -0.5, 1.0, 0.3, 5.0, -0.1, 0.2, -7.0, 0.4])
    codec = TopKCodec(fraction=0.25, chunk=8)

    # Execute
    decoded, payload = codec.roundtrip(flat)

    # Assert
    expected = torch.zeros_like(flat)
    expected[[1, 3, 8, 11]] = flat[[1, 3, 8, 11]]
    assert torch.equal(decoded, expected.half().float())
    assert payload == 2 * 2 * 4  # 2 chunks x 2 kept x (float16 value + uint16 index)


def test_nf4_costs_half_a_byte_a_value_plus_a_scale_per_block_and_keeps_the_shape_of_the_vector():
    flat = pseudo_gradient(6_400)

    decoded, payload = NF4Codec(blocksize=64).roundtrip(flat)

    assert payload == 6_400 // 2 + 4 * 100
    assert decoded.shape == flat.shape and decoded.dtype == torch.float32
    assert 0.01 < relative_rms(flat, decoded) < 0.15  # lossy, but a 4-bit code of the same vector


@pytest.mark.parametrize("compression, bytes_per_value, max_error", [("fp16", 2.0, 1e-3), ("8bit", 1.05, 3e-2)])
def test_the_swarms_own_codecs_round_trip_through_hiveminds_serializer(compression, bytes_per_value, max_error):
    flat = pseudo_gradient(65_536)

    decoded, payload = HivemindCodec(compression).roundtrip(flat)

    assert payload <= bytes_per_value * flat.numel()
    assert 0 < relative_rms(flat, decoded) < max_error


def test_error_feedback_sends_later_what_a_round_left_out():
    # Prepare: top-k 1/16 of the same pseudo-gradient, six rounds in a row
    codec = ErrorFeedback(TopKCodec(fraction=1 / 16, chunk=256))
    delta = pseudo_gradient(1_024)
    sent_total = torch.zeros_like(delta)

    # Execute
    for _ in range(6):
        sent, _ = codec.roundtrip_for(("worker", "stem"), delta)
        sent_total += sent

    # Assert: what was sent plus what is still held back is exactly what was meant to be sent
    # (up to float16 rounding of the kept values), and more of it got through than without feedback
    residual = codec.residuals[("worker", "stem")]
    assert torch.allclose(sent_total + residual, 6 * delta, atol=1e-4)
    without = 6 * TopKCodec(fraction=1 / 16, chunk=256).roundtrip(delta)[0]
    assert relative_rms(6 * delta, sent_total) < relative_rms(6 * delta, without)


def test_decayed_error_feedback_keeps_one_residual_per_worker_and_module_and_decays_it():
    codec = ErrorFeedback(NoCodec(), decay=0.5)
    codec.residuals[("a", "stem")] = torch.ones(4)

    sent, _ = codec.roundtrip_for(("a", "stem"), torch.zeros(4))
    other, _ = codec.roundtrip_for(("b", "stem"), torch.full((4,), 2.0))

    assert torch.equal(sent, torch.full((4,), 0.5))  # exact codec: the decayed residual goes out whole
    assert torch.equal(other, torch.full((4,), 2.0))  # another worker's residual is its own
    assert torch.equal(codec.residuals[("a", "stem")], torch.zeros(4))


def test_the_by_hand_all_reduce_replay_gives_the_weighted_mean_and_a_lossy_codec_leaves_peers_apart():
    # Prepare: two peers' pseudo-gradients of one module (two tensors), unequal token weights
    from bench_compression import flat, replay_allreduce_off_wire
    deltas = [[pseudo_gradient(640, seed=2 * s), pseudo_gradient(64, seed=2 * s + 1)] for s in range(2)]
    weights = [100.0, 300.0]
    exact = (weights[0] * flat(deltas[0]) + weights[1] * flat(deltas[1])) / sum(weights)

    # Execute
    exact_results, exact_wire = replay_allreduce_off_wire(deltas, weights, NoCodec())
    nf4_results, nf4_wire = replay_allreduce_off_wire(deltas, weights, NF4Codec(blocksize=64))

    # Assert: each peer's slice crosses once each way
    assert all(torch.allclose(r, exact, atol=1e-9) for r in exact_results)
    assert exact_wire == 2 * 4 * exact.numel()
    assert nf4_wire < exact_wire / 6
    assert 0.01 < relative_rms(nf4_results[0], nf4_results[1]) < 0.5
