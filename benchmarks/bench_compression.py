"""Claim: the wire codecs for pseudo-gradients (none, fp16, 8bit = hivemind's blockwise
quantization) cost little accuracy on real pseudo-gradients, and the outer step taken with
a decompressed Δ gives nearly the same model as with the exact Δ.

A default-preset `PathSession` trains one round (H inner steps) on the default corpus;
Δ = θ_global − θ_local per module comes from `ModuleOuterState.pseudo_gradient_into`,
as in `p2ptrain join`. Each tensor is cut into parts the way hivemind's
TensorPartContainer cuts it (part_size_bytes after compression), and every part goes
through one `serialize_torch_tensor` → `deserialize_torch_tensor` round trip with the
codec from `p2ptrain.swarm.averaging.make_compression`. Then `ModuleOuterState.apply`
takes the outer step with the exact and with each decompressed Δ, and each resulting
model is scored on the path's routed held-out documents.

    python benchmarks/bench_compression.py [--quick] [--steps 50]
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import apply_threads, base_parser, machine_info, markdown_table, print_header, write_json  # noqa: E402
from p2ptrain.config import RunConfig  # noqa: E402
from p2ptrain.data.corpus import load_documents  # noqa: E402
from p2ptrain.data.tokenizer import load_tokenizer  # noqa: E402
from p2ptrain.model.grid import path_name  # noqa: E402
from p2ptrain.run_state import RunState  # noqa: E402
from p2ptrain.swarm.averaging import make_compression  # noqa: E402
from p2ptrain.train.evaluate import document_loss, heldout_by_path  # noqa: E402
from p2ptrain.train.session import PathSession  # noqa: E402

CODECS = ("none", "fp16", "8bit")
QUICK_CORPUS_CHARS = 1_500_000
PART_SIZE_BYTES = 2 ** 19  # hivemind.averaging.partition.DEFAULT_PART_SIZE_BYTES, which p2ptrain keeps


# ------------------------------------------------------------------ codecs

def round_trip(tensor: torch.Tensor, codec) -> tuple[torch.Tensor, int]:
    """Decompressed copy of tensor and its wire bytes, part by part like TensorPartContainer."""
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor
    info = CompressionInfo.from_tensor(tensor)
    part_values = int(PART_SIZE_BYTES / (tensor.element_size() * codec.estimate_compression_ratio(info)))
    parts, wire = [], 0
    for part in tensor.detach().reshape(-1).split(part_values):
        message = serialize_torch_tensor(part, codec.compression_type)
        wire += message.ByteSize()
        parts.append(deserialize_torch_tensor(message).to(torch.float32))
    return torch.cat(parts).view_as(tensor), wire


def error_stats(exact: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    values = sum(t.numel() for t in exact)
    diffs = [(g - e).abs() for e, g in zip(exact, got)]
    sq_err = sum(float((d.double() ** 2).sum()) for d in diffs)
    sq_ref = sum(float((e.double() ** 2).sum()) for e in exact)
    return {"values": values,
            "max_abs_err": max(float(d.max()) for d in diffs),
            "mean_abs_err": sum(float(d.double().sum()) for d in diffs) / values,
            "rel_rms_err": math.sqrt(sq_err / sq_ref) if sq_ref else 0.0,
            "max_abs_delta": max(float(e.abs().max()) for e in exact),
            "mean_abs_delta": sum(float(e.abs().double().sum()) for e in exact) / values}


# ------------------------------------------------------------------ scoring

def heldout_sequences(state: RunState, docs, path, budget: int) -> list[torch.Tensor]:
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


def score(model, sequences: list[torch.Tensor], context: int) -> float:
    total, count = 0.0, 0
    for seq in sequences:
        t, c = document_loss(model, seq, context, torch.device("cpu"))
        total, count = total + t, count + c
    return total / count


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="inner steps H of the round (full: the preset's 50)")
    parser.add_argument("--path", default="0,0", help="the path to train")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored (full: 32768)")
    args = parser.parse_args()
    apply_threads(args.threads)
    info = machine_info()
    t0 = time.perf_counter()

    # --- one round of real training
    docs = load_documents(None, 4096, max_total_chars=QUICK_CORPUS_CHARS if args.quick else None)
    cfg = RunConfig.load()
    steps = args.steps or (10 if args.quick else cfg.inner.steps_per_round)
    eval_tokens = args.eval_tokens or (4096 if args.quick else 32768)
    state = RunState.create(cfg, docs)
    path = tuple(int(i) for i in args.path.split(","))
    session = PathSession(state, path, docs, torch.device("cpu"), Path(tempfile.mkdtemp(prefix="p2ptrain-bench-")))
    initial_outer = copy.deepcopy(session.outer)  # global = the initialisation; inner steps leave it alone
    t = time.perf_counter()
    _, train_loss = session.inner_steps(steps)
    train_s = time.perf_counter() - t

    deltas = {}
    for module_id in session.module_ids:
        outer = session.outer[module_id]
        deltas[module_id] = [torch.zeros_like(g) for g in outer.global_params]
        outer.pseudo_gradient_into(session.local_state(module_id), deltas[module_id])

    # --- codec errors
    decoded: dict[str, dict[str, list[torch.Tensor]]] = {}
    errors, failures = [], {}
    for name in CODECS:
        codec = make_compression(name)
        try:
            decoded[name], wire = {}, 0
            for module_id, tensors in deltas.items():
                outs = [round_trip(d, codec) for d in tensors]
                decoded[name][module_id] = [o for o, _ in outs]
                module_wire = sum(w for _, w in outs)
                wire += module_wire
                errors.append({"codec": name, "module": module_id, "wire_bytes": module_wire,
                               **error_stats(tensors, decoded[name][module_id])})
            all_exact = [d for ts in deltas.values() for d in ts]
            all_got = [d for ts in decoded[name].values() for d in ts]
            errors.append({"codec": name, "module": "all", "wire_bytes": wire, **error_stats(all_exact, all_got)})
        except Exception as e:  # hivemind 1.1.12's 8-bit codecs break under numpy >= 2.4
            import numpy
            failures[name] = f"{type(e).__name__}: {e} (numpy {numpy.__version__})"
            decoded.pop(name, None)

    # --- the outer step with each Δ, and the held-out loss of the result
    sequences = heldout_sequences(state, docs, path, eval_tokens)
    context = cfg.model.context
    scored_tokens = sum(len(s) - 1 for s in sequences)
    model = copy.deepcopy(session.model)
    local_loss = score(model, sequences, context)
    for module_id in session.module_ids:
        model.load_module_state(module_id, initial_outer[module_id].global_state())
    losses = {"initialisation (θ_global before the round)": score(model, sequences, context),
              "local (θ_local after H inner steps, no outer step)": local_loss}
    outer_models = {}
    for name, delta in [("exact Δ", deltas), *[(f"{c} Δ", decoded[c]) for c in CODECS if c in decoded]]:
        for module_id in session.module_ids:
            outer = copy.deepcopy(initial_outer[module_id])
            outer.apply(delta[module_id])
            model.load_module_state(module_id, outer.global_state())
        outer_models[name] = [p.detach().clone() for p in model.parameters()]
        losses[f"outer step with {name}"] = score(model, sequences, context)
    exact_loss = losses["outer step with exact Δ"]
    param_diff = {name: error_stats(outer_models["exact Δ"], params)["rel_rms_err"]
                  for name, params in outer_models.items() if name != "exact Δ"}
    elapsed = time.perf_counter() - t0

    # --- report
    print_header("Wire codecs on real pseudo-gradients", info, [
        f"training: default preset path {path_name(path)} ({sum(p.numel() for p in session.model.parameters()):,} "
        f"params), one round of H = {steps} AdamW8bit inner steps ({train_s:.0f} s, mean loss {train_loss:.3f}) "
        f"on the default corpus{' (first %s chars)' % format(QUICK_CORPUS_CHARS, ',') if args.quick else ''}; "
        "Δ = θ_global − θ_local per module (fp32)",
        f"codec: hivemind {info['hivemind']} via `make_compression`; one serialize → deserialize round trip per "
        f"part of up to {PART_SIZE_BYTES:,} compressed bytes (hivemind's TensorPartContainer split). An all-reduce "
        "applies a codec twice (Δ to the reducer, the averaged part back)",
        "errors are absolute, in parameter units; rel RMS = ‖decoded − Δ‖ / ‖Δ‖; wire = protobuf bytes "
        "(header, absmax and codebook included) per value",
        f"outer step: `ModuleOuterState.apply` (lr {cfg.outer.lr}, Nesterov momentum {cfg.outer.momentum}) from "
        f"the initial global state; loss on {scored_tokens:,} tokens of the path's routed held-out documents",
    ])
    print(markdown_table(
        ["codec", "module", "values", "wire B/value", "max abs err", "mean abs err", "rel RMS err", "mean |Δ|",
         "max |Δ|"],
        [[e["codec"], e["module"], f"{e['values']:,}", f"{e['wire_bytes'] / e['values']:.3f}",
          f"{e['max_abs_err']:.2e}", f"{e['mean_abs_err']:.2e}", f"{e['rel_rms_err']:.2e}",
          f"{e['mean_abs_delta']:.2e}", f"{e['max_abs_delta']:.2e}"] for e in errors]))
    for name, why in failures.items():
        print(f"\n{name}: FAILED — {why}")
    print()
    print(markdown_table(["model", "held-out loss", "minus exact-Δ loss", "‖θ − θ_exact-Δ‖ / ‖θ_exact-Δ‖"],
                         [[name, f"{loss:.5f}",
                           f"{loss - exact_loss:+.2e}" if name.startswith("outer") else "",
                           f"{param_diff[name[len('outer step with '):]]:.2e}"
                           if name.startswith("outer") and "exact" not in name else ""]
                          for name, loss in losses.items()]))
    print(f"\n(total {elapsed:.0f} s)")

    out = write_json(__file__, {
        "machine": info, "quick": args.quick,
        "config": {"path": list(path), "steps": steps, "eval_tokens": scored_tokens, "part_size_bytes": PART_SIZE_BYTES,
                   "outer_lr": cfg.outer.lr, "outer_momentum": cfg.outer.momentum},
        "train_loss": train_loss, "errors": errors, "failures": failures, "losses": losses,
        "param_rel_rms_vs_exact": param_diff, "elapsed_s": elapsed,
    })
    print(f"(numbers also in {out.relative_to(out.parent.parent)})")


if __name__ == "__main__":
    main()
