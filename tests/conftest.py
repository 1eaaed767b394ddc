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


def _pg_binaries() -> Path | None:
    """Directory of the PostgreSQL server binaries (initdb, pg_ctl), or None."""
    import shutil

    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("initdb")).parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server of this session (Unix socket in a temp dir); yields a URL factory.

    The server refuses to run as root, so as root it runs as the ``postgres`` user.
    """
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    pytest.importorskip("psycopg", reason="the PostgreSQL queue store needs psycopg (pip install 'vigil[postgres]')")
    bindir = _pg_binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    run_as = []
    # Not under pytest's temp root: that is private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="vigil-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    for cmd in ([str(bindir / "initdb"), "-D", str(data), "-U", "vigil", "--auth=trust", "--locale=C", "-E", "UTF8"],
                [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                 f"-k {root} -p {port} -c listen_addresses='' -c fsync=off", "start"]):
        done = subprocess.run([*run_as, *cmd], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr or done.stdout}")
    import psycopg

    admin = f"postgresql://vigil@/postgres?host={root}&port={port}"
    counter = iter(range(10**6))

    def new_database() -> str:
        name = f"vigil_test_{next(counter)}"
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://vigil@/{name}?host={root}&port={port}"

    try:
        yield new_database
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
