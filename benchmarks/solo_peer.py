"""One peer with averaging switched off: the same `PathSession` (model, AdamW8bit, data
shard, threads) that `p2ptrain join` trains, run flat out with no swarm, printing a JSON
line after every few steps. bench_utilization.py starts four of these side by side (the
swarm's four peers on the same cores) as the reference a swarm peer's tokens/s is divided by.

    python benchmarks/solo_peer.py --run-config run.toml --home DIR --path 0,1 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import load_documents
from p2ptrain.run_state import load_or_create_run_state
from p2ptrain.train.session import PathSession

STEPS_PER_LINE = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", required=True, type=Path)
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--path", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="train this long after start-up")
    args = parser.parse_args()
    config = RunConfig.load(args.run_config)
    docs = load_documents(None, config.data.max_doc_chars)
    state = load_or_create_run_state(args.home, config, lambda: docs)
    path = state.grid.parse_path(args.path)
    session = PathSession(state, path, docs, torch.device("cpu"), args.home)
    print(json.dumps({"event": "ready"}), flush=True)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        tokens, loss = session.inner_steps(STEPS_PER_LINE, log_every=STEPS_PER_LINE)
        print(json.dumps({"event": "steps", "tokens": tokens, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
