"""Shared fixtures of the unit suite: tiny run configs, small real corpora, data dirs.

Everything here is small on purpose: the whole unit suite must run in well under a
minute on 2 CPU cores.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import Document, load_documents
from p2ptrain.run_state import RunState

# Four topics whose texts share no character at all, so their hashed n-gram features are
# disjoint: a router must put each topic on a path of its own.
TOPIC_ALPHABETS = ("abcdef", "ghijkl", "mnopqr", "stuvwx")

# A run small enough to train a few steps in well under a second on a CPU.
TINY_RUN = {
    "run": {"id": "unit-tiny", "seed": 0},
    "model": {"d_model": 32, "n_heads": 2, "context": 32},
    "grid": {"levels": [2, 2], "blocks_per_level": 1},
    "inner": {"batch_size": 8, "lr": 1e-2, "warmup_steps": 5, "steps_per_round": 30, "total_rounds": 1},
    "router": {"kmeans_iters": 10},
}

TINY_RUN_TOML = """\
[run]
id = "unit-cli"
seed = 0

[model]
d_model = 32
n_heads = 2
context = 16

[grid]
levels = [2, 2]
blocks_per_level = 1

[data]
heldout_percent = 20.0

[inner]
batch_size = 4
steps_per_round = 2
warmup_steps = 1
"""


def topic_text(topic: int, index: int, chars: int = 600) -> str:
    """Deterministic words drawn from one topic's alphabet, about `chars` characters long."""
    rng = random.Random(f"{topic}/{index}")
    words, size = [], 0
    while size < chars:
        word = "".join(rng.choice(TOPIC_ALPHABETS[topic]) for _ in range(rng.randint(2, 7)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def write_topic_docs(directory: Path, docs_per_topic: int = 10, chars: int = 600) -> Path:
    """A data dir of .txt documents, `docs_per_topic` for each of the four topics."""
    directory.mkdir(parents=True, exist_ok=True)
    for topic in range(len(TOPIC_ALPHABETS)):
        for i in range(docs_per_topic):
            (directory / f"topic{topic}-{i:03d}.txt").write_text(topic_text(topic, i, chars) + "\n")
    return directory


@pytest.fixture
def tiny_config() -> RunConfig:
    return RunConfig.from_dict(TINY_RUN)


@pytest.fixture(scope="session")
def stdlib_docs() -> list[Document]:
    """A few hundred real documents: the start of the built-in corpus (Python's stdlib)."""
    return load_documents(None, 4096, max_total_chars=400_000)


@pytest.fixture(scope="session")
def tiny_run_state(stdlib_docs) -> RunState:
    return RunState.create(RunConfig.from_dict(TINY_RUN), stdlib_docs)


@pytest.fixture
def tiny_run_toml(tmp_path) -> Path:
    path = tmp_path / "tiny-run.toml"
    path.write_text(TINY_RUN_TOML)
    return path


@pytest.fixture
def topic_data_dir(tmp_path) -> Path:
    return write_topic_docs(tmp_path / "data")


@pytest.fixture
def make_topic_text():
    """topic_text(topic, index, chars=600): the generator behind `topic_data_dir`."""
    return topic_text


# ---------------------------------------------------------------- the CLI as a user runs it

@pytest.fixture
def cli():
    """Invoke `p2ptrain ARGS...` in-process; returns click's Result (stdout and stderr apart)."""
    from click.testing import CliRunner
    from p2ptrain.cli import main

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args])
    return invoke


def assert_one_line_error(result, exit_code: int, starts_with: str) -> None:
    """A user error: one `error:` line on stderr, the error kind's exit code, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {starts_with}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
