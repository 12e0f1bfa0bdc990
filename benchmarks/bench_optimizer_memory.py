"""Claim: the inner optimizer (bitsandbytes AdamW8bit) holds <= 2.1 bytes of state per
parameter, against 8 for 32-bit AdamW, so a ~150M-parameter path fits an 8 GB card.

Measured: `optimizer_state_bytes` of real optimizers from `make_inner_optimizer` after one
step, on the default preset's path (real forward/backward on a batch) and on the gpu
preset's full path (~151M parameters, random gradients: state size does not depend on
gradient values), next to `estimate_state_bytes`, and the growth of this process's
resident memory over that first step.
Modelled: `p2ptrain.info.run_info`'s memory model of the gpu preset, and the largest path
of the gpu-preset family (wider or deeper) that fits 8 / 12 / 24 GiB according to that
model. That part is arithmetic, not a GPU measurement.

    python benchmarks/bench_optimizer_memory.py [--quick]
"""

from __future__ import annotations

import copy
import ctypes
import gc
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (apply_threads, base_parser, gib, machine_info, markdown_table, print_header,  # noqa: E402
                    write_json)
from p2ptrain.config import RunConfig  # noqa: E402
from p2ptrain.info import run_info  # noqa: E402
from p2ptrain.model.grid import Grid  # noqa: E402
from p2ptrain.model.transformer import PathModel  # noqa: E402
from p2ptrain.train.inner import estimate_state_bytes, make_inner_optimizer, optimizer_state_bytes  # noqa: E402

TARGET_8BIT = 2.1  # bytes per parameter
BUDGETS_GIB = (8, 12, 24)
VOCAB = 257  # the bytes tokenizer of both presets
RSS_MIN_BYTES = 64 * 2 ** 20  # smaller states land in memory the allocator already holds: RSS says nothing


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> bool:
    """Ask glibc to hand freed heap memory back to the OS; False where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------ measurements

def measure_one(label: str, cfg: RunConfig, kind: str, real_batch: bool) -> dict:
    """One real optimizer step on path 0 of cfg's grid. Runs in a fresh process, so that the
    resident-memory growth is this optimizer's alone."""
    grid = Grid.from_config(cfg.grid)
    model = PathModel(cfg.model, grid, cfg.grid.blocks_per_level, grid.paths()[0], VOCAB, cfg.run.seed,
                      initialize=real_batch)  # a big model's init values do not change its state size
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    if real_batch:
        x = torch.randint(0, VOCAB, (cfg.inner.batch_size, cfg.model.context + 1), generator=gen)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    else:
        for p in params:
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    inner = copy.deepcopy(cfg.inner)
    inner.optimizer = kind
    gc.collect()
    before = rss_bytes()
    optimizer = make_inner_optimizer(params, inner)
    t = time.perf_counter()
    optimizer.step()
    step_s = time.perf_counter() - t
    measured = optimizer_state_bytes(optimizer)
    grown, peak = rss_bytes() - before, peak_rss_bytes() - before
    gc.collect()
    trimmed = grown if not malloc_trim() else rss_bytes() - before
    estimate = estimate_state_bytes([tuple(p.shape) for p in params], kind)
    return {"model": label, "optimizer": kind, "params": n, "state_bytes": measured,
            "bytes_per_param": measured / n, "estimate_bytes": estimate, "estimate_per_param": estimate / n,
            "rss_growth_bytes": grown, "rss_growth_per_param": grown / n, "peak_rss_growth_bytes": peak,
            "peak_rss_growth_per_param": peak / n, "trimmed_rss_growth_bytes": trimmed,
            "trimmed_rss_growth_per_param": trimmed / n, "step_s": step_s, "real_batch": real_batch}


def measure(label: str, cfg: RunConfig, real_batch: bool) -> list[dict]:
    rows = []
    for kind in ("adamw8bit", "adamw"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(measure_one, label, cfg, kind, real_batch).result())
    return rows


# ------------------------------------------------------------ memory model

def family(d_model: int, blocks_per_level: int) -> RunConfig:
    """The gpu preset with another width (head dim kept at 64) or depth."""
    cfg = RunConfig.load("gpu")
    cfg.model.d_model, cfg.model.n_heads = d_model, max(d_model // 64, 1)
    cfg.grid.blocks_per_level = blocks_per_level
    cfg.validate("benchmark config")
    return cfg


def modelled(candidates: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for d_model, blocks in candidates:
        info = run_info(family(d_model, blocks))
        rows.append({"d_model": d_model, "blocks_per_level": blocks, "params": info["params_per_path"],
                     **{k: info["memory_per_path_bytes"][k] for k in ("total_8bit", "total_32bit")}})
    return rows


def largest_fitting(rows: list[dict], budget: int, total_key: str) -> dict | None:
    """The biggest (by params per path) candidate whose modelled total fits budget bytes."""
    fitting = [r for r in rows if r[total_key] <= budget]
    if not fitting:
        return None
    best = max(fitting, key=lambda r: r["params"])
    return {"d_model": best["d_model"], "blocks_per_level": best["blocks_per_level"], "params": best["params"],
            "total_bytes": best[total_key]}


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    apply_threads(args.threads)
    info = machine_info()
    t0 = time.perf_counter()

    # --- measured on CPU
    default = RunConfig.load("default")
    measured = measure("default preset path", default, real_batch=True)
    if args.quick:
        big, big_label = family(256, 2), "gpu family, d_model 256, 2 blocks/level"
    else:
        big, big_label = RunConfig.load("gpu"), "gpu preset path"
    big_label += f" (d_model {big.model.d_model}, {len(big.grid.levels)} levels x {big.grid.blocks_per_level} blocks)"
    measured += measure(big_label, big, real_batch=False)

    # --- the memory model of `p2ptrain info --run-config gpu`
    gpu = RunConfig.load("gpu")
    gpu_info = run_info(gpu)
    mem = gpu_info["memory_per_path_bytes"]

    widths = [(d, gpu.grid.blocks_per_level) for d in range(128, 8192 + 1, 128 if not args.quick else 512)]
    depths = [(gpu.model.d_model, b) for b in range(1, (64 if not args.quick else 24) + 1)]
    scans = {"d_model": modelled(widths), "blocks_per_level": modelled(depths)}
    fits = []
    for budget in BUDGETS_GIB:
        for axis, candidates in scans.items():
            for key, optimizer in (("total_8bit", "adamw8bit"), ("total_32bit", "adamw")):
                best = largest_fitting(candidates, budget * 1024 ** 3, key)
                fits.append({"budget_gib": budget, "scaled": axis, "optimizer": optimizer, **(best or {})})
    elapsed = time.perf_counter() - t0

    # --- report
    print_header("Optimizer state per parameter, and the path memory model", info, [
        "measured: `optimizer_state_bytes` after one step of `make_inner_optimizer` (CPU); "
        "each (model, optimizer) in a fresh process; RSS growth = resident memory after the first step minus "
        "before building the optimizer; after malloc_trim = the same once glibc returned freed heap memory; "
        "peak = the process's peak RSS minus that baseline "
        "(shown for states of 64 MiB and more; smaller ones land in memory the allocator already holds)",
        f"default preset path: real forward/backward on a {default.inner.batch_size} x {default.model.context} "
        "batch; the larger model gets random gradients (state size does not depend on their values)",
        f"target: AdamW8bit <= {TARGET_8BIT} B/param",
    ])
    print(markdown_table(
        ["model", "optimizer", "params", "state MiB", "B/param measured", "B/param estimate", "measured/estimate",
         "RSS growth B/param", "after malloc_trim", "peak", "first step s"],
        [[r["model"], r["optimizer"], f"{r['params']:,}", f"{r['state_bytes'] / 2 ** 20:.1f}",
          f"{r['bytes_per_param']:.4f}", f"{r['estimate_per_param']:.4f}",
          f"{r['state_bytes'] / r['estimate_bytes']:.4f}",
          *((f"{r['rss_growth_per_param']:.2f}", f"{r['trimmed_rss_growth_per_param']:.2f}",
             f"{r['peak_rss_growth_per_param']:.2f}") if r["state_bytes"] >= RSS_MIN_BYTES else ("n/a",) * 3),
          f"{r['step_s']:.1f}"]
         for r in measured]))
    eight = [r for r in measured if r["optimizer"] == "adamw8bit"]
    worst = max(r["bytes_per_param"] for r in eight)
    adamw = [r for r in measured if r["optimizer"] == "adamw"]
    ratios = ", ".join(f"{a['bytes_per_param'] / b['bytes_per_param']:.3f}" for a, b in zip(eight, adamw))
    verdict = "meets" if worst <= TARGET_8BIT else "ABOVE TARGET"
    print(f"\nAdamW8bit: worst {worst:.4f} B/param vs target <= {TARGET_8BIT} ({verdict}); "
          f"AdamW8bit / AdamW state = {ratios}\n")

    print(f"Memory model of one gpu-preset path (`p2ptrain.info.run_info`; d_model {gpu.model.d_model}, "
          f"{len(gpu.grid.levels)} levels x {gpu.grid.blocks_per_level} blocks, "
          f"{gpu_info['params_per_path']:,} params, batch {gpu.inner.batch_size} x {gpu.model.context}, "
          "bf16 autocast activations). A model, not a GPU measurement; the CUDA context "
          "and allocator slack are not in it.\n")
    print(markdown_table(["component", "AdamW8bit GiB", "AdamW GiB"], [
        ["weights (fp32)", gib(mem["weights"]), gib(mem["weights"])],
        ["gradients (fp32)", gib(mem["grads"]), gib(mem["grads"])],
        ["optimizer state", gib(mem["optimizer_8bit"]), gib(mem["optimizer_32bit"])],
        ["activations", gib(mem["activations"]), gib(mem["activations"])],
        ["total", gib(mem["total_8bit"]), gib(mem["total_32bit"])],
    ]))
    print("\nLargest gpu-family path that fits each budget by that model (width: blocks_per_level "
          f"{gpu.grid.blocks_per_level}, head dim 64, d_model in steps of {widths[1][0] - widths[0][0]}; "
          f"depth: d_model {gpu.model.d_model}, blocks_per_level 1..{depths[-1][1]}; batch and context as the preset):\n")
    print(markdown_table(["budget GiB", "scaled", "optimizer", "d_model", "blocks/level", "params/path", "model GiB"],
                         [[f["budget_gib"], f["scaled"], f["optimizer"], f.get("d_model", "none fits"),
                           f.get("blocks_per_level", ""), f"{f['params']:,}" if "params" in f else "",
                           gib(f["total_bytes"]) if "total_bytes" in f else ""] for f in fits]))
    print(f"\n(total {elapsed:.0f} s)")

    out = write_json(__file__, {
        "machine": info, "quick": args.quick, "target_8bit_bytes_per_param": TARGET_8BIT,
        "meets_target": worst <= TARGET_8BIT, "measured": measured,
        "gpu_memory_model": {"params_per_path": gpu_info["params_per_path"], **mem},
        "largest_fitting": fits, "elapsed_s": elapsed,
    })
    print(f"(numbers also in {out.relative_to(out.parent.parent)})")


if __name__ == "__main__":
    main()
