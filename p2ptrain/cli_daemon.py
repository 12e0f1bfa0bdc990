"""`p2ptrain daemon …`, `prefs …`, `service …` and `status`: running a node in the
background, politely (see p2ptrain.daemon). Registered on the main group by cli.py."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from p2ptrain.cli_options import (data_option, docs_loader, identity_file, json_option, json_safe,
                                  resolve_initial_peers, run_options, swarm_options)
from p2ptrain.errors import SwarmError, UserError


def home_option(f):
    return click.option("--home", default=None, type=click.Path(file_okay=False),
                        help="Node home directory. [default: $P2PTRAIN_HOME or the platform's user data dir]")(f)


def node_options(f):
    """Everything `join` takes, for `daemon start|run` and `service install`."""
    f = click.option("--max-minutes", default=None, type=click.FloatRange(0, min_open=True),
                     help="Stop cleanly at the first round boundary after this many minutes.")(f)
    f = click.option("--max-rounds", default=None, type=click.IntRange(1), help="Stop cleanly after this many rounds.")(f)
    f = click.option("--no-identity", is_flag=True, help="Use a fresh random identity for this run only.")(f)
    f = click.option("--identity", default=None, type=click.Path(dir_okay=False),
                     help="libp2p identity key file (created if missing). [default: <home>/identity.key]")(f)
    f = click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))(f)
    f = click.option("--path", "path_text", default=None,
                     help="Path to train, e.g. 1,0. [default: the least-covered path]")(f)
    f = click.option("--run-id", default=None, metavar="NAME[@CREATOR]",
                     help="Run to join when no --run-config is given; @CREATOR pins it to its creator.")(f)
    f = click.option("--new-swarm", is_flag=True, help="Start a new DHT (no initial peers).")(f)
    f = click.option("--closed", is_flag=True,
                     help="With --new-swarm: a closed run; only peers you invite take part.")(f)
    f = click.option("--credential", default=None, type=click.Path(dir_okay=False),
                     help="Your invite to a closed run (printed by `p2ptrain invite` on the creator's machine).")(f)
    f = click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
                     help="Serve Prometheus metrics at http://HOST:PORT/metrics and a dashboard at "
                          "http://HOST:PORT/ (0: any free port). [default: off]")(f)
    f = click.option("--metrics-host", default="127.0.0.1", show_default=True,
                     help="Address for --metrics-port; anything but loopback exposes this node's status.")(f)
    return run_options(data_option(swarm_options(f)))


def _places(home, create: bool = True):
    from p2ptrain.home import places
    return places(home, create)


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def forward_args(params: dict, peers: list[str]) -> list[str]:
    """The node options as `daemon run` arguments: paths made absolute (the daemon runs in its
    home, not here), the home made explicit when the user chose one (--home, or
    $P2PTRAIN_HOME, which a service manager does not pass on) and the initial peers
    resolved now (bootstrap_peers.txt is read here)."""
    from p2ptrain.config import PRESETS
    from p2ptrain.home import explicit_home
    args: list[str] = []
    home = explicit_home(params.get("home"))
    if home:
        args += ["--home", _abs(str(home))]
    rc = params.get("run_config")
    if rc:
        args += ["--run-config", rc if rc in PRESETS else _abs(rc)]
    for d in params.get("data") or ():
        args += ["--data", _abs(d)]
    if params.get("new_swarm"):
        args.append("--new-swarm")
    for p in peers:
        args += ["--initial-peers", p]
    for m in params.get("host_maddrs") or ():
        args += ["--host-maddrs", m]
    for m in params.get("announce_maddrs") or ():
        args += ["--announce-maddrs", m]
    if params.get("client_mode"):
        args.append("--client-mode")
    for key, flag in (("run_id", "--run-id"), ("path_text", "--path"), ("device", "--device"),
                      ("max_rounds", "--max-rounds"), ("max_minutes", "--max-minutes"),
                      ("metrics_port", "--metrics-port")):
        if params.get(key) is not None:
            args += [flag, str(params[key])]
    if params.get("identity"):
        args += ["--identity", _abs(params["identity"])]
    if params.get("metrics_port") is not None and params.get("metrics_host") not in (None, "127.0.0.1"):
        args += ["--metrics-host", params["metrics_host"]]
    if params.get("closed"):
        args.append("--closed")
    if params.get("credential"):
        args += ["--credential", _abs(params["credential"])]
    if params.get("no_identity"):
        args.append("--no-identity")
    return args


def _resolve_peers(params: dict) -> list[str]:
    if params.get("closed") and not params.get("new_swarm"):
        raise SwarmError("--closed goes with --new-swarm: only a run's creator decides who may join it")
    peers, source = resolve_initial_peers(params.get("initial_peers") or (), params.get("bootstrap_file"),
                                   params.get("new_swarm", False))
    if not peers and not params.get("new_swarm"):
        raise SwarmError(f"no initial peers ({source} lists none): pass --initial-peers ADDR, or start a new "
                         "swarm with --new-swarm")
    return peers


REPAIR_HINT = "`p2ptrain prefs set KEY VALUE` or `prefs reset KEY` repairs the file"


def _check_prefs(places):
    """The preferences; a broken file is a ConfigError (exit 3) naming the bad key."""
    from p2ptrain.daemon.prefs import Preferences
    from p2ptrain.errors import ConfigError
    try:
        return Preferences.load(places.prefs_file)
    except ConfigError as e:
        raise ConfigError(f"{e}; {REPAIR_HINT}") from None


def _load_repairing(places, command: str, key: str | None):
    """The preferences to change: a broken file is repaired (what parses and is allowed is
    kept; the old file stays as prefs.toml.broken), saying so in one line on stderr."""
    from p2ptrain.daemon.prefs import Preferences
    from p2ptrain.errors import ConfigError
    from p2ptrain.home import write_private
    path = places.prefs_file
    try:
        return Preferences.load(path)
    except ConfigError:
        kept, dropped = Preferences.salvage(path)
    backup = path.with_name(path.name + ".broken")
    write_private(backup, path.read_text(encoding="utf-8", errors="replace"))
    lost = [text for k, text in dropped if k != key]  # the key being changed is replaced anyway
    click.echo(f"{command}: {path} was broken; repaired it" + (f", leaving out {'; '.join(lost)}" if lost else "")
               + f" (the old file is {backup.name})", err=True)
    return kept


def _echo_json(obj) -> None:
    click.echo(json.dumps(json_safe(obj), indent=2, allow_nan=False))


# ------------------------------------------------------------------- daemon

@click.group()
def daemon() -> None:
    """Run a node in the background, with BOINC-style computing preferences."""


@daemon.command()
@node_options
@json_option
def start(as_json, **params) -> None:
    """Start the daemon in the background and return: pid, log file, control socket."""
    from p2ptrain.daemon import service
    places = _places(params.get("home"))
    _check_prefs(places)
    running = service.running_node(places)
    if running is not None:
        raise service.AlreadyRunning(f"a p2ptrain node is already running in this home ({running.kind}, pid "
                                     f"{running.pid}); `p2ptrain daemon status` shows it")
    peers = _resolve_peers(params)
    process = service.spawn_detached(places, forward_args(params, peers))
    status = service.wait_until_answering(places, process)
    info = {"pid": process.pid, "log_file": str(places.log_file), "socket": status["socket"],
            "state": status["state"], "home": str(places.data)}
    if as_json:
        _echo_json(info)
        return
    click.echo(f"p2ptrain daemon started: pid {process.pid} ({status['state']})")
    click.echo(f"  log file:       {places.log_file}")
    click.echo(f"  control socket: {status['socket']}")
    click.echo("`p2ptrain daemon status` shows what it does; `p2ptrain daemon stop` stops it.")


@daemon.command()
@node_options
@click.option("--detached", is_flag=True, hidden=True, help="Started by `daemon start`: log to the file only.")
def run(detached, max_rounds, max_minutes, **params) -> None:
    """The daemon in the foreground (for systemd / launchd): no fork, logs also to stderr."""
    from p2ptrain.config import RunConfig
    from p2ptrain.daemon import service
    from p2ptrain.swarm.dht import PUBLIC_MADDRS
    places = _places(params.get("home"))
    _check_prefs(places)
    peers = _resolve_peers(params)
    given = RunConfig.load(params["run_config"]) if params.get("run_config") else None
    credential = None
    if params.get("credential"):
        try:
            credential = Path(params["credential"]).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SwarmError(f"cannot read --credential {params['credential']}: "
                             f"{getattr(e, 'strerror', None) or e}") from None

    def open_fn():
        from p2ptrain.swarm.join import JoinOptions, open_node
        options = JoinOptions(initial_peers=peers, new_swarm=params["new_swarm"],
                              host_maddrs=list(params["host_maddrs"]) or PUBLIC_MADDRS,
                              announce_maddrs=list(params["announce_maddrs"]) or None,
                              client_mode=params["client_mode"],
                              identity_path=identity_file(places.data, params["identity"], params["no_identity"]),
                              path=params["path_text"], run_config=given, run_id=params["run_id"],
                              device=params["device"], closed=params["closed"], credential=credential)
        opened = open_node(options, places.data, docs_loader(given or RunConfig.load(), params["data"], places.data))
        from p2ptrain.home import identity_path, secure_key_file
        secure_key_file(identity_path(places.data))
        return opened

    metrics = (params["metrics_host"], params["metrics_port"]) if params["metrics_port"] is not None else None
    code = service.run_daemon(places, open_fn, detached=detached, max_rounds=max_rounds, max_minutes=max_minutes,
                              metrics=metrics)
    # Everything is closed and on disk. Tearing down the interpreter (freeing the model, torch's
    # and hivemind's modules) took 2 to 6 s on a busy machine; exit handlers (multiprocessing's
    # temp files, logging) still run, the rest is left to the kernel.
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@daemon.command(name="status")
@home_option
@json_option
def daemon_status(home, as_json) -> None:
    """running | suspended (every reason) | stopped, with progress and contribution."""
    show_status(home, as_json)


@daemon.command()
@click.argument("mode", type=click.Choice(["always", "auto", "never"]))
@click.option("--for", "duration", default=None, metavar="DURATION",
              help="Only for this long (e.g. 2h, 30m, 1d), then back to the current mode.")
@home_option
@json_option
def mode(mode, duration, home, as_json) -> None:
    """Run mode: always (ignore the preferences), auto (obey them), never (suspend)."""
    from p2ptrain.daemon import control
    from p2ptrain.daemon.policy import describe, parse_duration
    for_s = parse_duration(duration) if duration else None
    places = _places(home, create=False)
    try:
        reply = control.request(places.runtime, {"cmd": "mode", "mode": mode, "for_s": for_s})
    except control.NotRunning:
        raise UserError("no p2ptrain daemon is running in this home (`p2ptrain daemon start` starts one)") from None
    if not reply.get("ok"):
        raise UserError(reply.get("error", "the daemon refused"))
    if as_json:
        _echo_json(reply)
        return
    click.echo(f"run mode: {reply['mode_text']}; now {describe(reply['suspended'])}")


@daemon.command()
@home_option
@click.option("--timeout", default=180.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for the node and its p2pd to exit.")
def stop(home, timeout) -> None:
    """Stop gracefully; returns when the process and its p2pd are gone."""
    from p2ptrain.daemon import service
    pid, seconds = service.stop_node(_places(home, create=False), timeout)
    click.echo(f"stopped (pid {pid}) in {seconds:.1f} s")


@daemon.command()
@home_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C ends).")
@click.option("-n", "--lines", default=40, show_default=True, type=click.IntRange(0), help="Lines to show.")
def logs(home, follow, lines) -> None:
    """Show the daemon's log (and follow it across rotations with -f)."""
    places = _places(home, create=False)
    path = places.log_file
    if not path.exists():
        raise UserError(f"no daemon log yet ({path})")
    with open(path, "rb") as f:
        tail = f.read().decode("utf-8", "replace").splitlines()[-lines:] if lines else []
    for line in tail:
        click.echo(line)
    if not follow:
        return
    f = open(path, "rb")
    f.seek(0, os.SEEK_END)
    inode = os.fstat(f.fileno()).st_ino
    try:
        while True:
            chunk = f.read()
            if chunk:
                click.echo(chunk.decode("utf-8", "replace"), nl=False)
                continue
            time.sleep(0.5)
            try:
                if os.stat(path).st_ino != inode:  # rotated: read the new file from its start
                    f.close()
                    f = open(path, "rb")
                    inode = os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                pass
    finally:
        f.close()


# ------------------------------------------------------------------- status

def show_status(home, as_json: bool) -> None:
    from p2ptrain.daemon import control, service
    places = _places(home, create=False)  # looking creates nothing, not even the home
    status = None
    if places.data.is_dir():
        try:
            reply = control.request(places.runtime, {"cmd": "status"})
            status = reply["status"] if reply.get("ok") else None
        except control.NotRunning:
            pass
    if status is None:
        status = service.offline_status(places)
    if as_json:
        _echo_json(status)
        return
    click.echo(format_status(status))


def format_status(s: dict) -> str:
    from p2ptrain.daemon.policy import describe, format_duration
    lines = []
    if s["state"] == "stopped" and s.get("home_exists") is False:
        lines.append(f"p2ptrain: stopped (no node runs in {s['home']}: the directory does not exist)")
    elif s["state"] == "stopped":
        lines.append("p2ptrain: stopped (no node runs in this home)")
        if s.get("stale_pid_file"):
            lines.append(f"  stale pid file: {s['stale_pid_file']} (removed at the next start)")
        last = s.get("last_exit")
        if last:
            when = format_duration(time.time() - float(last.get("time", time.time())))
            lines.append(f"  last daemon: {last.get('message')} (exit {last.get('code')}, {when} ago)")
    else:
        what = "daemon" if s["kind"] == "daemon" else "join (foreground)"
        state = describe(s["suspended"]) if s["state"] in ("running", "suspended") else s["state"]
        lines.append(f"p2ptrain {what}: {state}")
        extra = [f"pid {s['pid']}", f"up {format_duration(s['uptime_s'])}"]
        if s.get("mode_text"):
            extra.append(f"mode {s['mode_text']}")
        lines.append("  " + ", ".join(extra))
        if s.get("activity_signal"):
            r = s.get("readings") or {}
            idle = r.get("idle_s")
            cpu = r.get("others_cpu_pct")
            bits = [f"user activity from {s['activity_signal']}"]
            if idle is not None:
                bits.append(f"idle {format_duration(idle)}")
            if cpu is not None:
                bits.append(f"other programs {cpu:.0f}% CPU")
            if r.get("battery"):
                b = r["battery"]
                bits.append(f"battery {b['percent']:.0f}% {'plugged in' if b['plugged'] else 'discharging'}")
            lines.append("  " + "; ".join(bits))
        if s.get("dashboard"):
            lines.append(f"  dashboard: {s['dashboard']}  (Prometheus: {s['dashboard']}metrics)")
        if s.get("prefs_error"):
            lines.append(f"  preferences: {s['prefs_error']} (the last good ones apply)")
        node = s.get("node")
        if node:
            loss = f"{node['loss']:.3f}" if node.get("loss") is not None else "-"
            lines.append(f"  run {node['run_id']}, path {node['path']} ({', '.join(node['modules'])}), "
                         f"round {node['round']}, loss {loss}, {node['tokens_per_s']:,.0f} tok/s")
            if s["state"] == "suspended":
                lines.append(f"  memory: {memory_text(node, s.get('leave_apps_in_memory'))}")
            peers = node.get("last_round") or {}
            if peers:
                lines.append("  peers per module (last round): "
                             + "  ".join(f"{m}:{v['peers']}" + ("" if v["outcome"] == "ok" else f" ({v['outcome']})")
                                         for m, v in peers.items()))
            lines.append(f"  this session: {node['rounds_done']} rounds, {node['tokens']:,} tokens; "
                         f"reachability {node['reachability']}")
        elif s["state"] == "starting":
            lines.append("  starting: joining the swarm and loading the model")
    ckpt = s.get("checkpoint")
    if ckpt:
        text = f"round {ckpt['round']}, {format_duration(ckpt['age_s'])} ago ({ckpt['dir']})"
        lines.append(f"  last checkpoint: {text}")
        if ckpt.get("error"):
            lines.append(f"  checkpoint problem: {ckpt['error']}")
    c = s.get("contributed")
    if c is not None:
        lines.append(f"  contributed since install: {c['tokens']:,} tokens, {c['rounds']:,} rounds "
                     f"({c.get('rounds_averaged', 0):,} averaged with peers), {c['hours']:.1f} h")
    if s.get("log_file") and s["state"] != "stopped":
        lines.append(f"  log: {s['log_file']}")
    return "\n".join(lines)


def memory_text(node: dict, leave_in_memory: bool | None) -> str:
    """Where a suspended node's model is (leave_apps_in_memory)."""
    device = node.get("device") or "?"
    if node.get("offloaded"):
        return "model and optimizer state moved to RAM, GPU memory freed"
    if not device.startswith("cuda"):
        return f"training on {device}: nothing to free while suspended"
    if leave_in_memory:
        return f"model kept on {device} (leave_apps_in_memory = true)"
    return f"model still on {device} until the node reaches a safe point"


@click.command(name="status")
@home_option
@json_option
def status_command(home, as_json) -> None:
    """What the node of this home is doing (the daemon or a foreground join)."""
    show_status(home, as_json)


# -------------------------------------------------------------------- prefs

@click.group()
def prefs() -> None:
    """Computing preferences (BOINC's names), applied by a running daemon within seconds."""


@prefs.command()
@home_option
@json_option
def show(home, as_json) -> None:
    """Every preference: value, default, meaning (* = set in prefs.toml)."""
    from p2ptrain.daemon.prefs import PREFS, format_value
    places = _places(home)
    current = _check_prefs(places)
    if as_json:
        _echo_json({"file": str(places.prefs_file), "values": current.values, "changed": sorted(current.changed)})
        return
    click.echo(f"# {places.prefs_file}")
    width = max(len(p.name) for p in PREFS)
    for p in PREFS:
        mark = "*" if p.name in current.changed else " "
        click.echo(f"{mark}{p.name:<{width}}  {format_value(current.values[p.name]):>8}  "
                   f"(default {format_value(p.default)}, {p.unit})  {p.meaning}")


@prefs.command(name="set")
@click.argument("key")
@click.argument("value")
@home_option
def set_(key, value, home) -> None:
    """Set one preference (validated; a running daemon applies it at once)."""
    from p2ptrain.daemon.prefs import format_value, parse_cli_value
    places = _places(home)
    parsed = parse_cli_value(key, value)  # a bad KEY or VALUE leaves the file as it is
    _load_repairing(places, "prefs set", key).with_value(key, parsed).save(places.prefs_file)
    click.echo(f"{key} = {format_value(parsed)}{_notify_daemon(places)}")


@prefs.command()
@click.argument("key", required=False)
@home_option
def reset(key, home) -> None:
    """Back to the default: one preference, or all of them."""
    from p2ptrain.daemon.prefs import Preferences, check_key
    places = _places(home)
    if key:
        check_key(key, "prefs reset")  # a bad KEY leaves the file as it is
    current = _load_repairing(places, "prefs reset", key) if key else Preferences.defaults()
    current.without(key).save(places.prefs_file)
    click.echo(f"{key or 'all preferences'} reset to the default{_notify_daemon(places)}")


def _notify_daemon(places) -> str:
    from p2ptrain.daemon import control
    try:
        reply = control.request(places.runtime, {"cmd": "reload"})
    except control.NotRunning:
        return ""
    return "; the running daemon applied it" if reply.get("ok") else f"; the daemon says: {reply.get('error')}"


# ------------------------------------------------------------------ service

@click.group()
def service() -> None:
    """Run the daemon at login: a systemd --user unit (Linux) or a launchd agent (macOS)."""


def _service_target(f):
    f = click.option("--target", type=click.Choice(["systemd", "launchd"]), default=None,
                     help="Service manager. [default: launchd on macOS, systemd elsewhere]")(f)
    f = click.option("--user/--system", "user", default=True, show_default=True,
                     help="A per-user service (runs while you are logged in, or always with linger), "
                          "or a system unit (needs root).")(f)
    return f


@service.command()
@_service_target
@node_options
def install(user, target, **params) -> None:
    """Write the service file that runs `p2ptrain daemon run` with these options, and print
    how to enable it."""
    from p2ptrain.daemon.units import default_target, service_file
    from p2ptrain.home import private_dir
    places = _places(params.get("home"))
    _check_prefs(places)
    peers = _resolve_peers(params)
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    unit = service_file(target or default_target(), user, forward_args(params, peers), places.logs, env)
    try:
        private_dir(places.logs)
        unit.path.parent.mkdir(parents=True, exist_ok=True)
        unit.path.write_bytes(unit.content)
    except OSError as e:
        raise UserError(f"cannot write {unit.path}: {e.strerror}"
                        + (" (a system unit needs root; or use --user)" if not user else "")) from None
    click.echo(f"wrote {unit.path}")
    click.echo("enable and start it with:")
    for cmd in unit.enable:
        click.echo(f"  {cmd}")


@service.command()
@_service_target
def uninstall(user, target) -> None:
    """Stop and disable the service, and remove its file."""
    import shlex
    import subprocess
    from p2ptrain.daemon.units import default_target, service_file
    unit = service_file(target or default_target(), user, [], Path("."))
    if not unit.path.exists():
        raise UserError(f"no service file at {unit.path}")
    for cmd in unit.disable:
        argv = shlex.split(cmd)
        if argv[0] == "sudo":
            click.echo(f"run this first if the service is enabled: {cmd}")
            continue
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=200)
            click.echo(f"{cmd}: {'done' if done.returncode == 0 else (done.stderr.strip() or 'failed')}")
        except (OSError, subprocess.SubprocessError) as e:
            click.echo(f"{cmd}: could not run it ({e})")
    unit.path.unlink()
    click.echo(f"removed {unit.path}")


def register(main: click.Group) -> None:
    for command in (daemon, prefs, service, status_command):
        main.add_command(command)
