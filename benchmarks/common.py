"""Helpers shared by the micro-benchmarks (inner throughput, optimizer memory, compression),
and through quality_common by the quality benchmarks:
the machine header printed above every table, markdown tables, paired-timing statistics,
the real path session they train, and the JSON and PNG written to bench-out/<script-name>.*
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
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench-out"
QUICK_CORPUS_CHARS = 1_500_000  # --quick: a prefix of the default corpus, so setup takes seconds


def base_parser(description: str, quick_help: str = "smoke run (< 60 s): smaller sizes, fewer repeats",
                threads: bool = True) -> argparse.ArgumentParser:
    """--quick, and --threads unless the script sets its own threads (threads=False)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if threads:
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


def write_json(name: str, payload: dict) -> Path:
    """bench-out/<name>.json (git-ignored)."""
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def write_plot(name: str, draw: Callable[[Any], Any]) -> Path | None:
    """bench-out/<name>.png: draw(pyplot) returns the figure. Without matplotlib: a printed
    note and None."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; `pip install matplotlib` to get one)")
        return None
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{name}.png"
    figure = draw(plt)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_outputs(script_file: str, payload: dict, draw: Callable[[Any], Any] | None = None) -> None:
    """bench-out/<script-name>.json, and .png when draw is given (see write_plot)."""
    name = Path(script_file).stem
    written = [write_json(name, payload)]
    png = write_plot(name, draw) if draw is not None else None
    if png is not None:
        written.append(png)
    print(f"({', '.join(str(p.relative_to(REPO)) for p in written)})")


def gib(n: float) -> str:
    return f"{n / 1024 ** 3:.2f}"


# ------------------------------------------------ the real objects `p2ptrain train` builds

def parse_path(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1), as the CLI's --path."""
    return tuple(int(i) for i in text.split(","))


# DiLoCo's outer step (Nesterov, lr 0.7, momentum 0.9): the one every quality benchmark here
# was measured at, and the presets' until 2026-12-06. The `default` preset has since moved to
# (1.0, 0.5), chosen at its own size (bench_fragments --preset-model); the benchmarks keep
# this reference, so the commands README quotes still give the numbers it quotes.
DILOCO_OUTER = (0.7, 0.9)


def default_run(quick: bool, outer: tuple[float, float] | None = None):
    """The default preset (with outer (lr, momentum) in place of its own, if given), the
    default corpus (a prefix of it with --quick) and a run state with its router fitted on
    that corpus. Returns (config, run_state, documents)."""
    from p2ptrain.config import RunConfig
    from p2ptrain.data.corpus import load_documents
    from p2ptrain.run_state import RunState

    cfg = RunConfig.load()
    if outer is not None:
        cfg.outer.lr, cfg.outer.momentum = outer
    docs = load_documents(None, cfg.data.max_doc_chars, max_total_chars=QUICK_CORPUS_CHARS if quick else None)
    return cfg, RunState.create(cfg, docs), docs


def open_session(state, docs, path: tuple[int, ...]):
    """A CPU `PathSession` of path in a throw-away home (nothing here saves checkpoints)."""
    from p2ptrain.train.session import PathSession

    home = Path(tempfile.mkdtemp(prefix="p2ptrain-bench-"))
    return PathSession(state, path, docs, torch.device("cpu"), home)


def corpus_note(quick: bool, docs: Sequence) -> str:
    prefix = f", first {QUICK_CORPUS_CHARS:,} chars" if quick else ""
    return f"corpus: default (this machine's Python stdlib{prefix}), {len(docs):,} documents"


class Stopwatch:
    """Wall-clock and this process's CPU seconds of a `with` block. CPU time is less
    sensitive to other processes on a shared machine (not immune: they share caches)."""

    def __enter__(self) -> "Stopwatch":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
