"""Churn: a swarm whose peers keep joining and leaving for minutes around one peer that
stays. Do rounds keep succeeding, and do the resident's memory and open file descriptors
stay bounded? (hivemind's averager once leaked per group it joined, its issue #264.)

Real nodes opened as `p2ptrain join` opens them, in this one process (threads stand in
for machines), on 127.0.0.1, one 1-level path so every peer averages both modules with
every other. Each round all live peers run one round; then the oldest visitors leave
(their DHT, averagers and p2pd shut down) and as many new ones join (state download
included). Measured after every round:

  resident RSS   RSS of the resident's processes together: its DHT process, the p2pd
                 daemon under it and one averager process per module (the training
                 process itself is shared with the other in-process peers, so it is left out)
  resident fds   open file descriptors of the same processes
  groups         the size of the resident's group for each module (1 = averaged alone)

    python benchmarks/bench_churn.py [--live 16] [--replace 4] [--rounds 20] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import multiprocessing as mp  # noqa: E402

mp.set_start_method("fork", force=True)  # hivemind's averagers are forked processes

from common import base_parser, machine_info, markdown_table, print_header, write_outputs  # noqa: E402

from p2ptrain.data.corpus import load_documents  # noqa: E402
from tests.faults.churn import run_churn  # noqa: E402
from tests.swarm.conftest import Swarm, swarm_config  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], quick_help="6 live peers, 4 rounds", threads=False)
    parser.add_argument("--live", type=int, default=16, help="peers live at once, the resident included")
    parser.add_argument("--replace", type=int, default=4, help="visitors that leave and join after each round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-seconds", type=float, default=12.0)
    args = parser.parse_args()
    if args.quick:
        args.live, args.replace, args.rounds = 6, 2, 4
    info = machine_info()
    config = swarm_config("churn-bench", levels=(1,), round_seconds=args.round_seconds, averaging_timeout=60.0)
    with tempfile.TemporaryDirectory(prefix="p2ptrain-churn-") as tmp:
        swarm = Swarm(Path(tmp), load_documents(None, 4096))
        try:
            report = run_churn(swarm, config, live=args.live, replace_per_round=args.replace, rounds=args.rounds)
        finally:
            swarm.close()
    samples = report.samples
    rows = [[s.round, s.live, s.joined, f"{s.rss_mb:.0f}", s.fds,
             " ".join(f"{m}:{n}" for m, n in sorted(s.groups.items()))] for s in samples]
    warm = samples[min(1, len(samples) - 1)]
    last = samples[-1]
    summary = [
        ["peers in all", last.joined],
        ["rounds", report.rounds],
        ["rounds the resident averaged every module with a peer", f"{report.averaged_rounds()} of {report.rounds}"],
        ["resident RSS after round 2 → last, MB", f"{warm.rss_mb:.0f} → {last.rss_mb:.0f} "
                                                   f"(max {max(s.rss_mb for s in samples):.0f})"],
        ["resident fds after round 2 → last", f"{warm.fds} → {last.fds} (max {max(s.fds for s in samples)})"],
        ["minutes", f"{report.seconds / 60:.1f}"],
    ]
    notes = [f"{args.live} live peers, {args.replace} replaced after each round, {args.rounds} rounds of "
             f"{args.round_seconds:g} s; model d_model {config.model.d_model}, grid [1], fp16 wire"]
    print_header("Churn: peers joining and leaving around a resident (bench_churn.py)", info, notes)
    print(markdown_table(["quantity", "value"], summary))
    print()
    print(markdown_table(["round", "live peers", "peers so far", "resident RSS MB", "resident fds",
                          "resident's group per module"], rows))
    write_outputs(__file__, {"machine": info, "args": vars(args), "seconds": report.seconds,
                             "samples": [vars(s) for s in samples], "summary": summary, "notes": notes})


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
