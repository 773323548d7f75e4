"""The training text: the Python standard library's own source files, split by file.

Every `.py` file under the running Python's stdlib directory is a candidate, except third-party
packages (`site-packages`), generated tables (`encodings`, `pydoc_data`, `_sysconfigdata*`, files
over `MAX_FILE_BYTES`) and, unless asked for, the test suites (`test`, `tests`, `idle_test`). A file
is held out when a hash of its path relative to the stdlib root falls below `heldout_percent`, so the
split is the same on every machine and Python version for the files they share; test files of a
held-out module (`test_<module>*.py`) are dropped from training too.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 400_000
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload", "encodings", "pydoc_data"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
DEFAULT_HELDOUT_PERCENT = 4


@dataclass(frozen=True)
class CorpusSplit:
    """Training and held-out files (paths relative to `root`, sorted), and where they live."""

    root: Path
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def read(self, names: tuple[str, ...]) -> list[str]:
        """The texts of `names`, in order (files that are not UTF-8 were already left out)."""
        return [(self.root / name).read_text(encoding="utf-8") for name in names]


def stdlib_root() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str, heldout_percent: int = DEFAULT_HELDOUT_PERCENT) -> bool:
    """Whether the file at this stdlib-relative POSIX path belongs to the held-out set."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def select_corpus(
    root: Path | None = None, include_tests: bool = False, heldout_percent: int = DEFAULT_HELDOUT_PERCENT
) -> CorpusSplit:
    """Walk `root` (default: the stdlib) and split its usable `.py` files into train / held-out.

    Held-out files never come from the test suites, whose files are training-only when
    `include_tests` is set.
    """
    root = stdlib_root() if root is None else Path(root)
    train: list[str] = []
    heldout: list[str] = []
    tests: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        parts = relative.parts[:-1]
        if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts):
            continue
        if path.name.startswith("_sysconfigdata") or not _usable(path):
            continue
        name = relative.as_posix()
        if any(p in TEST_DIRS for p in parts):
            tests.append(name)
        elif is_heldout(name, heldout_percent):
            heldout.append(name)
        else:
            train.append(name)
    if include_tests:
        heldout_stems = {Path(name).stem for name in heldout}
        train.extend(name for name in tests if not _tests_a_heldout_module(name, heldout_stems))
        train.sort()
    return CorpusSplit(root=root, train=tuple(train), heldout=tuple(heldout))


def _usable(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return False
        path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


def _tests_a_heldout_module(name: str, heldout_stems: set[str]) -> bool:
    stem = Path(name).stem
    return any(stem == f"test_{m}" or stem.startswith(f"test_{m}_") for m in heldout_stems)
