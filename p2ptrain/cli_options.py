"""Options shared by the commands of every `p2ptrain` command module (cli.py and the
cli_*.py modules it registers), and the helpers that read them, kept here so no module
has to import cli.py."""

from __future__ import annotations

import math
from pathlib import Path

import click


def run_options(f):
    """--home and --run-config, shared by every command that uses a run."""
    f = click.option("--run-config", "run_config", default=None, metavar="FILE|PRESET",
                     help="Run config TOML, or a packaged preset: default, gpu. [default: default]")(f)
    f = click.option("--home", default=None, type=click.Path(file_okay=False),
                     help="Node home directory (run state, checkpoints, identity, sources, ledger). "
                          "[default: $P2PTRAIN_HOME or the platform's user data dir]")(f)
    return f


def data_option(f):
    return click.option("--data", "data", multiple=True, type=click.Path(),
                        help="Directory or file of .txt/.md/.py/.rst/.jsonl documents (repeatable). "
                             "[default: the registered sources (`p2ptrain data add`), else the built-in "
                             "corpus, this machine's Python standard library]")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def home_and_config(home, run_config):
    """The node's home directory (created if missing) and the run config given."""
    from p2ptrain.config import RunConfig
    from p2ptrain.home import resolve_home
    return resolve_home(home), RunConfig.load(run_config)


def json_safe(obj):
    """`obj` with every NaN or infinity replaced by null: JSON has no NaN, and a diverged
    loss must not make `--json` output unparseable."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def docs_loader(config, data, home):
    """The documents to train on: --data dirs, else the home's registered sources, else the
    built-in corpus. Call it for the documents; its end_round() keeps the ledger and picks up
    changed sources at round boundaries (p2ptrain.data.sources.DocumentFeed)."""
    from p2ptrain.data.sources import DocumentFeed
    from p2ptrain.data.tokenizer import load_tokenizer
    tokenizer = None if config.data.tokenizer == "bytes" else load_tokenizer(config.data.tokenizer)
    return DocumentFeed(home, config.data.max_doc_chars, list(data), tokenizer)


# ------------------------------------------------------------------- swarm

def initial_peer_options(f):
    f = click.option("--initial-peers", multiple=True, metavar="MULTIADDR",
                     help="A peer's full multiaddr (…/p2p/12D3KooW…); repeatable. "
                          "[default: the peers in bootstrap_peers.txt]")(f)
    f = click.option("--bootstrap-file", type=click.Path(dir_okay=False), default=None,
                     help="Read initial peers from this file instead of ./bootstrap_peers.txt.")(f)
    return f


def listen_options(f):
    f = click.option("--host-maddrs", multiple=True, metavar="MULTIADDR",
                     help="Where to listen. [default: /ip4/0.0.0.0/tcp/0, every interface]")(f)
    f = click.option("--announce-maddrs", multiple=True, metavar="MULTIADDR",
                     help="Public addresses to announce (with an explicit port), e.g. behind port forwarding.")(f)
    f = click.option("--client-mode", is_flag=True,
                     help="Behind NAT: don't accept incoming connections; reach peers through relays.")(f)
    return f


def swarm_options(f):
    """How to reach the swarm and where to listen (join)."""
    return initial_peer_options(listen_options(f))


def resolve_initial_peers(initial_peers, bootstrap_file, new_swarm: bool) -> tuple[list[str], str]:
    from p2ptrain.swarm.dht import bootstrap_peers
    if new_swarm:
        return [], "none (new swarm)"
    if initial_peers:
        return list(initial_peers), "--initial-peers"
    return bootstrap_peers(bootstrap_file)


def identity_file(home: Path, identity, no_identity: bool) -> str | None:
    from p2ptrain.home import identity_path
    if no_identity:
        return None
    return str(Path(identity).expanduser()) if identity else str(identity_path(home))
