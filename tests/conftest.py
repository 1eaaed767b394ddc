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


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu, memory-only) on a free port for the whole session."""
    from stream.broker import EmbeddedBroker

    try:
        b = EmbeddedBroker().start()
    except FileNotFoundError as e:
        pytest.skip(f"embedded broker unavailable: {e}")
    yield b
    b.stop()


@pytest.fixture
def topics(request, broker):
    """Fresh topic names for one test: (alerts, annotations, deadletter)."""
    import re

    from stream.broker import create_topics

    base = re.sub(r"[^a-zA-Z0-9]", "-", request.node.name)[:60]
    names = (f"{base}.alerts", f"{base}.annotations", f"{base}.deadletter")
    create_topics(broker.bootstrap, names, partitions=4)
    return names
