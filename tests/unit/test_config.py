"""Run config: packaged presets load, and every mistake in a file is one ConfigError
that names the key at fault and what is allowed."""

import pytest

from p2ptrain.config import RunConfig, describe_fields
from p2ptrain.errors import ConfigError


@pytest.mark.parametrize("toml_text, expected", [
    ("[modle]\nd_model = 64\n",
     "<config>: unknown section [modle]; allowed: run, model, grid, data, router, inner, outer, averaging"),
    ("[model]\nwidth = 64\n", "<config>: model.width: unknown key; allowed: d_model, n_heads"),
    ("[model]\nd_model = \"64\"\n", "<config>: model.d_model: expected int, got str '64'"),
    ("[model]\nd_model = 64.0\n", "<config>: model.d_model: expected int, got float 64.0"),
    ("[model]\ntie_embeddings = 1\n", "<config>: model.tie_embeddings: expected bool, got int 1"),
    ("[inner]\nlr = true\n", "<config>: inner.lr: expected float, got bool True"),
    ("[model]\nd_model = 8\n", "<config>: model.d_model: 8 is out of range; allowed [16, 16384]"),
    ("[outer]\nmomentum = 1.0\n", "<config>: outer.momentum: 1.0 is out of range; allowed [0.0, 0.999]"),
    ("[run]\nseed = -1\n", "<config>: run.seed: -1 is out of range; allowed [0, inf]"),
    ("[grid]\nstem = \"private\"\n", "<config>: grid.stem: 'private' is not one of 'shared', 'per_path'"),
    ("[model]\nd_model = 100\nn_heads = 3\n",
     "<config>: model.d_model (100) must be divisible by model.n_heads (3)"),
    ("[model]\nd_model = 96\nn_heads = 32\n", "<config>: model.d_model / model.n_heads must be even"),
    ("[grid]\nlevels = [2, 0]\n", "<config>: grid.levels must be a non-empty list of integers in [1, 64], got [2, 0]"),
    ("[grid]\nlevels = []\n", "<config>: grid.levels must be a non-empty list"),
    ("[inner]\nbetas = [0.9]\n", "<config>: inner.betas must be two numbers in [0, 1), got [0.9]"),
    ("[run]\nid = \"a.b\"\n", "<config>: run.id must be 1-64 printable characters without '.'"),
    ("[averaging]\nfragments = 17\n", "<config>: averaging.fragments: 17 is out of range; allowed [1, 16]"),
    ("model = 3\n", "<config>: [model] must be a table"),
    ("[model\n", "<config>: not valid TOML"),
])
def test_bad_config_raises_one_config_error_naming_the_key(toml_text, expected):
    # Execute
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_toml_text(toml_text)

    # Assert
    message = str(excinfo.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert excinfo.value.exit_code == 3


def test_error_names_the_file_it_came_from(tmp_path):
    # Prepare
    path = tmp_path / "run.toml"
    path.write_text("[inner]\nbatch_size = 0\n")

    # Execute
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.load(path)

    # Assert
    assert str(excinfo.value) == f"{path}: inner.batch_size: 0 is out of range; allowed [1, 65536]"


def test_missing_config_file_is_a_config_error(tmp_path):
    # Execute
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.load(tmp_path / "nope.toml")

    # Assert
    assert str(excinfo.value) == f"cannot read run config {tmp_path / 'nope.toml'}: No such file or directory"


def test_default_preset_is_a_2x2_grid_of_small_paths():
    # Execute
    config = RunConfig.load("default")

    # Assert
    assert config == RunConfig.load(None)
    assert config.run.id == "p2ptrain-default"
    assert config.grid.levels == [2, 2] and config.grid.blocks_per_level == 2
    assert (config.model.d_model, config.model.n_heads, config.model.context) == (128, 4, 128)
    assert config.inner.optimizer == "adamw8bit"
    # the outer step chosen at this size (README, Performance: Fragments), not DiLoCo's (0.7, 0.9)
    assert (config.outer.lr, config.outer.momentum, config.outer.nesterov) == (1.0, 0.5, True)


def test_gpu_preset_is_a_4x4_grid_of_wide_paths():
    # Execute
    config = RunConfig.load("gpu")

    # Assert
    assert config.run.id == "p2ptrain-gpu-150m"
    assert config.grid.levels == [4, 4] and config.grid.blocks_per_level == 6
    assert (config.model.d_model, config.model.n_heads, config.model.context) == (1024, 16, 1024)
    assert config.averaging.compression == "8bit"


def test_an_empty_file_gives_the_defaults_and_ints_are_accepted_for_floats():
    # Execute
    config = RunConfig.from_toml_text("[outer]\nlr = 1\n")

    # Assert
    assert config.outer.lr == 1.0 and type(config.outer.lr) is float
    assert RunConfig.from_toml_text("") == RunConfig()


def test_to_toml_round_trips_with_the_same_fingerprint():
    # Prepare
    config = RunConfig.from_toml_text("[model]\nd_model = 64\n[grid]\nlevels = [3, 1, 2]\nstem = \"per_path\"\n")

    # Execute
    again = RunConfig.from_toml_text(config.to_toml())

    # Assert
    assert again == config
    assert again.fingerprint() == config.fingerprint()
    assert again.fingerprint() != RunConfig().fingerprint()


def test_fingerprint_changes_with_any_value():
    # Prepare
    base = RunConfig()

    # Execute
    other = RunConfig.from_dict({"inner": {"lr": 0.0031}})

    # Assert
    assert base.fingerprint() == RunConfig().fingerprint()
    assert len(base.fingerprint()) == 64
    assert other.fingerprint() != base.fingerprint()


def test_every_field_is_documented():
    # Execute
    rows = describe_fields()

    # Assert
    keys = [key for key, _, _ in rows]
    assert "model.d_model" in keys and "outer.momentum" in keys and "averaging.overlap" in keys
    assert len(keys) == len(set(keys))
    assert all(help_text for _, _, help_text in rows)
    assert dict((k, d) for k, d, _ in rows)["grid.levels"] == "[2, 2]"
