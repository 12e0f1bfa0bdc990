"""The run state (config + router) saved in a node's home, and what `info` reports."""

import json

import pytest

from p2ptrain.config import RunConfig
from p2ptrain.errors import ConfigError
from p2ptrain.info import run_info
from p2ptrain.run_state import (RunState, config_differences, load_local_run_state, load_or_create_run_state,
                                run_state_file, save_run_state)


def test_saved_run_state_loads_back_with_the_same_fingerprint(tiny_run_state, tmp_path):
    # Execute
    path = save_run_state(tmp_path, tiny_run_state)
    loaded = load_local_run_state(tmp_path, tiny_run_state.config)

    # Assert
    assert path == tmp_path / "runs" / "unit-tiny" / "run.json"
    assert loaded.fingerprint() == tiny_run_state.fingerprint()


def test_a_config_that_changed_names_each_key_it_changed_with_both_values():
    # Prepare: the default preset as it was before its outer step changed (2026-12-06)
    before = RunConfig.load("default")
    before.outer.lr, before.outer.momentum = 0.7, 0.9
    many = RunConfig.load("default")
    many.run.seed, many.inner.lr, many.inner.batch_size, many.grid.stem = 5, 1e-3, 8, "per_path"

    # Execute / Assert: what a home that ran the old preset is told on upgrading
    assert config_differences(before, RunConfig.load("default")) == \
        "outer.lr 0.7 saved, 1.0 given; outer.momentum 0.9 saved, 0.5 given"
    assert config_differences(many, before, most=2) == "run.seed 5 saved, 0 given; grid.stem 'per_path' saved, " \
                                                      "'shared' given; and 4 more"


def test_no_saved_run_state_loads_as_none(tiny_config, tmp_path):
    # Execute / Assert
    assert load_local_run_state(tmp_path, tiny_config) is None


def test_load_or_create_fits_once_then_reuses_the_saved_router(tiny_config, stdlib_docs, tmp_path):
    # Prepare
    calls = []

    def loader():
        calls.append(1)
        return stdlib_docs

    # Execute
    first = load_or_create_run_state(tmp_path, tiny_config, loader)
    second = load_or_create_run_state(tmp_path, tiny_config, loader)

    # Assert
    assert len(calls) == 1
    assert first.fingerprint() == second.fingerprint()


@pytest.mark.parametrize("text, message", [
    ("not json", "not a valid run state (JSONDecodeError"),
    ('{"format": 99}', "format 99 is not 1 (written by another p2ptrain version)"),
    ('{"format": 1, "config": {}}', "not a valid run state (KeyError"),
    ('[]', "not a valid run state (AttributeError"),
])
def test_damaged_run_state_file_is_a_config_error(tiny_config, tmp_path, text, message):
    # Prepare
    path = run_state_file(tmp_path, tiny_config.run.id)
    path.parent.mkdir(parents=True)
    path.write_text(text)

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        load_local_run_state(tmp_path, tiny_config)

    # Assert
    assert str(excinfo.value).startswith(f"{path}: ")
    assert message in str(excinfo.value)


def test_run_state_fingerprint_covers_config_and_router(tiny_run_state):
    # Prepare
    other_config = RunConfig.from_dict({**tiny_run_state.config.to_dict(), "outer": {"lr": 0.5}})
    raw = json.loads(tiny_run_state.to_json())
    raw["router"]["offsets"][0] += 0.001

    # Execute
    with_other_config = RunState(other_config, tiny_run_state.router)
    with_other_router = RunState.from_json(json.dumps(raw))

    # Assert
    fingerprints = {tiny_run_state.fingerprint(), with_other_config.fingerprint(), with_other_router.fingerprint()}
    assert len(fingerprints) == 3


def test_info_of_a_per_path_stem_run_counts_one_stem_per_path():
    # Prepare
    config = RunConfig.from_dict({"model": {"d_model": 32, "n_heads": 2}, "grid": {"levels": [2, 3],
                                  "blocks_per_level": 1, "stem": "per_path"}})

    # Execute
    report = run_info(config)

    # Assert
    stem = 257 * 32 + 2 * 32
    block = 2 * 2 * 32 + 12 * 32 * 32
    modules = {m["module"]: (m["params"], m["shared_by_paths"]) for m in report["modules"]}
    assert len(report["paths"]) == 6
    assert modules["stem.P1-2"] == (stem, 1)
    assert modules["L0.M1"] == (block, 3)
    assert modules["L1.M2"] == (block, 2)
    assert report["params_per_path"] == stem + 2 * block
    assert report["params_total"] == 6 * stem + 5 * block
