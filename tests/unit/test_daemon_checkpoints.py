"""Nothing lost, nothing half-written: a full disk keeps the previous checkpoint, temporary
directories never survive a failure or a kill, and `train --json` is valid JSON even when
the loss is not a number."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from p2ptrain.cli import main
from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import load_documents
from p2ptrain.home import resolve_home
from p2ptrain.run_state import load_or_create_run_state
from p2ptrain.train.checkpoint import TEMP_PREFIX, CheckpointStore, CheckpointWriteError
from p2ptrain.train.session import PathSession

SMALL = {"module": {"w": torch.arange(1000, dtype=torch.float32)}}
LARGE = {"module": {"w": torch.zeros(200_000)}}  # 800 kB: does not fit the 512 kB file system below


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size: str = "512k"):
    """A real file system that fills up: a tmpfs of `size` (needs root), else the test is skipped."""
    mount_point = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temp_dir(tmp_path, caplog):
    with small_filesystem(tmp_path) as disk:
        store = CheckpointStore(disk / "ckpt")
        store.save(1, SMALL, {"round": 1})

        # Execute: a synchronous save and a background save that do not fit
        with pytest.raises(CheckpointWriteError) as caught:
            store.save(2, LARGE, {})
        with caplog.at_level(logging.ERROR, logger="p2ptrain.train.checkpoint"):
            store.save_in_background(3, LARGE, {})
            store.wait()
        left = sorted(p.name for p in (disk / "ckpt").iterdir())
        newest = store.load_latest()
        background_error = store.last_error
        store.save(4, SMALL, {})  # space is back (a small one fits): writes work again
        recovered = store.rounds()

    message = "no space left on device; the round 1 checkpoint stays"
    assert str(caught.value).endswith(message)
    assert background_error.endswith(message)
    assert any(message in r.getMessage() for r in caplog.records)
    assert left == ["round-000001"]  # no temp dir, no half checkpoint
    assert newest.round == 1 and torch.equal(newest.groups["module"]["w"], SMALL["module"]["w"])
    assert recovered == [1, 4] and store.last_error is None


def test_temp_dirs_of_a_killed_writer_are_removed_when_the_store_opens(tmp_path):
    # Prepare: what a SIGKILL during a write leaves, from a process that is gone, and one in flight
    root = tmp_path / "ckpt"
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = root / f"{TEMP_PREFIX}000007-{gone.pid}"
    live = root / f"{TEMP_PREFIX}000008-{os.getpid()}"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "stem.safetensors").write_bytes(b"half")

    # Execute
    store = CheckpointStore(root)

    # Assert
    assert not stale.exists()
    assert live.exists()  # a write of a live process is not touched
    assert store.rounds() == []


def test_train_json_is_valid_json_when_the_loss_is_not_a_number(tmp_path, tiny_run_toml, topic_data_dir):
    # Prepare: a path whose checkpoint holds a diverged model (NaN weights), written by the real code
    home = resolve_home(tmp_path / "home")
    config = RunConfig.load(str(tiny_run_toml))
    docs = load_documents([str(topic_data_dir)], config.data.max_doc_chars)
    state = load_or_create_run_state(home, config, lambda: docs)
    session = PathSession(state, (0, 0), docs, torch.device("cpu"), home)
    with torch.no_grad():
        for p in session.model.parameters():
            p.fill_(float("nan"))
    session.make_local_global()
    session.round = 1
    session.save_checkpoint()

    # Execute: resume and train on it
    result = CliRunner().invoke(main, ["train", "--json", "--steps", "2", "--home", str(home), "--run-config",
                                       str(tiny_run_toml), "--data", str(topic_data_dir)])

    # Assert: strict JSON (no NaN), the losses reported as null
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["first_loss"] is None and report["final_loss"] is None
    assert report["steps"] == 2 and report["round"] == 2
