"""Checkpoints: a path session resumes exactly where it stopped, and corrupt or
truncated checkpoints are detected, reported and skipped in favour of older ones."""

import json
import logging
import os

import pytest
import torch

from p2ptrain.config import RunConfig
from p2ptrain.run_state import RunState
from p2ptrain.train.checkpoint import MANIFEST, CheckpointStore
from p2ptrain.train.session import PathSession

CPU = torch.device("cpu")
CHECKPOINT_LOGGER = "p2ptrain.train.checkpoint"


def tensors(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"stem": {"w": torch.full((64, 64), value)}, "optimizer": {"0/step": torch.tensor([value])}}


@pytest.fixture
def store_with_three_rounds(tmp_path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "ckpt")
    for round_ in (1, 2, 3):
        store.save(round_, tensors(float(round_)), {"step": 10 * round_})
    return store


def newest_dir(store: CheckpointStore):
    return store.root / f"round-{store.rounds()[-1]:06d}"


# ------------------------------------------------------------------ the store

def test_save_then_load_returns_the_same_tensors_and_meta(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)
    groups = {"stem": {"w": torch.randn(3, 4), "b": torch.arange(3)}, "optimizer": {"x": torch.ones(2, dtype=torch.uint8)}}

    # Execute
    directory = store.save(7, groups, {"step": 70, "path": [1, 0]})
    ckpt = store.load(7)

    # Assert
    assert directory == tmp_path / "round-000007"
    assert sorted(p.name for p in directory.iterdir()) == [MANIFEST, "optimizer.safetensors", "stem.safetensors"]
    assert ckpt.round == 7 and ckpt.meta == {"step": 70, "path": [1, 0]}
    for group, values in groups.items():
        assert sorted(ckpt.groups[group]) == sorted(values)
        for name, t in values.items():
            assert torch.equal(ckpt.groups[group][name], t) and ckpt.groups[group][name].dtype == t.dtype


def test_store_keeps_only_the_newest_three_rounds(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path, keep=3)

    # Execute
    for round_ in range(1, 6):
        store.save(round_, tensors(float(round_)), {})

    # Assert
    assert store.rounds() == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000003", "round-000004", "round-000005"]


def test_background_save_writes_the_values_of_the_moment_it_was_called(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)
    groups = tensors(1.0)
    # Act: training changes the tensors while the writer thread runs
    store.save_in_background(7, groups, {"step": 70})
    groups["stem"]["w"].fill_(99.0)
    store.wait()
    # Assert
    loaded = store.load(7)
    assert torch.equal(loaded.groups["stem"]["w"], torch.full((64, 64), 1.0))
    assert loaded.meta == {"step": 70}


def test_a_save_waits_for_the_background_write_before_it(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path, keep=2)
    # Act
    store.save_in_background(1, tensors(1.0), {})
    store.save_in_background(2, tensors(2.0), {})
    store.save(3, tensors(3.0), {})
    # Assert: all three were written in order, and pruning kept the newest two
    assert store.rounds() == [2, 3]
    assert float(store.load_latest().groups["stem"]["w"][0, 0]) == 3.0


def test_a_failed_background_write_is_logged_and_keeps_the_previous_checkpoint(tmp_path, caplog):
    # Prepare: a good round 1; a file squats where round 2's temporary directory goes
    store = CheckpointStore(tmp_path)
    store.save(1, tensors(1.0), {})
    (tmp_path / f".tmp-round-000002-{os.getpid()}").write_text("in the way")
    # Act
    with caplog.at_level(logging.WARNING, logger=CHECKPOINT_LOGGER):
        store.save_in_background(2, tensors(2.0), {})
        store.wait()
    # Assert
    assert "could not write the round 2 checkpoint" in caplog.text
    assert store.load_latest().round == 1


def test_load_latest_returns_the_newest_good_round(store_with_three_rounds):
    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt.round == 3 and ckpt.meta == {"step": 30}
    assert torch.equal(ckpt.groups["stem"]["w"], torch.full((64, 64), 3.0))


def test_load_latest_of_an_empty_store_is_none(tmp_path):
    # Execute / Assert
    assert CheckpointStore(tmp_path / "never-written").load_latest() is None


def test_flipped_bytes_in_newest_file_fall_back_to_previous_round(store_with_three_rounds, caplog):
    # Prepare: flip bytes in the tensor data, keeping the file's length
    path = newest_dir(store_with_three_rounds) / "stem.safetensors"
    data = bytearray(path.read_bytes())
    data[-100:-96] = bytes(b ^ 0xFF for b in data[-100:-96])
    path.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt.round == 2
    assert torch.equal(ckpt.groups["stem"]["w"], torch.full((64, 64), 2.0))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipping corrupt checkpoint" in warnings[0].getMessage()
    assert "round-000003/stem.safetensors: checksum mismatch" in warnings[0].getMessage()


def test_truncated_newest_file_falls_back_to_previous_round(store_with_three_rounds, caplog):
    # Prepare
    path = newest_dir(store_with_three_rounds) / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt.round == 2
    assert "round-000003/optimizer.safetensors: checksum mismatch (corrupt or truncated)" in caplog.text


def test_missing_file_falls_back_to_previous_round(store_with_three_rounds, caplog):
    # Prepare
    (newest_dir(store_with_three_rounds) / "stem.safetensors").unlink()
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt.round == 2
    assert "round-000003/stem.safetensors: missing" in caplog.text


@pytest.mark.parametrize("manifest_text", [
    "{not json",
    "",
    "[1, 2, 3]",
    '{"format": 1, "round": 3, "files": {}}',  # no meta
    '{"format": 1, "rounc": 3, "files": {}, "meta": {}}',  # one flipped byte in a key
    '{"format": 1, "round": 3, "files": ["stem.safetensors"], "meta": {}}',
    '{"format": 1, "round": 3, "files": {}, "meta": []}',
    '{"format": 2, "round": 3, "files": {}, "meta": {}}',
])
def test_corrupt_manifest_falls_back_to_previous_round(store_with_three_rounds, caplog, manifest_text):
    # Prepare
    (newest_dir(store_with_three_rounds) / MANIFEST).write_text(manifest_text)
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt.round == 2
    assert "skipping corrupt checkpoint" in caplog.text and "round-000003" in caplog.text


def test_missing_manifest_falls_back_to_previous_round(store_with_three_rounds, caplog):
    # Prepare: e.g. a crash of an older version between writing files and manifest
    (newest_dir(store_with_three_rounds) / MANIFEST).unlink()
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt.round == 2
    assert "unreadable manifest" in caplog.text


def test_all_checkpoints_corrupt_gives_none_and_keeps_the_files(store_with_three_rounds, caplog):
    # Prepare
    for round_ in store_with_three_rounds.rounds():
        path = store_with_three_rounds.root / f"round-{round_:06d}" / "stem.safetensors"
        path.write_bytes(path.read_bytes()[:-1])
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    ckpt = store_with_three_rounds.load_latest()

    # Assert
    assert ckpt is None
    assert caplog.text.count("skipping corrupt checkpoint") == 3
    assert store_with_three_rounds.rounds() == [1, 2, 3]  # never deleted: the user may inspect them


def test_load_latest_skips_checkpoints_that_accept_refuses(store_with_three_rounds):
    # Execute
    ckpt = store_with_three_rounds.load_latest(accept=lambda c: c.meta["step"] <= 10)

    # Assert
    assert ckpt.round == 1


def test_leftover_temporary_directory_is_not_a_round(store_with_three_rounds):
    # Prepare: what a crash in the middle of save() leaves behind
    (store_with_three_rounds.root / ".tmp-round-000004-123").mkdir()

    # Execute / Assert
    assert store_with_three_rounds.rounds() == [1, 2, 3]
    assert store_with_three_rounds.load_latest().round == 3


# ------------------------------------------------------------ path sessions

def optimizer_tensors(session: PathSession) -> dict[str, torch.Tensor]:
    """The inner optimizer's per-parameter state, keyed by parameter name."""
    return {f"{name}/{key}": value for name, p in session.model.named_parameters()
            for key, value in session.inner.optimizer.state[p].items() if torch.is_tensor(value)}


def test_session_restores_params_optimizer_state_step_and_round(tiny_run_state, stdlib_docs, tmp_path):
    # Prepare
    first = PathSession(tiny_run_state, (1, 0), stdlib_docs, CPU, tmp_path)
    first.inner_steps(5)
    first.make_local_global()
    first.round = 1
    first.save_checkpoint()

    # Execute
    second = PathSession(tiny_run_state, (1, 0), stdlib_docs, CPU, tmp_path)
    ckpt = second.restore()

    # Assert
    assert ckpt.round == 1 and second.round == 1
    assert second.inner.step_count == 5
    assert second.tokens_seen == first.tokens_seen == 5 * 8 * 32
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    theirs = optimizer_tensors(second)
    ours = optimizer_tensors(first)
    assert sorted(theirs) == sorted(ours)
    assert any(t.dtype == torch.uint8 for t in ours.values())
    for key, t in ours.items():
        assert torch.equal(t, theirs[key]) and t.dtype == theirs[key].dtype, key
    for module_id in first.module_ids:
        assert all(torch.equal(a, b) for a, b in zip(first.outer[module_id].momentum, second.outer[module_id].momentum))


def test_resumed_session_trains_exactly_like_an_uninterrupted_one(tiny_run_state, stdlib_docs, tmp_path):
    # Prepare
    uninterrupted = PathSession(tiny_run_state, (0, 1), stdlib_docs, CPU, tmp_path)
    uninterrupted.inner_steps(4)
    uninterrupted.make_local_global()
    uninterrupted.round = 1
    uninterrupted.save_checkpoint()
    resumed = PathSession(tiny_run_state, (0, 1), stdlib_docs, CPU, tmp_path)
    resumed.restore()

    # Execute
    _, loss_a = uninterrupted.inner_steps(4)
    _, loss_b = resumed.inner_steps(4)

    # Assert: same batches, same optimizer state, hence bit-identical weights
    assert loss_a == loss_b
    for (name, a), (_, b) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_session_falls_back_to_previous_round_when_newest_is_corrupt(tiny_run_state, stdlib_docs, tmp_path, caplog):
    # Prepare
    session = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path)
    for round_ in (1, 2):
        session.inner_steps(2)
        session.make_local_global()
        session.round = round_
        session.save_checkpoint()
    newest = session.store.root / "round-000002" / "L0.M0.safetensors"
    newest.write_bytes(newest.read_bytes()[:-8])
    caplog.set_level(logging.WARNING, logger=CHECKPOINT_LOGGER)

    # Execute
    fresh = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path)
    ckpt = fresh.restore()

    # Assert
    assert ckpt.round == 1 and fresh.round == 1 and fresh.inner.step_count == 2
    assert "round-000002/L0.M0.safetensors: checksum mismatch" in caplog.text


def test_session_with_only_corrupt_checkpoints_starts_from_init(tiny_run_state, stdlib_docs, tmp_path, caplog):
    # Prepare
    session = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path)
    session.inner_steps(2)
    session.round = 1
    directory = session.save_checkpoint()
    (directory / MANIFEST).write_text(json.dumps({"format": 1})[:-1])
    caplog.set_level(logging.WARNING, logger="p2ptrain")

    # Execute
    fresh = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path)
    ckpt = fresh.restore()

    # Assert
    assert ckpt is None and fresh.round == 0 and fresh.inner.step_count == 0
    assert "no usable checkpoint" in caplog.text


def test_session_ignores_checkpoints_of_another_run(tiny_run_state, stdlib_docs, tmp_path, caplog):
    # Prepare: same run id, another seed, so another run fingerprint
    other_config = RunConfig.from_dict({**tiny_run_state.config.to_dict(), "run": {"id": "unit-tiny", "seed": 1}})
    other = RunState(other_config, tiny_run_state.router)
    session = PathSession(other, (0, 0), stdlib_docs, CPU, tmp_path)
    session.round = 1
    session.save_checkpoint()
    caplog.set_level(logging.WARNING, logger="p2ptrain")

    # Execute
    ckpt = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path).restore()

    # Assert
    assert ckpt is None
    assert "belongs to another version of run unit-tiny" in caplog.text


def test_adopting_one_fragment_keeps_local_progress_everywhere_else(tiny_run_state, stdlib_docs, tmp_path):
    # Prepare: train a little, so local and global differ everywhere
    session = PathSession(tiny_run_state, (0, 0), stdlib_docs, CPU, tmp_path)
    session.inner_steps(2)
    module_id = session.module_ids[0]
    outer = session.outer[module_id]
    local_before = torch.cat([session.local_state(module_id)[n].reshape(-1) for n in outer.names]).clone()
    global_flat = torch.cat([g.reshape(-1) for g in outer.global_params])
    start, end = 10, global_flat.numel() // 2  # spans several parameters

    # Execute
    session.adopt_global(module_id, fragment=(start, end))

    # Assert
    local_after = torch.cat([session.local_state(module_id)[n].reshape(-1) for n in outer.names])
    assert torch.equal(local_after[start:end], global_flat[start:end])
    assert torch.equal(local_after[:start], local_before[:start])
    assert torch.equal(local_after[end:], local_before[end:])
    assert not torch.equal(local_after[end:], global_flat[end:])


def test_a_manifest_whose_round_was_flipped_is_skipped_like_any_corrupt_checkpoint(store_with_three_rounds):
    # Prepare: one flipped bit turns "round": 3 into "round": 2 (0x33 → 0x32); the manifest
    # itself carries no checksum (found by the fault suite's bit flips)
    manifest = newest_dir(store_with_three_rounds) / MANIFEST
    manifest.write_text(manifest.read_text().replace('"round": 3', '"round": 2'))

    # Execute
    loaded = store_with_three_rounds.load_latest()

    # Assert: the previous round loads, with its own values
    assert loaded.round == 2 and torch.equal(loaded.groups["stem"]["w"], tensors(2.0)["stem"]["w"])
