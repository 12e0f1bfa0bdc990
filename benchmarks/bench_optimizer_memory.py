"""Claim: the inner optimizer (bitsandbytes AdamW8bit) holds <= 2.1 bytes of state per
parameter, against 8 for 32-bit AdamW, so a ~150M-parameter path fits an 8 GB card.

Measured, each (model, optimizer) in a fresh process: two real training steps of
`InnerTrainer` (p2ptrain's own step: forward, backward, clip, optimizer step; bf16
autocast on CUDA) on the default preset's path at its batch, and on the gpu preset's full
path (~151M parameters) at a small batch, because its real batch takes minutes per step on
a CPU. Then `optimizer_state_bytes` counts the real bitsandbytes / torch state tensors,
next to `estimate_state_bytes`; and the peak memory over those two steps: on a GPU
`torch.cuda.max_memory_allocated`, on a CPU the process's peak resident memory (VmHWM,
reset through /proc/self/clear_refs) above what it held before the model was built.
Modelled: `p2ptrain.info.run_info`'s memory model (the one `p2ptrain info` prints) at the
measured batch, and the largest path of the gpu-preset family (wider or deeper) that fits
8 / 12 / 24 GiB by that model at the preset's batch. That part is arithmetic, not a GPU
measurement.

    python benchmarks/bench_optimizer_memory.py [--quick]
"""

from __future__ import annotations

import copy
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (Stopwatch, apply_threads, base_parser, gib, machine_info, markdown_table,  # noqa: E402
                    print_header, write_outputs)
from p2ptrain.config import RunConfig  # noqa: E402
from p2ptrain.info import run_info  # noqa: E402

TARGET_8BIT = 2.1  # bytes per parameter
BUDGETS_GIB = (8, 12, 24)
OPTIMIZERS = ("adamw8bit", "adamw")
MIB = 2 ** 20


# ------------------------------------------------------------ measurement

def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_training(cfg: RunConfig, optimizer: str, batch: int, context: int, device_name: str) -> dict:
    """Two real `InnerTrainer` steps on path 0 of cfg's grid (runs in a fresh process, so
    that the memory it reports is this path's alone)."""
    from p2ptrain.model.grid import Grid
    from p2ptrain.model.transformer import PathModel
    from p2ptrain.train.inner import InnerTrainer, estimate_state_bytes, optimizer_state_bytes

    device = torch.device(device_name)
    cfg = copy.deepcopy(cfg)
    cfg.inner.optimizer = optimizer
    grid = Grid.from_config(cfg.grid)
    warm_up_libraries(cfg, device)
    baseline = resident_bytes()  # the interpreter, torch and bitsandbytes, loaded and warm; no path yet
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak()
    model = PathModel(cfg.model, grid, cfg.grid.blocks_per_level, grid.paths()[0], 257, cfg.run.seed).to(device)
    built = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes() - baseline
    trainer = InnerTrainer(model, cfg.inner, device)
    tokens = torch.randint(0, 257, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    with Stopwatch() as watch:
        for _ in range(2):  # the first step allocates the optimizer state
            trainer.step(tokens[:, :-1], tokens[:, 1:])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident_bytes("VmHWM") - baseline
    params = sum(p.numel() for p in model.parameters())
    state = optimizer_state_bytes(trainer.optimizer)
    estimate = estimate_state_bytes([tuple(p.shape) for p in model.parameters()], optimizer)
    return {"optimizer": optimizer, "params": params, "batch": batch, "context": context, "device": device_name,
            "state_bytes": state, "state_per_param": state / params, "estimate_bytes": estimate,
            "estimate_per_param": estimate / params, "peak_bytes": peak, "built_bytes": built, "two_steps_s": watch.wall}


def warm_up_libraries(cfg: RunConfig, device: torch.device) -> None:
    """One step of a tiny path with the same optimizer first: importing bitsandbytes and the
    first forward/backward load ~200 MB of libraries and kernels that are not the path's."""
    from p2ptrain.model.grid import Grid
    from p2ptrain.model.transformer import PathModel
    from p2ptrain.train.inner import InnerTrainer

    tiny = copy.deepcopy(cfg)
    tiny.model.d_model, tiny.model.n_heads, tiny.grid.levels, tiny.grid.blocks_per_level = 64, 1, [1], 1
    grid = Grid.from_config(tiny.grid)
    model = PathModel(tiny.model, grid, 1, grid.paths()[0], 257, 0).to(device)
    tokens = torch.randint(0, 257, (2, 65))
    InnerTrainer(model, tiny.inner, device).step(tokens[:, :-1], tokens[:, 1:])


def in_fresh_process(fn: Callable, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def modelled_at(cfg: RunConfig, batch: int, context: int) -> dict:
    """run_info's memory model of cfg's path at this batch (the tokens change activations only)."""
    cfg = copy.deepcopy(cfg)
    cfg.inner.batch_size, cfg.model.context = batch, context
    return run_info(cfg)["memory_per_path_bytes"]


# ------------------------------------------------------------ memory model scan

def gpu_family(d_model: int | None = None, blocks_per_level: int | None = None) -> RunConfig:
    """The gpu preset with another width (head dim kept at 64) or depth."""
    cfg = RunConfig.load("gpu")
    if d_model:
        cfg.model.d_model, cfg.model.n_heads = d_model, max(d_model // 64, 1)
    if blocks_per_level:
        cfg.grid.blocks_per_level = blocks_per_level
    cfg.validate("benchmark config")
    return cfg


def scan(axis: str, values: range) -> list[dict]:
    """Modelled memory of gpu-family paths along one axis, until one exceeds every budget."""
    rows = []
    for value in values:
        cfg = gpu_family(**{axis: value})
        info = run_info(cfg)
        mem = info["memory_per_path_bytes"]
        rows.append({"d_model": cfg.model.d_model, "blocks_per_level": cfg.grid.blocks_per_level,
                     "params": info["params_per_path"],
                     **{k: mem[k] for k in ("total_8bit", "total_32bit")}})
        if mem["total_8bit"] > max(BUDGETS_GIB) * 1024 ** 3:
            break
    return rows


def largest_fitting(rows: list[dict], budget_gib: int, total_key: str) -> dict | None:
    fitting = [r for r in rows if r[total_key] <= budget_gib * 1024 ** 3]
    return max(fitting, key=lambda r: r["params"]) if fitting else None


def draw(width_scan: list[dict], preset_params: int):
    def figure(plt):
        fig, ax = plt.subplots(figsize=(8, 5))
        params = [r["params"] / 1e6 for r in width_scan]
        ax.plot(params, [r["total_8bit"] / 1024 ** 3 for r in width_scan], "o-", ms=3, label="AdamW8bit")
        ax.plot(params, [r["total_32bit"] / 1024 ** 3 for r in width_scan], "s--", ms=3, label="AdamW (32-bit)")
        for budget in BUDGETS_GIB:
            ax.axhline(budget, color="gray", linestyle=":", linewidth=1)
            ax.text(params[0], budget, f" {budget} GiB", va="bottom", color="gray")
        ax.axvline(preset_params / 1e6, color="red", linewidth=0.8, label="gpu preset path")
        ax.set_xlabel("parameters per path (millions), gpu preset with d_model scaled")
        ax.set_ylabel("modelled training memory per path (GiB)")
        ax.set_title("Memory model (p2ptrain.info.run_info): batch 8 x 1024, bf16 activations")
        ax.set_ylim(0, max(BUDGETS_GIB) * 1.15)
        ax.legend()
        return fig
    return figure


# ------------------------------------------------------------ driver

def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--big-batch", type=int, nargs=2, default=(1, 64), metavar=("SEQS", "TOKENS"),
                        help="batch of the measured large path on a CPU (its real batch needs a GPU)")
    args = parser.parse_args()
    apply_threads(args.threads)
    info = machine_info()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # --- measured: two real steps per (path, optimizer), each in a fresh process
    default, gpu = RunConfig.load("default"), RunConfig.load("gpu")
    big_batch = (gpu.inner.batch_size, gpu.model.context) if device == "cuda" else tuple(args.big_batch)
    cases = [("default preset path", default, (default.inner.batch_size, default.model.context))]
    if not args.quick:  # --quick: the default path only (the gpu path's two steps take a minute on a CPU)
        cases.append(("gpu preset path", gpu, big_batch))
    measured = []
    with Stopwatch() as elapsed:
        for label, cfg, (batch, context) in cases:
            model_mem = modelled_at(cfg, batch, context)
            for optimizer in OPTIMIZERS:
                row = in_fresh_process(measure_training, cfg, optimizer, batch, context, device)
                suffix = "8bit" if optimizer == "adamw8bit" else "32bit"
                measured.append({"model": label, **row, "modelled_static_bytes":
                                 model_mem["weights"] + model_mem["grads"] + model_mem[f"optimizer_{suffix}"],
                                 "modelled_total_bytes": model_mem[f"total_{suffix}"]})
        # --- modelled: the gpu preset, and the largest family member per budget
        gpu_mem = run_info(gpu)["memory_per_path_bytes"]
        gpu_params = run_info(gpu)["params_per_path"]
        step = 512 if args.quick else 128
        scans = {"d_model": scan("d_model", range(step, 16384 + 1, step)),
                 "blocks_per_level": scan("blocks_per_level", range(1, 129))}

    # --- report
    where = "GPU: torch.cuda.max_memory_allocated" if device == "cuda" else (
        "CPU (no GPU here): peak resident memory of the process (VmHWM, reset via /proc/self/clear_refs) "
        "above its resident memory before the model was built; fp32 activations, no autocast")
    print_header("Optimizer state per parameter, peak training memory per path, and the memory model", info, [
        "each row: a fresh process builds path 0 of the preset's grid and takes two real `InnerTrainer` steps "
        "(forward, backward, clip, optimizer step) on a random-token batch; state = bytes of the optimizer's "
        "state tensors, counted (`optimizer_state_bytes`); estimate = `estimate_state_bytes`",
        f"peak memory: {where}; freed gradients stay in the process's heap (glibc), so on a CPU the peak is "
        "reached again every step, not only in the first",
        "modelled = `p2ptrain.info.run_info` at the measured batch; static = weights + grads + optimizer state; "
        "its activation term assumes bf16 autocast with fused attention on a GPU",
        f"target: AdamW8bit <= {TARGET_8BIT} B/param",
    ])
    print(markdown_table(
        ["path", "optimizer", "params", "batch", "state MiB", "state B/param", "estimate B/param",
         "measured / estimate", f"{device} MiB, model built", f"peak {device} MiB, 2 steps", "modelled static MiB", "modelled total MiB", "2 steps s"],
        [[r["model"], r["optimizer"], f"{r['params']:,}", f"{r['batch']} x {r['context']}",
          f"{r['state_bytes'] / MIB:.1f}", f"{r['state_per_param']:.4f}", f"{r['estimate_per_param']:.4f}",
          f"{r['state_bytes'] / r['estimate_bytes']:.4f}", f"{r['built_bytes'] / MIB:,.0f}", f"{r['peak_bytes'] / MIB:,.0f}",
          f"{r['modelled_static_bytes'] / MIB:,.0f}", f"{r['modelled_total_bytes'] / MIB:,.0f}",
          f"{r['two_steps_s']:.1f}"] for r in measured]))
    big_8bit = next(r for r in measured if r["model"] == cases[-1][0] and r["optimizer"] == "adamw8bit")
    big_32bit = next(r for r in measured if r["model"] == cases[-1][0] and r["optimizer"] == "adamw")
    meets = big_8bit["state_per_param"] <= TARGET_8BIT
    print(f"\nAdamW8bit on the {cases[-1][0]}: {big_8bit['state_per_param']:.4f} B/param, target <= {TARGET_8BIT} "
          f"({'met' if meets else 'MISSED'}); {big_8bit['state_per_param'] / big_32bit['state_per_param']:.3f}x "
          f"the AdamW state; peak {device} memory {big_8bit['peak_bytes'] / big_32bit['peak_bytes']:.2f}x.\n")

    print(f"Memory model of one gpu-preset path (d_model {gpu.model.d_model}, {len(gpu.grid.levels)} levels x "
          f"{gpu.grid.blocks_per_level} blocks, {gpu_params:,} params, batch {gpu.inner.batch_size} x "
          f"{gpu.model.context}, bf16 autocast activations). A model, not a GPU measurement; the CUDA context "
          "(~0.3-0.5 GiB) and allocator slack are not in it.\n")
    print(markdown_table(["component", "AdamW8bit GiB", "AdamW GiB"], [
        ["weights (fp32)", gib(gpu_mem["weights"]), gib(gpu_mem["weights"])],
        ["gradients (fp32)", gib(gpu_mem["grads"]), gib(gpu_mem["grads"])],
        ["optimizer state", gib(gpu_mem["optimizer_8bit"]), gib(gpu_mem["optimizer_32bit"])],
        ["activations", gib(gpu_mem["activations"]), gib(gpu_mem["activations"])],
        ["total", gib(gpu_mem["total_8bit"]), gib(gpu_mem["total_32bit"])],
    ]))
    print(f"\nLargest gpu-family path that fits each budget by that model (wider: d_model in steps of {step}, "
          f"head dim 64, {gpu.grid.blocks_per_level} blocks/level; deeper: d_model {gpu.model.d_model}, "
          "more blocks/level; batch and context as the preset):\n")
    fits = []
    for budget in BUDGETS_GIB:
        for axis, rows in scans.items():
            for optimizer in OPTIMIZERS:
                best = largest_fitting(rows, budget, "total_8bit" if optimizer == "adamw8bit" else "total_32bit")
                fits.append({"budget_gib": budget, "scaled": axis, "optimizer": optimizer, **(best or {})})
    print(markdown_table(
        ["budget GiB", "scaled", "optimizer", "d_model", "blocks/level", "params/path", "modelled GiB"],
        [[f["budget_gib"], f["scaled"], f["optimizer"], f.get("d_model", "none fits"), f.get("blocks_per_level", ""),
          f"{f['params']:,}" if "params" in f else "",
          gib(f["total_8bit" if f["optimizer"] == "adamw8bit" else "total_32bit"]) if "params" in f else ""]
         for f in fits]))
    print(f"\n(total {elapsed.wall:.0f} s)")
    write_outputs(__file__, {
        "machine": info, "quick": args.quick, "device": device, "target_8bit_bytes_per_param": TARGET_8BIT,
        "meets_target": meets, "measured": measured,
        "gpu_memory_model": {"params_per_path": gpu_params, **gpu_mem}, "scans": scans,
        "largest_fitting": fits, "elapsed_s": elapsed.wall,
    }, draw(scans["d_model"], gpu_params))


if __name__ == "__main__":
    main()
