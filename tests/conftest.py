"""Shared fixtures: paths to real sample alerts, and skips when the full data set is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHARED = Path(os.environ.get("VIGIL_SHARED_DATA", ROOT.parent / "shared" / "data"))

needs_shared = pytest.mark.skipif(
    not (SHARED / "ztf_alerts_fink_broker").is_dir(),
    reason=f"full data sets not found at {SHARED} (set VIGIL_SHARED_DATA); the vendored sample covers the rest",
)


def avro_files(*parts) -> list[Path]:
    return sorted((DATA.joinpath(*parts)).rglob("*.avro"))


@pytest.fixture(scope="session")
def ztf_files():
    return avro_files("ztf_fink") + avro_files("ztf_ampel")


@pytest.fixture(scope="session")
def rubin_files():
    return avro_files("rubin_fink")


@pytest.fixture(scope="session")
def exposure_files():
    """100 real ZTF alerts from one exposure (field 639, two quadrants)."""
    return avro_files("ztf_ampel", "alerts_2021720_programid1_nocutouts")
