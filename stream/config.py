"""One strict configuration: TOML → frozen dataclasses.

* Unknown keys are errors that name the key (``source.bootstrap_server: unknown key``).
* ``[source.kafka]`` and ``[output.kafka]`` hold librdkafka settings and pass through
  untouched (SASL/SSL for the ZTF and Rubin community brokers).
* Secrets never live in the file: a secret setting (e.g. ``sasl.password``) must be
  written ``{ env = "VARIABLE" }`` (read from the environment at load time) or
  ``{ file = "PATH" }`` (the file's text without trailing line ends: Docker and Kubernetes
  secrets are mounted as files).

Example: see ``deploy/*.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def parse_time_ms(text: str) -> int:
    """ISO-8601 (``2023-10-19T00:00:00Z``, UTC unless it says otherwise) or Unix milliseconds → Unix ms.

    Raises
    ------
    ValueError
        For anything else, and for a digits-only value below 10^11, which would be a time before
        1973 in milliseconds and is almost surely Unix *seconds*.
    """
    if text.isdigit():
        if int(text) < 10**11:
            raise ValueError(f"{text!r} looks like Unix seconds; give Unix milliseconds or an ISO-8601 time")
        return int(text)
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


#: Settings that hold secrets (ssl.key.pem is a private key; sasl.oauthbearer.config may hold clientSecret=).
SECRET_KEYS = ("sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret", "ssl.keystore.password",
               "token", "ssl.key.pem", "sasl.oauthbearer.config")
#: ``service.log_level`` values (Python logging's names).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Most messages one librdkafka consume() call returns.
MAX_BATCH_SIZE = 1_000_000


@dataclass(frozen=True)
class SourceConfig:
    """Where alerts come from."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topics: tuple = ("ztf_alerts",)
    group_id: str = "vigil"
    schema_dir: str = ""  # .avsc directory for Confluent-framed (Rubin) messages
    ztf_schema: str = ""  # schema for schemaless ZTF messages
    batch_size: int = 500
    batch_timeout_s: float = 1.0
    max_message_bytes: int = 16 * 2**20
    auto_offset_reset: str = "earliest"
    avro_backend: str = "auto"  # what reads containers: auto (cavro where installed), fastavro or cavro
    kafka: dict = field(default_factory=dict)  # librdkafka consumer settings, passed through


@dataclass(frozen=True)
class ReplayConfig:
    """Replay a topic between two times under its own group and output namespace."""

    start: str = "earliest"  # "earliest" or an ISO-8601 time (offsets_for_times)
    end: str = "end"  # "end" (end of partitions) or an ISO-8601 time
    # Producer (CreateTime) stamps arrive a little out of order: a partition is finished only at a
    # message stamped this long after the end time; those in between are skipped, not read.
    end_grace_s: float = 300.0
    group_id: str = "vigil-replay"
    namespace: str = "replay"  # output topics get this suffix: <topic>.<namespace>
    # The eyeball queue a replay fills: "" leaves every queue alone (the live one included, whose
    # rows a replay would otherwise overwrite); name output.queue_db's store to refill it.
    queue_db: str = ""


@dataclass(frozen=True)
class OutputConfig:
    """Where annotations, dead letters and the eyeball queue go."""

    # The cluster the annotation and dead-letter topics live on; "" is the source's. A survey's
    # community broker is read-only to its consumers, so a broker operator writes to their own.
    bootstrap_servers: str = ""
    annotations_topic: str = "vigil.annotations"
    dead_letter_topic: str = "vigil.deadletter"
    queue_db: str = ""  # eyeball queue: SQLite path or postgresql:// URL; "" disables
    queue_retention_days: float = 0.0  # stamps/light curves of older alerts are pruned; 0 keeps all
    kafka: dict = field(default_factory=dict)  # librdkafka producer settings, passed through


@dataclass(frozen=True)
class ServiceConfig:
    """Process behaviour."""

    metrics_port: int = 0  # Prometheus text endpoint (/metrics) on metrics_host; 0 disables
    metrics_host: str = "127.0.0.1"  # "0.0.0.0" for a scraper on another host or container
    log_interval_s: float = 30.0
    error_budget: int = 100  # unexpected exceptions tolerated before the service stops
    clock: str = "wall"  # "wall" for live streams, "stream" to rank by event time
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR (`vigil -v` is DEBUG whatever this says)


@dataclass(frozen=True)
class ScoringConfig:
    """Which alert model scores the stream."""

    # A model directory written by `vigil train` (e.g. one whose condition regressions were
    # refitted on this survey's stream with --refit-conditions); "" is the shipped default.
    model: str = ""


@dataclass(frozen=True)
class Config:
    """The whole configuration of ``vigil run``."""

    source: SourceConfig = SourceConfig()
    output: OutputConfig = OutputConfig()
    service: ServiceConfig = ServiceConfig()
    scoring: ScoringConfig = ScoringConfig()
    replay: ReplayConfig | None = None


def _resolve_secrets(table: dict, where: str) -> dict:
    out = {}
    for k, v in table.items():
        key = f"{where}.{k}"
        if isinstance(v, dict):
            if set(v) not in ({"env"}, {"file"}) or not isinstance(next(iter(v.values())), str):
                # TOML reads an unquoted dotted key (security.protocol = ...) as a nested table.
                inner = next(iter(v), "")
                hint = (f" (an unquoted dotted key? write \"{k}.{inner}\" = ..., quoted, as librdkafka names it)"
                        if v and set(v) - {"env", "file"} else "")
                raise ConfigError(f"{key}: librdkafka settings must be scalars, {{ env = \"VAR\" }} "
                                  f"or {{ file = \"PATH\" }}{hint}")
            if "env" in v:
                if v["env"] not in os.environ:
                    raise ConfigError(f"{key}: environment variable {v['env']} is not set")
                out[k] = os.environ[v["env"]]
            else:
                try:
                    out[k] = Path(v["file"]).read_text(encoding="utf-8").rstrip("\r\n")
                except (OSError, UnicodeDecodeError) as e:
                    raise ConfigError(f"{key}: cannot read the secret file {v['file']} ({e})") from None
        elif k in SECRET_KEYS:
            raise ConfigError(f"{key}: secrets must come from the environment or a file: write "
                              f"{k} = {{ env = \"VAR\" }} or {{ file = \"PATH\" }}")
        elif isinstance(v, (str, int, float, bool)):
            out[k] = v
        else:
            raise ConfigError(f"{key}: expected a string, number or boolean, got {type(v).__name__}")
    return out


def _env_secrets(data: dict):
    """``(key, variable)`` of each ``{ env = "VAR" }`` value where the config takes one: librdkafka
    settings (``[*.kafka]``) and the queue store (``queue_db``)."""
    for section, table in data.items():
        if not isinstance(table, dict):
            continue
        kafka = table.get("kafka")
        places = [(f"{section}.kafka.{k}", v) for k, v in kafka.items()] if isinstance(kafka, dict) else []
        places.append((f"{section}.queue_db", table.get("queue_db")))
        for key, v in places:
            if isinstance(v, dict) and set(v) == {"env"} and isinstance(v["env"], str):
                yield key, v["env"]


def _build(cls, table, where: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in table:
        if k not in names:
            raise ConfigError(f"{where}.{k}: unknown key (known: {', '.join(sorted(names))})")
    kw = {}
    for k, v in table.items():
        key, t = f"{where}.{k}", hints[k]
        if k == "kafka":
            kw[k] = _resolve_secrets(v, key) if isinstance(v, dict) else _fail(key, "a table")
        elif k == "queue_db":
            kw[k] = _queue_db(v, key)
        elif t is tuple:
            if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                _fail(key, "a list of strings")
            kw[k] = tuple(v)
        elif t is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(key, "a number")
            kw[k] = float(v)
        elif t in (int, str, bool):
            if not isinstance(v, t) or (t is int and isinstance(v, bool)):
                _fail(key, {int: "a whole number", str: "a string", bool: "true or false"}[t]
                      + f", not {v!r}")
            kw[k] = v
        else:
            raise ConfigError(f"{key}: unsupported type")
    return cls(**kw)


def _queue_db(v, key: str) -> str:
    """A queue store's path or URL; a database password comes from the environment or a file, as
    Kafka secrets do: ``{ env = "VAR" }`` / ``{ file = "PATH" }`` (the whole URL), or libpq's own
    ``PGPASSWORD`` / ``~/.pgpass``."""
    if isinstance(v, dict):
        return str(_resolve_secrets({"queue_db": v}, key.rsplit(".", 1)[0])["queue_db"])
    if not isinstance(v, str):
        _fail(key, f"a string, {{ env = \"VAR\" }} or {{ file = \"PATH\" }}, not {v!r}")
    from urllib.parse import parse_qs, urlsplit

    low = v.lower()
    if low.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(v)
            secret = parts.password is not None or "password" in parse_qs(parts.query)
        except ValueError:  # a malformed URL: the store names it when it opens
            secret = False
        if secret:
            raise ConfigError(f"{key}: a password written in the file; give the URL as {{ env = \"VAR\" }} or "
                              "{ file = \"PATH\" }, or leave it out and use PGPASSWORD or ~/.pgpass")
    return v


def _fail(key, what):
    raise ConfigError(f"{key}: expected {what}")


_SECTIONS = {"source": SourceConfig, "output": OutputConfig, "service": ServiceConfig, "scoring": ScoringConfig,
             "replay": ReplayConfig}


def parse_config(data: dict, where: str = "config") -> Config:
    """Build a :class:`Config` from a parsed TOML table."""
    kw = {}
    for k in data:
        if k not in _SECTIONS:
            raise ConfigError(f"{k}: unknown section (known: {', '.join(_SECTIONS)})")
    # Every secret whose environment variable is unset, named at once (one at a time had taken a
    # deployment as many rounds as it has credentials).
    unset = [f"{key} ({var})" for key, var in _env_secrets(data) if var not in os.environ]
    if len(unset) > 1:
        raise ConfigError(f"environment variables not set: {', '.join(unset)}")
    for k, v in data.items():
        kw[k] = _build(_SECTIONS[k], v, k)
    cfg = Config(**kw)
    validate(cfg)
    return cfg


#: librdkafka's names for ``source.auto_offset_reset``.
OFFSET_RESETS = ("earliest", "smallest", "beginning", "latest", "largest", "end", "error")
#: Consumer settings Vigil owns: offsets are stored by hand after the outputs are durable and
#: committed by librdkafka's auto-commit; these would break that or shadow a Vigil key.
_OWNED_CONSUMER_KEYS = {
    "group.id": "source.group_id", "bootstrap.servers": "source.bootstrap_servers",
    "metadata.broker.list": "source.bootstrap_servers",
    "enable.auto.offset.store": None, "enable.auto.commit": None, "auto.offset.reset": "source.auto_offset_reset",
}
#: Producer settings with a Vigil key of their own.
_OWNED_PRODUCER_KEYS = {"bootstrap.servers": "output.bootstrap_servers",
                        "metadata.broker.list": "output.bootstrap_servers"}


#: A Kafka topic name (what the broker accepts).
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")


def same_cluster_as_source(cfg: Config) -> bool:
    """Whether the outputs go to the source's cluster: no ``output.bootstrap_servers``, or one
    sharing a broker address with ``source.bootstrap_servers`` (aliases of a host cannot be told)."""
    def brokers(text):
        return {b.strip().lower() for b in text.split(",") if b.strip()}

    out = cfg.output.bootstrap_servers
    return not out or bool(brokers(out) & brokers(cfg.source.bootstrap_servers))


#: librdkafka settings that say how to reach and log in to a cluster (not how to consume from it).
_CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.", "ssl_", "enable.ssl.", "enable.sasl.", "socket.",
                        "broker.address.", "client.dns.")


def output_kafka_settings(cfg: Config) -> dict:
    """librdkafka settings of the output producers: ``[output.kafka]``, and where the outputs go to
    the source's cluster (no ``output.bootstrap_servers``, or one naming a broker of the source's)
    the connection and login settings of ``[source.kafka]`` under them: a SASL/SSL cluster had
    been read with them and written without."""
    if not same_cluster_as_source(cfg):
        return dict(cfg.output.kafka)
    inherited = {k: v for k, v in cfg.source.kafka.items() if k.startswith(_CONNECTION_PREFIXES)}
    return {**inherited, **cfg.output.kafka}


def check_topic_name(name: str, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``name`` is a topic name a broker accepts."""
    if not _TOPIC_NAME.fullmatch(name) or len(name) > 249:
        raise ConfigError(f"{key}: {name!r} is not a topic name (letters, digits, '.', '_', '-'; at most 249)")


def _check_output_topics(cfg: Config) -> None:
    """Output topics: valid names, apart from each other and from every source topic.

    A dead-letter topic that is also read would loop its first bad message for ever; an
    annotations topic that is read would feed every annotation back in as a bad alert.
    """
    out = cfg.output
    # On another cluster, a topic of the same name is another topic (a broker both lists name is one cluster).
    same_cluster = same_cluster_as_source(cfg)
    for key in ("annotations_topic", "dead_letter_topic"):
        name = getattr(out, key)
        check_topic_name(name, f"output.{key}")
        for t in cfg.source.topics if same_cluster else ():
            if name == t or (t.startswith("^") and _matches(t, name)):  # "^…": librdkafka's topic pattern
                raise ConfigError(f"output.{key}: {name!r} is also read (source.topics {t!r})")
    if out.annotations_topic == out.dead_letter_topic:
        raise ConfigError("output.dead_letter_topic: the same topic as output.annotations_topic")


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error as e:
        raise ConfigError(f"source.topics: {pattern!r} is not a valid pattern ({e})") from None


def _check_queue(key: str, value: str) -> None:
    if value:
        from stream.queue import is_url

        try:
            is_url(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def validate(cfg: Config) -> None:
    """Check the values of a built :class:`Config` (also after command-line overrides).

    Raises
    ------
    ConfigError
        Naming the first offending key.
    """
    src, svc, out = cfg.source, cfg.service, cfg.output
    if not 1 <= src.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"source.batch_size: must be 1 … {MAX_BATCH_SIZE} (librdkafka's most per call)")
    if not (0 < src.batch_timeout_s <= 1.0):
        raise ConfigError(f"source.batch_timeout_s: {src.batch_timeout_s}: must be > 0 and at most 1 s (the "
                          "consumer polls at most that long, so that stop signals are seen promptly)")
    if src.max_message_bytes < 1:
        raise ConfigError("source.max_message_bytes: must be ≥ 1")
    if not src.topics or not all(src.topics):
        raise ConfigError("source.topics: at least one topic, none empty")
    for t in src.topics:
        if t.startswith("^"):
            _matches(t, "")  # a pattern that does not compile is named
        else:
            check_topic_name(t, "source.topics")
    if len(set(src.topics)) < len(src.topics):
        twice = next(t for t in src.topics if src.topics.count(t) > 1)
        raise ConfigError(f"source.topics: {twice!r} is listed twice")
    _check_output_topics(cfg)
    if src.auto_offset_reset not in OFFSET_RESETS:
        raise ConfigError(f"source.auto_offset_reset: one of {', '.join(OFFSET_RESETS)}")
    from stream.decode import Decoder

    try:
        Decoder(avro_backend=src.avro_backend)
    except ValueError as e:
        raise ConfigError(f"source.{e}") from None
    if svc.error_budget < 0:
        raise ConfigError("service.error_budget: must be ≥ 0")
    if not 0 <= svc.metrics_port <= 65535:
        raise ConfigError("service.metrics_port: a TCP port (1–65535), or 0 for none")
    _check_queue("output.queue_db", cfg.output.queue_db)
    if not 0 <= out.queue_retention_days < math.inf:
        raise ConfigError("output.queue_retention_days: must be ≥ 0 (0 keeps everything)")
    if not 0 < svc.log_interval_s < math.inf:
        raise ConfigError("service.log_interval_s: must be > 0")
    if cfg.scoring.model and not (Path(cfg.scoring.model) / "metadata.json").is_file():
        raise ConfigError(f"scoring.model: no model directory (with metadata.json) at {cfg.scoring.model}")
    if cfg.service.clock not in ("wall", "stream"):
        raise ConfigError("service.clock: must be 'wall' or 'stream'")
    if svc.log_level not in LOG_LEVELS:
        raise ConfigError(f"service.log_level: one of {', '.join(LOG_LEVELS)}")
    for k, instead in _OWNED_CONSUMER_KEYS.items():
        if k in src.kafka:
            why = f"use {instead}" if instead else "offsets are committed after outputs are durable"
            raise ConfigError(f"source.kafka.{k}: set by Vigil ({why})")
    for k, instead in _OWNED_PRODUCER_KEYS.items():
        if k in out.kafka:
            raise ConfigError(f"output.kafka.{k}: set by Vigil (use {instead})")
    for name in ("acks", "request.required.acks"):  # each spelling: librdkafka keeps the last one given
        acks = cfg.output.kafka.get(name)
        if acks is not None and str(acks) not in ("all", "-1"):
            raise ConfigError(f"output.kafka.{name}: must be 'all' (-1): offsets move only once every output is "
                              "durable")
    if cfg.replay is not None:
        rc, times = cfg.replay, {}
        if not _TOPIC_NAME.fullmatch(rc.namespace):
            raise ConfigError(f"replay.namespace: {rc.namespace!r} is not a topic-name suffix "
                              "(letters, digits, '.', '_', '-')")
        for name, word in (("start", "earliest"), ("end", "end")):
            text = getattr(rc, name)
            if text in ("", word):
                continue
            try:
                times[name] = parse_time_ms(text)
            except ValueError as exc:
                raise ConfigError(f"replay.{name}: {exc} (or {word!r})") from None
        if not 0 <= rc.end_grace_s <= 86_400:
            raise ConfigError(f"replay.end_grace_s: {rc.end_grace_s} is not within 0 … 86400 s")
        if len(times) == 2 and times["end"] <= times["start"]:
            raise ConfigError(f"replay.end: {rc.end} is not after replay.start {rc.start}")
        _check_queue("replay.queue_db", rc.queue_db)


def load_configured_model(cfg: Config):
    """The alert model ``scoring.model`` names, or None for the shipped default.

    Raises
    ------
    ConfigError
        Naming the key, when the directory is not a model this Vigil can load.
    """
    if not cfg.scoring.model:
        return None
    from models.scorer import AlertScorer

    try:
        return AlertScorer.load(cfg.scoring.model)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"scoring.model: {e}") from None


def load_config(path) -> Config:
    """Load and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale
    except OSError as e:  # a missing file or a directory: a usage error, said in one line
        raise ConfigError(f"config {p}: cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {p}: not UTF-8 text (byte {e.start}), so not TOML") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    return parse_config(data)
