"""The `p2ptrain` command line: each command is a thin shell over the packages.

Errors the user can fix are printed as one line and exit with the code of their kind
(see p2ptrain.errors); `--json` prints machine-readable state on stdout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from p2ptrain import __version__
from p2ptrain.cli_options import data_option, home_and_config, initial_peer_options, json_option, json_safe  # noqa: F401
from p2ptrain.cli_options import docs_loader as _docs_loader, identity_file as _identity  # noqa: F401
from p2ptrain.cli_options import listen_options, run_options, swarm_options  # noqa: F401
from p2ptrain.cli_options import resolve_initial_peers as _initial_peers  # noqa: F401
from p2ptrain.errors import UserError
from p2ptrain.swarm.events import averaging_fields, peers_text


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns UserError into one line on stderr and its exit code; Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2ptrain")
def main() -> None:
    """p2ptrain: train a language model together, peer to peer.

    The model is a DiPaCo grid of modules; each node trains one path on its own
    documents and averages the modules it shares with the peers that hold them.
    """
    from p2ptrain.logs import setup_logging
    setup_logging()


# --------------------------------------------------------------------- info

@main.command()
@run_options
@json_option
def info(home, run_config, as_json) -> None:
    """The run: grid, parameters per module and path, memory per path."""
    from p2ptrain.info import run_info, GIB
    _, config = home_and_config(home, run_config)
    report = run_info(config)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    mem = report["memory_per_path_bytes"]
    click.echo(f"run {report['run_id']}: grid {report['grid']} -> {len(report['paths'])} paths "
               f"({', '.join(report['paths'])})")
    click.echo(f"{'module':<14}{'params':>14}{'shared by paths':>18}")
    for mod in report["modules"]:
        click.echo(f"{mod['module']:<14}{mod['params']:>14,}{mod['shared_by_paths']:>18}")
    click.echo(f"params per path: {report['params_per_path']:,}   all modules: {report['params_total']:,}")
    bpp = report["optimizer_bytes_per_param"]
    click.echo(f"optimizer state: AdamW8bit {bpp['adamw8bit']:.2f} B/param, AdamW {bpp['adamw']:.2f} B/param")
    click.echo(f"training memory per path (estimate): {mem['total_8bit'] / GIB:.2f} GiB with AdamW8bit, "
               f"{mem['total_32bit'] / GIB:.2f} GiB with AdamW  (weights {mem['weights'] / GIB:.2f}, "
               f"grads {mem['grads'] / GIB:.2f}, activations {mem['activations'] / GIB:.2f})")
    click.echo(f"a round: {report['inner_steps_per_round']} inner steps, {report['tokens_per_round']:,} tokens")


# ------------------------------------------------------------------- config

@main.command()
@click.option("--run-config", "run_config", default=None, metavar="FILE|PRESET",
              help="Run config TOML, or a packaged preset: default, gpu. [default: default]")
@click.option("--explain", is_flag=True, help="List every key with its default, unit and allowed range.")
def config(run_config, explain) -> None:
    """Print a run config as TOML (a starting point for your own run), or explain its keys."""
    from p2ptrain.config import RunConfig, describe_fields
    if explain:
        for key, default, text in describe_fields():
            click.echo(f"{key} = {default}\n    {text}")
        return
    click.echo(RunConfig.load(run_config).to_toml())


# -------------------------------------------------------------------- route

@main.command()
@run_options
@data_option
@json_option
def route(home, run_config, data, as_json) -> None:
    """Shard sizes per path for local data under the run's router."""
    from p2ptrain.data.corpus import split_heldout
    from p2ptrain.model.grid import path_name
    from p2ptrain.model.router import shard_shares
    from p2ptrain.run_state import load_or_create_run_state
    home, config = home_and_config(home, run_config)
    load_docs = _docs_loader(config, data, home)
    docs = load_docs()
    state = load_or_create_run_state(home, config, lambda: docs)
    from p2ptrain.data.tokenizer import load_tokenizer
    train, heldout = split_heldout(docs, config.data.heldout_percent)
    routes = state.router.route([d.text for d in train])
    tokenizer = load_tokenizer(config.data.tokenizer)
    tokens = [len(tokenizer.encode(d.text)) + 1 for d in train]  # what training consumes, EOS included
    shares = shard_shares(routes, state.grid.num_paths)
    token_shares = shard_shares(routes, state.grid.num_paths, tokens)
    rows = []
    for i, path in enumerate(state.grid.paths()):
        chars = sum(len(d.text) for d, r in zip(train, routes) if r == i)
        rows.append({"path": path_name(path), "docs": int((routes == i).sum()), "chars": chars,
                     "tokens": int(sum(t for t, r in zip(tokens, routes) if r == i)),
                     "share": float(shares[i]), "token_share": float(token_shares[i])})
    summary = {"docs": len(docs), "train_docs": len(train), "heldout_docs": len(heldout),
               "min_share": float(shares.min()), "max_share": float(shares.max()),
               "min_token_share": float(token_shares.min()), "max_token_share": float(token_shares.max()),
               "paths": rows}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{len(docs)} documents: {len(train)} train, {len(heldout)} held out")
    click.echo(f"{'path':<8}{'docs':>8}{'chars':>14}{'tokens':>14}{'doc share':>11}{'token share':>13}")
    for row in rows:
        click.echo(f"{row['path']:<8}{row['docs']:>8}{row['chars']:>14,}{row['tokens']:>14,}{row['share']:>11.1%}"
                   f"{row['token_share']:>13.1%}")
    click.echo(f"balance (tokens, what training consumes): min share {token_shares.min():.1%}, max share "
               f"{token_shares.max():.1%} (even: {1 / len(rows):.1%}); documents {shares.min():.1%}-{shares.max():.1%}")


# -------------------------------------------------------------------- train

@main.command()
@run_options
@data_option
@click.option("--path", "path_text", default=None, help="Path to train, e.g. 1,0. [default: 0,0,...]")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1), help="Inner steps to run.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--fresh", is_flag=True, help="Ignore existing checkpoints of this path and start from init.")
@json_option
def train(home, run_config, data, path_text, steps, device, fresh, as_json) -> None:
    """Train one path on this machine alone (no network); checkpoints every round."""
    from p2ptrain.run_state import load_or_create_run_state
    from p2ptrain.train.inner import resolve_device
    from p2ptrain.train.session import PathSession
    from p2ptrain.model.grid import path_name
    import time
    home, config = home_and_config(home, run_config)
    load_docs = _docs_loader(config, data, home)
    docs = load_docs()
    state = load_or_create_run_state(home, config, lambda: docs)
    grid = state.grid
    path = grid.parse_path(path_text) if path_text else tuple(0 for _ in grid.levels)
    session = PathSession(state, path, docs, resolve_device(device), home)
    if not fresh:
        ckpt = session.restore()
        if ckpt is not None and not as_json:
            click.echo(f"resuming path {path_name(path)} from round {ckpt.round} (step {session.inner.step_count})")
    H = config.inner.steps_per_round
    rounds = math.ceil(steps / H)
    if not as_json:
        click.echo(f"training path {path_name(path)} ({sum(p.numel() for p in session.model.parameters()):,} "
                   f"params, {config.inner.optimizer}) on {len(session.stream):,} tokens of its shard, "
                   f"{steps} steps on {session.device}")
    last = {"loss": float("nan"), "tps": 0.0}
    first_loss = None
    done = 0
    with click.progressbar(length=steps, label="train", file=sys.stderr, hidden=as_json,
                           item_show_func=lambda _: f"loss {last['loss']:.3f}  {last['tps']:,.0f} tok/s") as bar:
        for _ in range(rounds):
            n = min(H, steps - done)
            seen = session.inner.step_count

            def on_step(report, _bar=bar):
                nonlocal first_loss, seen
                first_loss = report.window[0] if first_loss is None else first_loss
                _bar.update(report.step - seen)
                seen = report.step
                last["loss"], last["tps"] = report.loss, report.tokens_per_s

            load_docs.begin_round(session)  # data sources: pick up added, changed, removed files
            t_round = time.perf_counter()
            session.inner_steps(n, on_step=on_step, log_every=max(1, min(10, n // 5)))
            done += n
            session.make_local_global()
            session.round += 1
            ckpt_dir = session.save_checkpoint()
            load_docs.end_round(session, session.round, time.perf_counter() - t_round)  # the ledger
    result = {"path": path_name(path), "steps": done, "first_loss": first_loss, "final_loss": last["loss"],
              "tokens_per_s": last["tps"], "round": session.round, "checkpoint": str(ckpt_dir)}
    if as_json:
        click.echo(json.dumps(json_safe(result), indent=2, allow_nan=False))  # a diverged loss is null, not NaN
    else:
        click.echo(f"loss {first_loss:.3f} -> {last['loss']:.3f}; checkpoint {ckpt_dir}")


# --------------------------------------------------------------------- eval

@main.command(name="eval")
@run_options
@data_option
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--max-tokens", default=32768, show_default=True, type=click.IntRange(1),
              help="Held-out tokens scored per path.")
@click.option("--checkpoints-from", "extra_homes", multiple=True, type=click.Path(file_okay=False),
              help="Also look for path checkpoints in these node homes (repeatable).")
@json_option
def eval_(home, run_config, data, device, max_tokens, extra_homes, as_json) -> None:
    """Routed held-out loss: per path, mixture, and the untrained baseline."""
    from p2ptrain.run_state import load_or_create_run_state
    from p2ptrain.train.evaluate import evaluate
    from p2ptrain.train.inner import resolve_device
    home, config = home_and_config(home, run_config)
    docs = _docs_loader(config, data, home)()
    state = load_or_create_run_state(home, config, lambda: docs)
    with click.progressbar(length=state.grid.num_paths, label="eval", file=sys.stderr, hidden=as_json,
                           item_show_func=lambda path: f"path {path}" if path else "") as bar:
        report = evaluate(state, docs, [home, *map(Path, extra_homes)], resolve_device(device), max_tokens,
                          on_path=lambda path, done, total: bar.update(1, path))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(format_eval(report))


def format_eval(report) -> str:
    lines = [f"{'path':<8}{'docs':>7}{'tokens':>9}{'loss':>9}{'init':>9}{'round':>7}"]
    for p in report.paths:
        loss = f"{p.loss:.3f}" if p.loss is not None else "-"
        rnd = str(p.round) if p.round is not None else "-"
        lines.append(f"{p.path:<8}{p.docs:>7}{p.tokens:>9}{loss:>9}{p.init_loss:>9.3f}{rnd:>7}")
    note = f"; {report.untrained_paths} paths without a checkpoint count at init" if report.untrained_paths else ""
    lines.append(f"mixture loss {report.mixture_loss:.3f} (init {report.mixture_init_loss:.3f}{note})")
    return "\n".join(lines)


# ------------------------------------------------------------------- swarm

def _abort_on_signals() -> None:
    """While a node starts (router fitting, DHT, catch-up) there is no round to finish: SIGINT
    and SIGTERM abort at once, through the same cleanup as Ctrl-C (DHT and p2pd shut down)."""
    import signal

    def abort(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, abort)
    signal.signal(signal.SIGTERM, abort)


def _read_credential(path) -> str | None:
    if path is None:
        return None
    from p2ptrain.errors import SwarmError
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SwarmError(f"cannot read --credential {path}: {getattr(e, 'strerror', None) or e}") from None


def _install_stop_handlers(stop_event) -> None:
    """First Ctrl-C / SIGTERM: stop between rounds. Second Ctrl-C: abort now."""
    from p2ptrain.swarm.signals import stop_on_signals
    stop_on_signals(stop_event, "stopping: abandoning the current round (the last round's checkpoint is kept), "
                                "then leaving the swarm (Ctrl-C again to abort now)")


@main.command()
@run_options
@data_option
@swarm_options
@click.option("--new-swarm", is_flag=True, help="Start a new DHT (no initial peers) and print its address.")
@click.option("--run-id", default=None, metavar="NAME[@CREATOR]",
              help="Run to join when no --run-config is given; @CREATOR pins the run to its creator's peer id "
                   "(printed by the creator), so nobody else's run record is ever used. [default: the default "
                   "run, pinned on first join]")
@click.option("--path", "path_text", default=None, help="Path to train, e.g. 1,0. [default: the least-covered path]")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--identity", default=None, type=click.Path(dir_okay=False),
              help="libp2p identity key file (created if missing). [default: <home>/identity.key]")
@click.option("--no-identity", is_flag=True, help="Use a fresh random identity for this run only.")
@click.option("--max-rounds", default=None, type=click.IntRange(1), help="Stop cleanly after this many rounds.")
@click.option("--max-minutes", default=None, type=click.FloatRange(0, min_open=True),
              help="Stop cleanly at the first round boundary after this many minutes.")
@click.option("--wait-for-peers", default=1, show_default=True, type=click.IntRange(1),
              help="Before the first round, wait (up to 5 minutes) until this many peers, this one included, "
                   "are in the swarm.")
@click.option("--closed", is_flag=True,
              help="With --new-swarm: a closed run; only peers you invite (`p2ptrain invite PEER_ID`) take part.")
@click.option("--credential", default=None, type=click.Path(dir_okay=False),
              help="Your invite to a closed run (a file printed by `p2ptrain invite` on the creator's machine).")
@click.option("--upload-mbps", default=None, type=click.FloatRange(0, min_open=True),
              help="Your upload bandwidth in Mbit/s: each all-reduce gives peers reducing work in proportion to "
                   "their links (within 4x of the group's median), so a slow link carries less, and a group whose "
                   "members all declared fast links waits less for a member that stopped sending. [default: "
                   "unknown, counted as the group's mean]")
# --- monitoring (issue 13)
@click.option("--metrics-port", default=None, type=click.IntRange(0, 65535),
              help="Serve Prometheus metrics at http://HOST:PORT/metrics and a dashboard at http://HOST:PORT/ "
                   "(0: any free port). [default: off]")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address for --metrics-port; anything but loopback exposes this node's status to the network.")
# --- end monitoring
@json_option
def join(home, run_config, data, initial_peers, bootstrap_file, host_maddrs, announce_maddrs, client_mode,
         new_swarm, run_id, path_text, device, identity, no_identity, max_rounds, max_minutes, wait_for_peers,
         closed, credential, upload_mbps, metrics_port, metrics_host, as_json) -> None:
    """Join a swarm (or start one with --new-swarm) and train a path with it.

    Prints this node's multiaddrs; others join with --initial-peers ADDR.
    """
    from p2ptrain.config import RunConfig
    from p2ptrain.home import resolve_home
    from p2ptrain.model.grid import path_name
    from p2ptrain.swarm.dht import PUBLIC_MADDRS
    from p2ptrain.swarm.join import JoinOptions, open_node

    home_option = home
    home = resolve_home(home)
    given = RunConfig.load(run_config) if run_config else None
    peers, source = _initial_peers(initial_peers, bootstrap_file, new_swarm)
    options = JoinOptions(initial_peers=peers, new_swarm=new_swarm, host_maddrs=list(host_maddrs) or PUBLIC_MADDRS,
                          announce_maddrs=list(announce_maddrs) or None, client_mode=client_mode,
                          identity_path=_identity(home, identity, no_identity), path=path_text, run_config=given,
                          run_id=run_id, device=device, closed=closed, credential=_read_credential(credential),
                          upload_mbps=upload_mbps)
    if closed and not new_swarm:
        from p2ptrain.errors import SwarmError
        raise SwarmError("--closed goes with --new-swarm: only a run's creator decides who may join it")
    if not peers and not new_swarm:
        from p2ptrain.errors import SwarmError
        raise SwarmError(f"no initial peers ({source} lists none): pass --initial-peers ADDR, or start a new "
                         "swarm with --new-swarm")
    emit = (lambda obj: click.echo(json.dumps(json_safe(obj), allow_nan=False), nl=True)) if as_json else None
    if not as_json:
        click.echo(f"joining {'a new swarm' if new_swarm else f'{len(peers)} initial peers from {source}'} ...")
    # --- daemon services (p2ptrain.daemon): one node per home, its child processes die with it,
    # and the control socket answers `p2ptrain status` / `daemon stop` for this foreground node
    from p2ptrain.daemon.service import ForegroundServices
    from p2ptrain.home import places
    services = ForegroundServices(places(home_option))
    try:
        _abort_on_signals()  # until the node is up, Ctrl-C or SIGTERM aborts the start cleanly
        opened = open_node(options, home, _docs_loader(given or RunConfig.load(), data, home))
    except BaseException:
        services.close()
        raise
    services.attach(opened)
    # --- end of daemon services
    node = opened.node
    monitoring = (None, None)  # (NodeState, DashboardServer) with --metrics-port (issue 13)
    try:
        _install_stop_handlers(node.stop_requested)
        run_name = opened.run_state.config.run.id
        info = {"event": "joined", "peer_id": node.peer_id, "run_id": run_name,
                "run_pin": f"{run_name}@{opened.creator}", "creator": opened.creator,
                "created_run": opened.created_run, "path": path_name(node.session.path),
                "modules": node.session.module_ids, "maddrs": opened.maddrs, "round": node.round,
                "restored_round": opened.restored_round, "caught_up": opened.caught_up,
                "client_mode": client_mode}
        if emit:
            emit(info)
        else:
            click.echo(f"peer {node.peer_id} {'created' if opened.created_run else 'joined'} run "
                       f"{info['run_id']}; training {node.describe()} from round {node.round}")
            if opened.caught_up:
                click.echo(f"downloaded the current state of {', '.join(opened.caught_up)} from peers")
            if client_mode:
                click.echo("client mode: not reachable from outside; peers are reached through relays")
            click.echo("visible multiaddrs (others pass one to --initial-peers):")
            for addr in opened.maddrs:
                click.echo(f"  {addr}")
            click.echo(f"run pin (others pass it to --run-id): {info['run_pin']}")
        if metrics_port is not None:  # --- monitoring (issue 13)
            from p2ptrain.cli_monitor import start_node_monitor
            monitoring = start_node_monitor(node, metrics_host, metrics_port, emit)
        watched = monitoring[0]
        show_steps = not emit and sys.stderr.isatty()

        def on_step(report):
            if watched is not None:
                watched.on_step(report)
            if show_steps:  # inner-step progress, overwritten in place by the next line
                click.echo(f"\r  step {report.step}  loss {report.loss:6.3f}  {report.tokens_per_s:>9,.0f} tok/s",
                           err=True, nl=False)

        def on_round(report):
            if watched is not None:
                watched.on_round(report)
            if show_steps:
                click.echo("\r\x1b[K", err=True, nl=False)
            if emit:
                emit({"event": "round", "round": report.round, "loss": report.loss, "tokens": report.tokens,
                      "tokens_per_s": report.tokens_per_s, "seconds_inner": report.seconds_inner,
                      "seconds_outer": report.seconds_outer, "seconds_wall": report.seconds_wall,
                      "outer_phases": report.outer_phases, **averaging_fields(report.modules)})
            else:
                click.echo(f"round {report.round:>4}  loss {report.loss:6.3f}  {report.tokens_per_s:>9,.0f} tok/s  "
                           f"outer {report.seconds_outer:5.1f}s  peers {peers_text(report.modules)}")

        def on_landing(landing):
            # overlap: the last round's averaging finished after its round event; say how it went
            if emit:
                emit({"event": "landed", "round": landing.round, **averaging_fields(landing.modules)})
            else:
                click.echo(f"round {landing.round:>4}  averaging landed at stop  peers {peers_text(landing.modules)}")

        if wait_for_peers > 1:
            if not emit:
                click.echo(f"waiting for {wait_for_peers} peers ...")
            seen = node.wait_for_peers(wait_for_peers, timeout_s=300.0)
            if emit:
                emit({"event": "peers", "seen": seen})
            elif seen < wait_for_peers:
                click.echo(f"only {seen} of {wait_for_peers} peers arrived in 5 minutes; starting anyway")
        node.run(max_rounds=max_rounds, max_minutes=max_minutes, on_round=on_round, on_step=on_step,
                 on_landing=on_landing)
        if emit:
            emit({"event": "left", "round": node.round})
        else:
            click.echo(f"left the swarm at round {node.round}; checkpoints in {node.session.store.root}")
    finally:
        if monitoring[0] is not None:
            from p2ptrain.monitor.web import stop_node_server
            stop_node_server(*monitoring)
        opened.close()
        services.close()  # daemon services: release the home, close the control socket


@main.command()
@click.option("--home", default=None, type=click.Path(file_okay=False),
              help="Node home directory (its identity key). [default: $P2PTRAIN_HOME or the user data dir]")
@click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
              help="Other entry nodes to connect to (repeatable). [default: none, a new DHT]")
@listen_options
@click.option("--port", default=31337, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on (0: any free port).")
@click.option("--host", default="0.0.0.0", show_default=True, help="IPv4 address to listen on.")
@click.option("--identity", default=None, type=click.Path(dir_okay=False),
              help="Identity key file, so the entry node's address stays the same across restarts. "
                   "[default: <home>/identity.key]")
@click.option("--run-id", "run_ids", multiple=True,
              help="Runs whose records this node validates (repeatable). [default: the default run]")
@click.option("--max-minutes", default=None, type=click.FloatRange(0, min_open=True), help="Exit after this long.")
@json_option
def bootstrap(home, initial_peers, host_maddrs, announce_maddrs, client_mode, port, host, identity,
              run_ids, max_minutes, as_json) -> None:
    """Run a DHT-only entry node that others list in bootstrap_peers.txt."""
    import threading
    import time as _time
    from p2ptrain.config import RunConfig
    from p2ptrain.home import resolve_home
    from p2ptrain.swarm.dht import start_dht, visible_maddrs
    from p2ptrain.swarm.records import make_validators
    from p2ptrain.swarm.signals import children_ignore_sigint

    home = resolve_home(home)
    _, validators = make_validators(run_ids or [RunConfig.load().run.id])
    with children_ignore_sigint():
        dht = start_dht(list(initial_peers), host_maddrs=list(host_maddrs) or [f"/ip4/{host}/tcp/{port}"],
                        announce_maddrs=list(announce_maddrs) or None, client_mode=client_mode,
                        identity_path=_identity(home, identity, False), record_validators=validators)
    stop = threading.Event()
    try:
        from p2ptrain.swarm.signals import stop_on_signals
        stop_on_signals(stop, "stopping the entry node")
        addrs = visible_maddrs(dht)
        if as_json:
            click.echo(json.dumps({"event": "bootstrap", "peer_id": dht.peer_id.to_base58(), "maddrs": addrs}))
        else:
            click.echo("entry node up; list one of these in bootstrap_peers.txt:")
            for addr in addrs:
                click.echo(f"  {addr}")
        deadline = _time.monotonic() + 60 * max_minutes if max_minutes else None
        while not stop.is_set() and (deadline is None or _time.monotonic() < deadline):
            stop.wait(1.0)
    finally:
        dht.shutdown()


@main.command()
@initial_peer_options
@click.option("--host-maddrs", multiple=True, metavar="MULTIADDR",
              help="Where this short-lived observer listens. [default: /ip4/127.0.0.1/tcp/0]")
@click.option("--run-id", default=None, help="Run to inspect. [default: the default run]")
@click.option("--timeout", default=15.0, show_default=True, type=click.FloatRange(1), help="Seconds to wait.")
@click.option("--watch", is_flag=True, help="Refresh in place every --interval seconds until Ctrl-C "
                                            "(with --json: one JSON object per line).")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.5),
              help="Seconds between refreshes with --watch.")
@json_option
def peers(initial_peers, bootstrap_file, host_maddrs, run_id, timeout, watch, interval, as_json) -> None:
    """List the live peers of a run, module coverage, swarm speed, the outcomes of the peers'
    last rounds, and whether each bootstrap peer answers."""
    from p2ptrain.cli_monitor import run_peers
    run_peers(initial_peers, bootstrap_file, host_maddrs, run_id, timeout, as_json, watch, interval)


# --- monitoring (issue 13)
from p2ptrain.cli_monitor import monitor  # noqa: E402 (registered after the group is defined)

main.add_command(monitor)
# --- end monitoring


# ------------------------------------------------- data, export, generate (issue 15)

from p2ptrain import cli_data  # noqa: E402  (its commands use the helpers above)

main.add_command(cli_data.data_group)
main.add_command(cli_data.export)
main.add_command(cli_data.generate)


# --------------------------------------- daemon, prefs, service, status (issue 12)

from p2ptrain import cli_daemon  # noqa: E402

cli_daemon.register(main)


# ------------------------------------------------------------ identity, invites

@main.command(name="id")
@click.option("--home", default=None, type=click.Path(file_okay=False),
              help="Node home directory. [default: $P2PTRAIN_HOME or the platform's user data dir]")
def id_(home) -> None:
    """Print this node's peer id (creating its identity key if needed): what a closed run's creator invites."""
    from p2ptrain.home import identity_path, resolve_home
    from p2ptrain.swarm.identity import Identity, peer_id_of_public_key
    identity = Identity(identity_path(resolve_home(home)))
    click.echo(peer_id_of_public_key(identity.private_key.get_public_key().to_bytes()))


@main.command()
@click.argument("peer_id")
@click.option("--home", default=None, type=click.Path(file_okay=False),
              help="The run creator's node home (its identity key signs the invite).")
@click.option("--run-id", default=None, help="The closed run. [default: the default run]")
@click.option("--expires", default="30d", show_default=True, help="How long the invite is valid: 30d, 12h, 90m.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the invite here instead of stdout.")
def invite(peer_id, home, run_id, expires, out) -> None:
    """Invite PEER_ID (its `p2ptrain id`) to a closed run you created; prints the credential."""
    from p2ptrain.config import RunConfig
    from p2ptrain.errors import SwarmError
    from p2ptrain.home import identity_path, resolve_home
    from p2ptrain.swarm.credentials import issue, parse_duration
    from p2ptrain.swarm.identity import Identity, peer_id_of_public_key
    from p2ptrain.swarm.join import load_creator_pin
    home = resolve_home(home)
    run_id = run_id or RunConfig.load().run.id
    lifetime = parse_duration(expires)
    if not identity_path(home).exists():
        raise SwarmError(f"{home} has no identity key: run `p2ptrain invite` in the home of the run's creator")
    identity = Identity(identity_path(home))
    me = peer_id_of_public_key(identity.private_key.get_public_key().to_bytes())
    creator = load_creator_pin(home, run_id)
    if creator != me:
        raise SwarmError(f"this home ({me}) did not create run '{run_id}'"
                         + (f" (its creator is {creator})" if creator else "") + ": only the creator can invite")
    text = issue(identity.private_key, run_id, me, peer_id, lifetime).json()
    if out:
        Path(out).write_text(text + "\n")
        click.echo(f"wrote the invite for {peer_id} to {out}", err=True)
    else:
        click.echo(text)


if __name__ == "__main__":  # pragma: no cover
    main()
