"""The compatibility matrix tests the upper end of the transformers range a user resolves:
the newest release on the index that pyproject.toml admits, not a newer one outside it."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import compat_matrix  # noqa: E402

LISTING = """transformers (5.26.0rc1)
Available versions: 5.26.0rc1, 5.25.0, 5.24.0, 5.23.0, 5.4.0, 5.3.0, 4.57.6
  INSTALLED: 5.24.0
"""


def test_newest_in_range_respects_the_cap_and_skips_prereleases():
    assert compat_matrix.newest_in_range(LISTING, ">=5.4,<5.25") == ("5.24.0", "5.25.0")
    assert compat_matrix.newest_in_range(LISTING, ">=5.4") == ("5.25.0", "5.25.0")
    assert compat_matrix.newest_in_range(LISTING, ">=6") == (None, "5.25.0")
    assert compat_matrix.newest_in_range("no listing", ">=5.4") == (None, None)


def test_declared_range_is_pyprojects_and_its_ends_are_the_tested_ones():
    from packaging.specifiers import SpecifierSet

    from megatron_harpe.convert.hf_harpe.configuration_harpe_llama import (
        TRANSFORMERS_MINIMUM,
        TRANSFORMERS_TESTED_UP_TO,
    )

    declared = SpecifierSet(compat_matrix.declared_range())
    assert TRANSFORMERS_MINIMUM in declared and TRANSFORMERS_TESTED_UP_TO in declared
    lock = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    locked = next(line.split("==")[1] for line in lock if line.lower().startswith("transformers=="))
    assert locked in declared, f"the lock's transformers {locked} is outside pyproject.toml's {declared}"
