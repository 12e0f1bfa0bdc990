"""The DiPaCo grid: levels of alternative modules, and paths through them.

A path picks one module per level, e.g. path (1, 0) uses `L0.M1` then `L1.M0`, plus the
stem (token embedding, final norm, head) that every path shares — or, with
`stem = "per_path"`, a stem of its own named `stem.P1-0`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from p2ptrain.errors import UserError

PathIndex = tuple[int, ...]


@dataclass(frozen=True)
class Grid:
    levels: tuple[int, ...]
    stem: str = "shared"

    @classmethod
    def from_config(cls, grid_config) -> "Grid":
        return cls(tuple(grid_config.levels), grid_config.stem)

    @property
    def num_paths(self) -> int:
        n = 1
        for k in self.levels:
            n *= k
        return n

    def paths(self) -> list[PathIndex]:
        """All paths in a fixed order (row-major over levels)."""
        return [tuple(p) for p in itertools.product(*(range(k) for k in self.levels))]

    def path_number(self, path: PathIndex) -> int:
        return self.paths().index(tuple(path))

    def stem_id(self, path: PathIndex) -> str:
        return "stem" if self.stem == "shared" else f"stem.P{path_name(path, sep='-')}"

    def modules_of(self, path: PathIndex) -> list[str]:
        """Module ids of a path in forward order: stem first, then one per level."""
        self.check_path(path)
        return [self.stem_id(path)] + [level_module_id(level, m) for level, m in enumerate(path)]

    def all_modules(self) -> list[str]:
        """Every module id: the stem(s), then level by level."""
        stems = ["stem"] if self.stem == "shared" else [self.stem_id(p) for p in self.paths()]
        return stems + [level_module_id(level, m) for level, k in enumerate(self.levels) for m in range(k)]

    def paths_containing(self, module_id: str) -> list[PathIndex]:
        return [p for p in self.paths() if module_id in self.modules_of(p)]

    def check_path(self, path: PathIndex) -> None:
        if len(path) != len(self.levels) or any(not 0 <= m < k for m, k in zip(path, self.levels)):
            raise UserError(f"path {path_name(path)} is not in the grid {list(self.levels)}: "
                            f"give one module index per level, each below {list(self.levels)}")

    def parse_path(self, text: str) -> PathIndex:
        """Parse '1,0' (as typed on the command line) into a path of this grid."""
        try:
            path = tuple(int(part) for part in text.replace("-", ",").split(","))
        except ValueError:
            raise UserError(f"--path {text!r}: expected comma-separated module indices like 1,0") from None
        self.check_path(path)
        return path


def level_module_id(level: int, module: int) -> str:
    return f"L{level}.M{module}"


def path_name(path: PathIndex, sep: str = ",") -> str:
    return sep.join(str(m) for m in path)
