"""Helpers shared by the micro-benchmarks (inner throughput, optimizer memory, compression):
the machine header printed above every table, markdown tables, paired-timing statistics
and the JSON written to bench-out/<script-name>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench-out"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 30 s): smaller sizes, fewer repeats")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    return parser


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # reported, not fatal: the benchmark fails later with a clearer message
        return "not importable"


def speed_probe() -> float:
    """GFLOP/s of a fixed 512x512 fp32 matmul (median of 5): shows how fast the machine was
    at that moment. Shared 2-core VMs have phases tens of times slower than others."""
    import time
    a = torch.randn(512, 512)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ a
        times.append(time.perf_counter() - t)
    return 4 * 2 * 512 ** 3 / statistics.median(times) / 1e9


def machine_info() -> dict:
    """Date, machine and command: printed above every table and stored in the JSON."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "bitsandbytes": _version("bitsandbytes"),
        "hivemind": _version("hivemind"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "probe_gflops_start": speed_probe(),
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
    }


def print_header(title: str, info: dict, notes: Sequence[str] = ()) -> None:
    """Prints the header; also records a second speed probe (end of run) in info."""
    info["probe_gflops_end"] = speed_probe()
    print(f"## {title}\n")
    print(f"- date: {info['date']}")
    load = info.get("load_average")
    load_text = f", load average {load[0]:.1f} at start" if load else ""
    print(f"- machine: {info['platform']}, {info['cpu_count']} CPUs ({info['torch_threads']} torch threads)"
          f"{load_text}; python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, "
          f"bitsandbytes {info['bitsandbytes']}, hivemind {info['hivemind']}")
    print(f"- command: `{info['command']}`")
    print(f"- machine speed probe (512x512 fp32 matmul): {info['probe_gflops_start']:.1f} GFLOP/s at start, "
          f"{info['probe_gflops_end']:.1f} at end")
    for note in notes:
        print(f"- {note}")
    print()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def paired_stats(a: Sequence[float], b: Sequence[float]) -> dict:
    """Per-pair ratios a_i / b_i of interleaved measurements: their median, min and max, and
    the ratio of the two medians. Pairing cancels load drift that hits both halves of a pair."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
            "ratio_of_medians": statistics.median(a) / statistics.median(b), "ratios": ratios}


def write_json(script_file: str, payload: dict) -> Path:
    """bench-out/<script-name>.json (git-ignored)."""
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{Path(script_file).stem}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def gib(n: float) -> str:
    return f"{n / 1024 ** 3:.2f}"
