"""Options shared by the commands of every `p2ptrain` command module (cli.py and the
cli_*.py modules it registers), kept here so no module has to import cli.py."""

from __future__ import annotations

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
