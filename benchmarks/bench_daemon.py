"""The daemon's cost: its training speed against a foreground `join` in the same run at the
same time, seconds from SIGTERM to exit, seconds from resume to the first inner step, and
the CPU it uses while suspended (goal: under 1 % of one core).

Every node is a real process on 127.0.0.1: a foreground `p2ptrain join` and a
`p2ptrain daemon` train two paths of one run side by side, so both see the same machine
load. The daemon's speed is measured twice: with `low_priority = false` (the daemon's own
overhead: policy thread, control socket) and with the default `low_priority = true`
(nice 19: it yields the CPU to the foreground node, on purpose).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, base_parser, machine_info, markdown_table, print_header, write_outputs  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
QUIET = {"suspend_cpu_usage": 0, "disk_min_free_gb": 0, "ram_max_used_busy_frac": 1, "ram_max_used_idle_frac": 1}


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2ptrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env(), timeout=timeout, check=False)


def request(home: Path, message: dict) -> dict:
    from p2ptrain.daemon import control
    return control.request(home / "run", message)


def wait_for(what: str, predicate, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def write_prefs(home: Path, **prefs) -> None:
    from p2ptrain.daemon.prefs import Preferences
    home.mkdir(parents=True, exist_ok=True)
    Preferences.from_dict({**QUIET, **prefs}).save(home / "prefs.toml")


def run_config(path: Path, steps: int, round_seconds: float) -> Path:
    from p2ptrain.config import RunConfig
    config = RunConfig.from_dict({
        "run": {"id": "bench-daemon", "seed": 0},
        "model": {"d_model": 64, "n_heads": 2, "context": 64},
        "grid": {"levels": [2, 2], "blocks_per_level": 1},
        "router": {"kmeans_iters": 5, "sample_docs": 500},
        "inner": {"batch_size": 8, "steps_per_round": steps, "warmup_steps": 1},
        "averaging": {"matchmaking_time": 3.0, "averaging_timeout": 30.0, "round_seconds": round_seconds,
                      "fill_round": False},
    })
    path.write_text(config.to_toml())
    return path


def node_args(config: Path, data: Path, path: str) -> list:
    return ["--run-config", config, "--data", data, "--host-maddrs", LOOPBACK, "--device", "cpu", "--path", path]


class Join:
    def __init__(self, *args):
        self.process = subprocess.Popen([sys.executable, "-m", "p2ptrain.cli", "join", "--json", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                                        env=env(), start_new_session=True)
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def rounds(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "round"]

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(150)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def daemon_rounds(home: Path) -> list[tuple[int, float]]:
    """(round, tokens/s) of each round line in the daemon's log."""
    pattern = re.compile(r"INFO p2ptrain\.daemon\.service: round (\d+) .* ([\d.]+) tok/s")
    out = []
    for line in (home / "logs" / "daemon.log").read_text().splitlines():
        match = pattern.search(line)
        if match:
            out.append((int(match.group(1)), float(match.group(2))))
    return out


def start_daemon(home: Path, *args) -> int:
    done = cli("daemon", "start", "--json", "--home", home, *args)
    if done.returncode != 0:
        raise SystemExit(f"daemon start failed: {done.stderr}")
    return json.loads(done.stdout)["pid"]


def stop_daemon(home: Path) -> float:
    """SIGTERM → every process of the daemon gone, in seconds."""
    pid = json.loads((home / "daemon" / "daemon.pid").read_text())["pid"]
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    psutil.wait_procs([proc], timeout=180)
    exited = time.monotonic() - t0
    psutil.wait_procs(procs, timeout=30)
    return exited


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the daemon's processes by role: main, p2pd, its forked children (DHT and
    averagers) and any helper."""
    proc = psutil.Process(pid)
    roles: dict[str, float] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            role = "main" if p.pid == pid else p.name() if p.name() != "python" else "DHT and averagers"
            roles[role] = roles.get(role, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return roles


def side_by_side(work: Path, config: Path, data: Path, low_priority: bool, rounds: int) -> dict:
    """A join (path 1,0) and a daemon (path 0,0) in one run: tokens/s of each over `rounds` rounds."""
    tag = "nice" if low_priority else "plain"
    join = Join("--home", work / f"join-{tag}", "--new-swarm", *node_args(config, data, "1,0"))
    try:
        joined = wait_for("join", lambda: next((e for e in join.events if e.get("event") == "joined"), None), 300)
        home = work / f"daemon-{tag}"
        write_prefs(home, low_priority=low_priority)
        start_daemon(home, "--initial-peers", joined["maddrs"][0], *node_args(config, data, "0,0"))
        wait_for(f"{rounds} daemon rounds", lambda: len(daemon_rounds(home)) >= rounds + 1, 120 + 30 * rounds)
        daemon = [tps for _, tps in daemon_rounds(home)[1:rounds + 1]]
        first = daemon_rounds(home)[1][0]
        last = daemon_rounds(home)[rounds][0]
        joined_rounds = [e["tokens_per_s"] for e in join.rounds() if first <= e["round"] <= last]
        stop_daemon(home)
    finally:
        join.stop()
    return {"daemon": statistics.median(daemon), "join": statistics.median(joined_rounds),
            "daemon_rounds": daemon, "join_rounds": joined_rounds}


def lifecycle(work: Path, config: Path, data: Path, trials: int, idle_s: float) -> dict:
    """With a second peer running: CPU while suspended, resume → first inner step, SIGTERM → exit."""
    join = Join("--home", work / "join-life", "--new-swarm", *node_args(config, data, "1,0"))
    sigterm, resume, idle_cpu, idle_roles = [], [], [], []
    try:
        joined = wait_for("join", lambda: next((e for e in join.events if e.get("event") == "joined"), None), 300)
        for trial in range(trials):
            home = work / f"daemon-life-{trial}"
            write_prefs(home)
            pid = start_daemon(home, "--initial-peers", joined["maddrs"][0], *node_args(config, data, "0,0"))
            wait_for("a daemon round", lambda: len(daemon_rounds(home)) >= 1, 300)
            # suspended: the CPU of the daemon and all its processes (DHT, averagers, p2pd)
            request(home, {"cmd": "mode", "mode": "never"})
            wait_for("the driver to sit out", lambda: request(home, {"cmd": "status"})["status"]["node"]["state"]
                     == "suspended", 120)
            time.sleep(2.0)
            c0, t0 = tree_cpu_seconds(pid), time.monotonic()
            time.sleep(idle_s)
            c1, elapsed = tree_cpu_seconds(pid), time.monotonic() - t0
            by_role = {role: 100 * (c1[role] - c0.get(role, 0.0)) / elapsed for role in c1}
            idle_cpu.append(sum(by_role.values()))
            idle_roles.append(by_role)
            # resume → the inner optimizer's step counter moves
            steps = request(home, {"cmd": "status"})["status"]["inner_steps"]
            t0 = time.monotonic()
            request(home, {"cmd": "mode", "mode": "auto"})
            wait_for("the first inner step", lambda: request(home, {"cmd": "status"})["status"]["inner_steps"]
                     > steps, 120, poll=0.05)
            resume.append(time.monotonic() - t0)
            time.sleep(3.0)  # training again, maybe averaging: stop wherever it is
            sigterm.append(stop_daemon(home))
    finally:
        join.stop()
    return {"sigterm_s": sigterm, "resume_s": resume, "suspended_cpu_pct": idle_cpu,
            "suspended_cpu_pct_by_process": idle_roles}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], threads=False)
    args = parser.parse_args()
    rounds, trials, idle_s = (3, 1, 20.0) if args.quick else (8, 3, 60.0)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="p2ptrain-bench-daemon-"))
    from tests.unit.conftest import write_topic_docs
    data = write_topic_docs(work / "data", docs_per_topic=40, chars=2000)
    # speed runs: rounds long enough that neither node finishes its steps early
    speed_config = run_config(work / "speed.toml", steps=10_000, round_seconds=10.0)
    life_config = run_config(work / "life.toml", steps=20, round_seconds=6.0)

    plain = side_by_side(work, speed_config, data, low_priority=False, rounds=rounds)
    nice = side_by_side(work, speed_config, data, low_priority=True, rounds=rounds)
    life = lifecycle(work, life_config, data, trials, idle_s)

    rows = [
        ["training speed, daemon / join (low_priority = false: the daemon's own overhead)",
         f"{plain['daemon'] / plain['join']:.2f} ({plain['daemon']:,.0f} / {plain['join']:,.0f} tok/s)", "≈ 1.0"],
        ["training speed, daemon / join (low_priority = true, the default: nice 19)",
         f"{nice['daemon'] / nice['join']:.2f} ({nice['daemon']:,.0f} / {nice['join']:,.0f} tok/s)",
         "≈ 1 on an idle core; less where a core is contended"],
        ["SIGTERM → exit, s (median, max)", f"{statistics.median(life['sigterm_s']):.1f}, "
         f"{max(life['sigterm_s']):.1f}", "< 90 (systemd)"],
        ["resume → first inner step, s (median, max)", f"{statistics.median(life['resume_s']):.2f}, "
         f"{max(life['resume_s']):.2f}", "seconds"],
        ["CPU while suspended, % of one core (all its processes; median, max)",
         f"{statistics.median(life['suspended_cpu_pct']):.2f}, {max(life['suspended_cpu_pct']):.2f}", "< 1"],
    ]
    print_header("Daemon: overhead, stop, resume, suspended CPU", info, [
        f"two real nodes on 127.0.0.1 (a foreground join and a daemon, paths 1,0 and 0,0 of a 2x2 grid, "
        f"d_model 64), medians over {rounds} rounds side by side; lifecycle numbers over {trials} daemon "
        f"start(s) with the join peer running; suspended CPU measured over {idle_s:.0f} s",
    ])
    print(markdown_table(["measure", "measured", "target"], rows))
    roles = sorted({r for trial in life["suspended_cpu_pct_by_process"] for r in trial})
    print("\nCPU while suspended by process, % of one core (median over trials):\n")
    print(markdown_table(roles, [[f"{statistics.median(t.get(r, 0.0) for t in life['suspended_cpu_pct_by_process']):.2f}"
                                  for r in roles]]))
    write_outputs(__file__, {"info": info, "plain": plain, "nice": nice, "lifecycle": life, "rows": rows})


if __name__ == "__main__":
    main()
