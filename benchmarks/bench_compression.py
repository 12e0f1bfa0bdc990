"""Claim: the wire codecs for pseudo-gradients (none, fp16, 8bit = hivemind's blockwise
quantization, 4bit = p2ptrain's NF4, built by `p2ptrain.swarm.averaging.make_compression`) cost little accuracy on
real pseudo-gradients, and the outer step taken with the all-reduced Δ gives nearly the
same model as with the exact average.

Two default-preset `PathSession`s, paths 0,0 and 0,1 (they share the modules `stem` and
`L0.M0`), each train one round of H inner steps on the default corpus; Δ = θ_global −
θ_local per module comes from `ModuleOuterState.pseudo_gradient_into`, as in `p2ptrain
join`. For each shared module the two-peer all-reduce is replayed without a network, with
hivemind's own pieces: `TensorPartContainer` cuts each peer's Δ into parts and assigns
them to reducers and serializes the parts it sends (`iterate_input_parts_for`); a reducer
averages what it decodes (its own part raw, weighted by tokens as p2ptrain weights them) and
sends back `serialize_torch_tensor(average − decoded part)`, as `AllReduceRunner` does;
a peer adds the decoded difference to its own Δ (4bit: the reducer sends back the encoded
average itself, and every peer, the reducer too, holds its decoding, as
`swarm/wire_codec.py` has it). Errors are of that result against the
exact weighted mean, and of a single encode → decode of Δ (one crossing). Then
`ModuleOuterState.apply` takes each peer's outer step with the exact and with each codec's
result, and each path is scored on its routed held-out documents.

Beside them, 4-bit NF4 with hivemind's scheme of replies (outer_codecs.NF4Codec, the
difference from each sender's part), which the swarm does not use: its all-reduce is
replayed by hand (replay_allreduce_off_wire), to show what that scheme did to 4 bits. For every
codec the table also gives how far the two peers' results lie apart: what the fingerprint
check (`averaging.sync_tolerance`) sees between two holders after one round.

    python benchmarks/bench_compression.py [--quick] [--steps 50]
"""

from __future__ import annotations

import asyncio
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (DILOCO_OUTER, Stopwatch, apply_threads, base_parser, corpus_note, default_run,  # noqa: E402
                    machine_info, markdown_table, open_session, parse_path, print_header, write_outputs)
from outer_codecs import NF4Codec  # noqa: E402
from p2ptrain.data.tokenizer import load_tokenizer  # noqa: E402
from p2ptrain.model.grid import path_name  # noqa: E402
from p2ptrain.swarm.averaging import make_compression  # noqa: E402
from p2ptrain.swarm.wire_codec import deserialize_part, returns_averages, serialize_part  # noqa: E402
from p2ptrain.train.evaluate import document_loss, heldout_by_path  # noqa: E402

CODECS = ("none", "fp16", "8bit", "4bit")
# measured beside them, not the swarm's: NF4 with hivemind's replies (the average minus the
# sender's part), replayed by hand (replay_allreduce_off_wire)
OFF_WIRE = {"nf4, delta replies": NF4Codec}
PATHS = ("0,0", "0,1")  # two peers whose paths share the stem and L0.M0


# ------------------------------------------------------------ the wire, replayed

def encoded_parts(tensors: list[torch.Tensor], codec, peers: int, reducer: int) -> list:
    """The messages a peer sends to `reducer` in a group of `peers`: hivemind's own split
    (parts of up to 512 KiB after compression) and serialization."""
    from hivemind.averaging.partition import TensorPartContainer

    container = TensorPartContainer(tensors, [1.0] * peers, compression=codec)

    async def collect():
        return [part async for part in container.iterate_input_parts_for(reducer)]
    return asyncio.run(collect())


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def one_crossing(tensors: list[torch.Tensor], codec) -> tuple[torch.Tensor, int]:
    """Δ after one encode → decode of every part, and its wire bytes."""
    messages = encoded_parts(tensors, codec, peers=1, reducer=0)
    return flat([deserialize_part(m) for m in messages]), sum(m.ByteSize() for m in messages)


def replay_allreduce(deltas: list[list[torch.Tensor]], weights: list[float], codec) -> tuple[list, int]:
    """What each peer holds after hivemind's all-reduce of `deltas` (a tensor list per peer,
    equal peer fractions), flattened, and the bytes the group put on the wire (both ways).

    As hivemind's AllReduceRunner: a reducer averages its own part raw and the others'
    decoded (accumulator += weight·part, then / Σweight); it returns to each sender
    encode(average − decoded part), which the sender adds to its raw part. A codec that
    returns averages (4-bit NF4) sends encode(average) instead, and every peer holds its
    decoding, the reducer too."""
    n = len(deltas)
    raw = [flat(d) for d in deltas]
    out = [torch.empty_like(r) for r in raw]
    wire, offset = 0, 0  # reducers own consecutive ranges of the flat vector, in order
    for reducer in range(n):
        sent = {s: encoded_parts(deltas[s], codec, n, reducer) for s in range(n) if s != reducer}
        wire += sum(m.ByteSize() for messages in sent.values() for m in messages)
        decoded = {s: [deserialize_part(m) for m in messages] for s, messages in sent.items()}
        sizes = [part.numel() for part in next(iter(decoded.values()))]
        for p, size in enumerate(sizes):
            own = {s: decoded[s][p] if s != reducer else raw[s][offset:offset + size] for s in range(n)}
            accumulator = torch.zeros(size)
            for s in range(n):
                accumulator.add_(own[s], alpha=weights[s])
            average = accumulator / sum(weights)
            compression = next(iter(sent.values()))[p].compression
            averages_back = returns_averages(compression)
            out[reducer][offset:offset + size] = (deserialize_part(serialize_part(average, compression))
                                                  if averages_back else average)
            for s in sent:
                if averages_back:
                    reply = serialize_part(average, compression)
                    out[s][offset:offset + size] = deserialize_part(reply)
                else:
                    reply = serialize_part(average - own[s], compression)
                    out[s][offset:offset + size] = raw[s][offset:offset + size] + deserialize_part(reply)
                wire += reply.ByteSize()
            offset += size
    assert offset == raw[0].numel()
    return out, wire


def replay_allreduce_off_wire(deltas: list[list[torch.Tensor]], weights: list[float], codec) -> tuple[list, int]:
    """replay_allreduce's scheme for a codec hivemind cannot carry (outer_codecs'
    `roundtrip`): peer r reduces the r-th of n equal consecutive slices of the flat vector;
    senders' slices cross encoded, the reducer's own raw; each sender gets back
    encode(average − decoded slice) and adds it to its raw slice. Payload bytes, both ways."""
    n = len(deltas)
    raw = [flat(d) for d in deltas]
    out = [torch.empty_like(r) for r in raw]
    size, wire = math.ceil(raw[0].numel() / n), 0
    for reducer in range(n):
        lo, hi = reducer * size, min((reducer + 1) * size, raw[0].numel())
        received = {}
        for s in range(n):
            if s == reducer:
                received[s] = raw[s][lo:hi]
            else:
                received[s], payload = codec.roundtrip(raw[s][lo:hi].contiguous())
                wire += payload
        average = sum(weights[s] * received[s] for s in range(n)) / sum(weights)
        out[reducer][lo:hi] = average
        for s in range(n):
            if s != reducer:
                reply, payload = codec.roundtrip((average - received[s]).contiguous())
                wire += payload
                out[s][lo:hi] = raw[s][lo:hi] + reply
    return out, wire


def error_stats(exact: torch.Tensor, got: torch.Tensor) -> dict:
    diff = (got - exact).double().abs()
    norm = float(exact.double().norm())
    return {"max_abs_err": float(diff.max()), "mean_abs_err": float(diff.mean()),
            "rel_rms_err": float(diff.norm()) / norm if norm else 0.0}


def unflatten(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(vector[offset:offset + t.numel()].view_as(t).clone())
        offset += t.numel()
    return out


# ------------------------------------------------------------ training and scoring

def train_round(session, steps: int) -> dict:
    """H inner steps from the initial global state; returns Δ per module (as `join` computes it)."""
    with Stopwatch() as watch:
        tokens, loss = session.inner_steps(steps)
    deltas = {}
    for module_id in session.module_ids:
        outer = session.outer[module_id]
        deltas[module_id] = [torch.zeros_like(g) for g in outer.global_params]
        outer.pseudo_gradient_into(session.local_state(module_id), deltas[module_id])
    return {"deltas": deltas, "tokens": tokens, "loss": loss, "seconds": watch.wall}


def heldout_sequences(state, docs, path, budget: int) -> list[torch.Tensor]:
    """A deterministic prefix of the path's routed held-out documents (as `p2ptrain eval` takes it)."""
    tokenizer = load_tokenizer(state.config.data.tokenizer)
    sequences = []
    for doc in heldout_by_path(state, docs)[path]:
        if budget <= 0:
            break
        ids = (list(tokenizer.encode(doc.text)) + [tokenizer.eos_id])[: budget + 1]
        sequences.append(torch.tensor(ids, dtype=torch.long))
        budget -= len(ids) - 1
    return sequences


def heldout_loss(model, sequences: list[torch.Tensor], context: int) -> float:
    total, count = 0.0, 0
    for seq in sequences:
        t, c = document_loss(model, seq, context, torch.device("cpu"))
        total, count = total + t, count + c
    return total / count


def after_outer_step(session, initial_outer: dict, mean_deltas: dict) -> torch.nn.Module:
    """A copy of the session's model holding θ_global after one outer step with these Δ."""
    model = copy.deepcopy(session.model)
    for module_id in session.module_ids:
        outer = copy.deepcopy(initial_outer[module_id])
        outer.apply(mean_deltas[module_id])
        model.load_module_state(module_id, outer.global_state())
    return model


def draw(errors: list[dict], losses: dict):
    def figure(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        rows = [e for e in errors if e["module"] == "all shared" and e["codec"] != "none"]
        x = range(len(rows))
        left.bar([i - 0.2 for i in x], [e["crossing"]["rel_rms_err"] for e in rows], 0.4,
                 label="one crossing (encode → decode of Δ)")
        left.bar([i + 0.2 for i in x], [e["allreduce"]["rel_rms_err"] for e in rows], 0.4,
                 label="all-reduce result vs exact mean")
        left.set_xticks(list(x), [e["codec"] for e in rows])
        left.set_yscale("log")
        left.set_ylabel("relative RMS error ‖error‖ / ‖Δ‖")
        left.set_title("Wire codec error on real pseudo-gradients")
        left.legend()
        for peer, by_model in losses.items():
            codecs = [c for c in (*CODECS, *OFF_WIRE) if f"outer step, {c}" in by_model]
            left_out = [by_model[f"outer step, {c}"] - by_model["outer step, exact mean"] for c in codecs]
            right.plot(codecs, left_out, "o-", label=f"path {peer}")
        right.axhline(0.0, color="gray", linewidth=0.8)
        right.set_ylabel("held-out loss minus exact-mean loss (nats/token)")
        right.set_title("Effect on the model after the outer step")
        right.legend()
        return fig
    return figure


# ------------------------------------------------------------ driver

def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="inner steps H of the round (full: the preset's 50)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored per path (full: 32768)")
    args = parser.parse_args()
    apply_threads(args.threads)
    info = machine_info()

    with Stopwatch() as elapsed:
        # --- one round of real training on each of two peers
        cfg, state, docs = default_run(args.quick, outer=DILOCO_OUTER)
        steps = args.steps or (3 if args.quick else cfg.inner.steps_per_round)
        eval_tokens = args.eval_tokens or (2048 if args.quick else 32768)
        sessions = [open_session(state, docs, parse_path(p)) for p in PATHS]
        initial_outer = [copy.deepcopy(s.outer) for s in sessions]  # θ_global: inner steps leave it alone
        rounds = [train_round(s, steps) for s in sessions]
        weights = [float(r["tokens"]) for r in rounds]  # p2ptrain weights each peer by its tokens
        shared = [m for m in sessions[0].module_ids if m in sessions[1].module_ids]

        # --- every codec on every shared module
        exact = {m: sum(w * flat(r["deltas"][m]) for w, r in zip(weights, rounds)) / sum(weights) for m in shared}
        errors, applied, failures = [], {c: [{}, {}] for c in (*CODECS, *OFF_WIRE)}, {}
        for name in (*CODECS, *OFF_WIRE):
            try:
                per_module = []
                for m in shared:
                    if name in OFF_WIRE:
                        codec = OFF_WIRE[name]()
                        crossed, crossing_wire = codec.roundtrip(flat(rounds[0]["deltas"][m]))
                        results, wire = replay_allreduce_off_wire([r["deltas"][m] for r in rounds], weights, codec)
                    else:
                        codec = make_compression(name)
                        crossed, crossing_wire = one_crossing(rounds[0]["deltas"][m], codec)
                        results, wire = replay_allreduce([r["deltas"][m] for r in rounds], weights, codec)
                    for peer, result in enumerate(results):
                        applied[name][peer][m] = unflatten(result, rounds[peer]["deltas"][m])
                    per_module.append((m, flat(rounds[0]["deltas"][m]), crossed, crossing_wire,
                                       exact[m], results[0], wire, results[1]))
            except Exception as e:  # report a broken codec (e.g. a numpy/bitsandbytes mismatch), go on
                failures[name] = f"{type(e).__name__}: {e}"
                applied.pop(name)
                continue
            everything = [("all shared", *[torch.cat([row[i] for row in per_module]) if torch.is_tensor(per_module[0][i])
                                           else sum(row[i] for row in per_module) for i in range(1, 8)])]
            for m, delta, crossed, crossing_wire, mean, result, wire, other in per_module + everything:
                errors.append({"codec": name, "module": m, "values": delta.numel(),
                               "crossing_wire_bytes": crossing_wire, "allreduce_wire_bytes": wire,
                               "mean_abs_delta": float(delta.abs().mean()), "max_abs_delta": float(delta.abs().max()),
                               "crossing": error_stats(delta, crossed), "allreduce": error_stats(mean, result),
                               # how far the two holders' results lie apart, relative to the mean
                               "copies_apart_rel_rms": float((result - other).double().norm()
                                                             / mean.double().norm().clamp_min(1e-30))})

        # --- the outer step with the exact mean and with each codec's result, scored
        losses = {}
        for peer, (session, round_) in enumerate(zip(sessions, rounds)):
            sequences = heldout_sequences(state, docs, session.path, eval_tokens)
            own = {m: round_["deltas"][m] for m in session.module_ids if m not in shared}  # averaged alone
            exact_mean = {**own, **{m: unflatten(exact[m], round_["deltas"][m]) for m in shared}}
            variants = {"initialisation": after_outer_step(session, initial_outer[peer],
                                                           {m: [torch.zeros_like(t) for t in d]
                                                            for m, d in round_["deltas"].items()}),
                        "local, after H inner steps": session.model,
                        "outer step, exact mean": after_outer_step(session, initial_outer[peer], exact_mean)}
            for name in applied:
                variants[f"outer step, {name}"] = after_outer_step(session, initial_outer[peer],
                                                                   {**own, **applied[name][peer]})
            losses[path_name(session.path)] = {k: heldout_loss(model, sequences, cfg.model.context)
                                              for k, model in variants.items()}
            losses[path_name(session.path)]["_tokens"] = sum(len(s) - 1 for s in sequences)

    # --- report
    print_header("Wire codecs on real pseudo-gradients", info, [
        f"training: default preset, two peers on paths {' and '.join(PATHS)} ({weights[0]:,.0f} tokens each), "
        f"one round of H = {steps} AdamW8bit inner steps from the same initialisation "
        f"({', '.join('%.0f s' % r['seconds'] for r in rounds)}; mean loss "
        f"{', '.join('%.3f' % r['loss'] for r in rounds)}); Δ = θ_global − θ_local (fp32); {corpus_note(args.quick, docs)}",
        f"shared modules {', '.join(shared)} are all-reduced between the two peers (replayed with hivemind "
        f"{info['hivemind']}'s TensorPartContainer and serializers, codecs from `make_compression`); "
        "the other module of each path is averaged alone (its own Δ, no wire)",
        "one crossing = each part of peer 0's Δ encoded and decoded once (errors vs Δ); all-reduce = what peer 0 "
        "holds after the all-reduce vs the exact token-weighted mean (half of the vector is its own reducer's part, "
        "which never crosses the wire); errors are absolute, in parameter units; rel RMS = ‖error‖ / ‖reference‖; "
        "wire = protobuf bytes (headers, absmax and codebook included) per value of the module; the group's wire "
        "counts both peers, both directions",
        "4bit = p2ptrain's NF4 on the wire (4 bits a value + a float32 absmax per 64), whose reducers return the "
        "encoded average itself; 'nf4, delta replies' = the same values with hivemind's replies (average − part), "
        "replayed by hand over two equal slices, bytes = payload, no framing: the scheme the swarm does not use; "
        "peers' results apart = ‖peer 0's result − peer 1's‖ / ‖exact mean‖, what the fingerprint check sees "
        "between two holders after one round",
        f"outer step: `ModuleOuterState.apply` (lr {cfg.outer.lr}, Nesterov momentum {cfg.outer.momentum}) from the "
        "initial global state; loss in nats/token on the path's routed held-out documents",
    ])
    print(markdown_table(
        ["codec", "module", "values", "mean |Δ|", "max |Δ|", "one crossing: B/value", "max abs err",
         "mean abs err", "rel RMS err", "all-reduce: group's wire B/value", "max abs err", "mean abs err",
         "rel RMS err", "peers' results apart (rel RMS)"],
        [[e["codec"], e["module"], f"{e['values']:,}", f"{e['mean_abs_delta']:.2e}", f"{e['max_abs_delta']:.2e}",
          f"{e['crossing_wire_bytes'] / e['values']:.3f}", f"{e['crossing']['max_abs_err']:.2e}",
          f"{e['crossing']['mean_abs_err']:.2e}", f"{e['crossing']['rel_rms_err']:.2e}",
          f"{e['allreduce_wire_bytes'] / e['values']:.3f}", f"{e['allreduce']['max_abs_err']:.2e}",
          f"{e['allreduce']['mean_abs_err']:.2e}", f"{e['allreduce']['rel_rms_err']:.2e}",
          f"{e['copies_apart_rel_rms']:.2e}"] for e in errors]))
    for name, why in failures.items():
        print(f"\n{name}: FAILED — {why}")
    print()
    models = [k for k in next(iter(losses.values())) if not k.startswith("_")]
    print(markdown_table(
        ["model", *[f"path {p} held-out loss ({v['_tokens']:,} tokens)" for p, v in losses.items()],
         *[f"path {p} minus exact mean" for p in losses]],
        [[k, *[f"{v[k]:.5f}" for v in losses.values()],
          *[f"{v[k] - v['outer step, exact mean']:+.2e}" if k.startswith("outer step, ") and "exact" not in k else ""
            for v in losses.values()]] for k in models]))
    print(f"\n(total {elapsed.wall:.0f} s)")
    write_outputs(__file__, {
        "machine": info, "quick": args.quick,
        "config": {"paths": list(PATHS), "steps": steps, "weights": weights, "shared_modules": shared,
                   "outer_lr": cfg.outer.lr, "outer_momentum": cfg.outer.momentum},
        "train": [{k: v for k, v in r.items() if k != "deltas"} for r in rounds],
        "errors": errors, "failures": failures, "losses": losses, "elapsed_s": elapsed.wall,
    }, draw(errors, losses))


if __name__ == "__main__":
    main()
