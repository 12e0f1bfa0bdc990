"""The `p2ptrain` command line: each command is a thin shell over the packages.

Errors the user can fix are printed as one line and exit with the code of their kind
(see p2ptrain.errors); `--json` prints machine-readable state on stdout.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from p2ptrain import __version__
from p2ptrain.errors import UserError


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


def run_options(f):
    """--home and --run-config, shared by every command that uses a run."""
    f = click.option("--run-config", "run_config", default=None, metavar="FILE|PRESET",
                     help="Run config TOML, or a packaged preset: default, gpu. [default: default]")(f)
    f = click.option("--home", default=None, type=click.Path(file_okay=False),
                     help="Node home directory (checkpoints, identity, logs). "
                          "[default: $P2PTRAIN_HOME or the platform's user data dir]")(f)
    return f


def data_option(f):
    return click.option("--data", "data", multiple=True, type=click.Path(),
                        help="Directory or file of .txt/.md/.py/.jsonl documents (repeatable). "
                             "[default: the built-in corpus, this machine's Python standard library]")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def _context(home, run_config):
    from p2ptrain.config import RunConfig
    from p2ptrain.home import resolve_home
    return resolve_home(home), RunConfig.load(run_config)


def _docs_loader(config, data):
    from p2ptrain.data.corpus import load_documents
    return functools.partial(load_documents, list(data) or None, config.data.max_doc_chars)


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
    _, config = _context(home, run_config)
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
    home, config = _context(home, run_config)
    load_docs = _docs_loader(config, data)
    docs = load_docs()
    state = load_or_create_run_state(home, config, lambda: docs)
    train, heldout = split_heldout(docs, config.data.heldout_percent)
    routes = state.router.route([d.text for d in train])
    shares = shard_shares(routes, state.grid.num_paths)
    rows = []
    for i, path in enumerate(state.grid.paths()):
        chars = sum(len(d.text) for d, r in zip(train, routes) if r == i)
        rows.append({"path": path_name(path), "docs": int((routes == i).sum()), "chars": chars,
                     "share": float(shares[i])})
    summary = {"docs": len(docs), "train_docs": len(train), "heldout_docs": len(heldout),
               "min_share": float(shares.min()), "max_share": float(shares.max()), "paths": rows}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{len(docs)} documents: {len(train)} train, {len(heldout)} held out")
    click.echo(f"{'path':<8}{'docs':>8}{'chars':>14}{'share':>9}")
    for row in rows:
        click.echo(f"{row['path']:<8}{row['docs']:>8}{row['chars']:>14,}{row['share']:>9.1%}")
    click.echo(f"balance: min share {shares.min():.1%}, max share {shares.max():.1%} (even: {1 / len(rows):.1%})")


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
    home, config = _context(home, run_config)
    load_docs = _docs_loader(config, data)
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
    with click.progressbar(length=steps, label="train", file=sys.stderr if not as_json else open("/dev/null", "w"),
                           item_show_func=lambda _: f"loss {last['loss']:.3f}  {last['tps']:,.0f} tok/s") as bar:
        for _ in range(rounds):
            n = min(H, steps - done)

            def on_step(report, _bar=bar):
                nonlocal first_loss
                first_loss = report.loss if first_loss is None else first_loss
                _bar.update(report.step - session.inner.step_count + 0)  # refreshed below
                last["loss"], last["tps"] = report.loss, report.tokens_per_s

            start = session.inner.step_count
            _, mean_loss = session.inner_steps(n, on_step=on_step)
            bar.update(session.inner.step_count - start)
            done += n
            session.make_local_global()
            session.round += 1
            ckpt_dir = session.save_checkpoint()
    result = {"path": path_name(path), "steps": done, "first_loss": first_loss, "final_loss": last["loss"],
              "tokens_per_s": last["tps"], "round": session.round, "checkpoint": str(ckpt_dir)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
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
    home, config = _context(home, run_config)
    docs = _docs_loader(config, data)()
    state = load_or_create_run_state(home, config, lambda: docs)
    report = evaluate(state, docs, [home, *map(Path, extra_homes)], resolve_device(device), max_tokens)
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


if __name__ == "__main__":  # pragma: no cover
    main()
