"""The DiPaCo grid: which paths exist, which modules each uses, and path parsing."""

import pytest

from p2ptrain.errors import UserError
from p2ptrain.home import checkpoint_dir
from p2ptrain.model.grid import Grid


def test_2x2_grid_has_four_paths_in_row_major_order():
    # Prepare
    grid = Grid((2, 2))

    # Execute
    paths = grid.paths()

    # Assert
    assert grid.num_paths == 4
    assert paths == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [grid.path_number(p) for p in paths] == [0, 1, 2, 3]


def test_path_uses_shared_stem_then_one_module_per_level():
    # Prepare
    grid = Grid((2, 3))

    # Execute
    modules = grid.modules_of((1, 2))

    # Assert
    assert modules == ["stem", "L0.M1", "L1.M2"]
    assert grid.all_modules() == ["stem", "L0.M0", "L0.M1", "L1.M0", "L1.M1", "L1.M2"]


def test_per_path_stem_gives_each_path_its_own_stem_module():
    # Prepare
    grid = Grid((2, 2), stem="per_path")

    # Execute
    modules = grid.modules_of((1, 0))

    # Assert
    assert modules == ["stem.P1-0", "L0.M1", "L1.M0"]
    assert grid.all_modules()[:4] == ["stem.P0-0", "stem.P0-1", "stem.P1-0", "stem.P1-1"]
    assert grid.paths_containing("stem.P1-0") == [(1, 0)]


def test_paths_containing_lists_every_path_that_shares_a_module():
    # Prepare
    grid = Grid((2, 2))

    # Execute / Assert
    assert grid.paths_containing("stem") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert grid.paths_containing("L0.M1") == [(1, 0), (1, 1)]
    assert grid.paths_containing("L1.M0") == [(0, 0), (1, 0)]
    assert grid.paths_containing("L2.M0") == []


def test_three_level_grid_counts_paths_as_product_of_levels():
    # Prepare
    grid = Grid((3, 1, 2))

    # Execute
    paths = grid.paths()

    # Assert
    assert grid.num_paths == 6 == len(paths) == len(set(paths))
    assert paths[0] == (0, 0, 0) and paths[-1] == (2, 0, 1)


@pytest.mark.parametrize("text, expected", [("1,0", (1, 0)), ("0,1", (0, 1)), ("1-1", (1, 1)), (" 1, 0", (1, 0))])
def test_parse_path_accepts_comma_or_dash_separated_indices(text, expected):
    # Prepare
    grid = Grid((2, 2))

    # Execute
    path = grid.parse_path(text)

    # Assert
    assert path == expected


@pytest.mark.parametrize("text, message", [
    ("a,b", "expected comma-separated module indices"),
    ("1", "is not in the grid [2, 2]"),
    ("2,0", "is not in the grid [2, 2]"),
    ("0,0,0", "is not in the grid [2, 2]"),
    ("", "expected comma-separated module indices"),
])
def test_parse_path_rejects_paths_outside_the_grid_with_a_user_error(text, message):
    # Prepare
    grid = Grid((2, 2))

    # Execute
    with pytest.raises(UserError) as excinfo:
        grid.parse_path(text)

    # Assert
    assert message in str(excinfo.value)
    assert excinfo.value.exit_code == 2


def test_checkpoint_dir_names_the_path_with_dashes(tmp_path):
    # Execute
    directory = checkpoint_dir(tmp_path, "run-a", (1, 0))

    # Assert
    assert directory == tmp_path / "runs" / "run-a" / "checkpoints" / "path-1-0"
